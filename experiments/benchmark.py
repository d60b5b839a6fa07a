"""Training speed and time to quality: ``dae-jax bench`` (``dae_jax/bench.py``), which
``make bench`` runs; this script takes the same flags (``--help``).

It replaced the script of this name whose tables are in ``experiments/results/
benchmark-*.md``: that one (``--widths``, ``--conv=plain,skip``, ``--unroll``, the
PyTorch reference ``--torch_python``) is ``git show 73c8248:experiments/benchmark.py``.
"""

import sys

from dae_jax import bench

if __name__ == "__main__":
    sys.exit(bench.main(["dae-jax bench", *sys.argv[1:]]))

"""One process of a multi-process training run, launched by tests/test_performance.py.

    python -m tests.multihost_worker WORKDIR PARAMS_PATTERN

Joins the run named by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(or trains alone without them), trains the tiny config, and saves this process's
copy of the final parameters to PARAMS_PATTERN.format(process_index).
"""

import sys

import numpy as np

from dae_jax import parallel

parallel.initialize_distributed()

import jax  # noqa: E402

from dae_jax import train  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def main(workdir: str, pattern: str) -> None:
    config = tiny_config(**{"train.epochs": 1})
    result = train.fit(config, workdir, log=print)
    leaves = [parallel.host(leaf) for leaf in jax.tree.leaves(result.state.params)]
    np.savez(pattern.format(jax.process_index()), *leaves)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

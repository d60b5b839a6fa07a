"""One process of a multi-process training run, launched by tests/test_performance.py.

    python -m tests.multihost_worker WORKDIR PARAMS_PATTERN [MODELS]

Joins the run named by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(or trains alone without them), trains the tiny config, and saves this process's
copy of the final parameters to PARAMS_PATTERN.format(process_index). With MODELS, it
trains a population of that many models (seeds 0, 1, ...) as a sweep does.
"""

import sys

import numpy as np

from dae_jax import parallel

parallel.initialize_distributed()

import jax  # noqa: E402

from dae_jax import train  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def main(workdir: str, pattern: str, models: int = 0) -> None:
    config = tiny_config(**{"train.epochs": 1})
    if models:
        seeds = list(range(models))
        params = train.fit_many(
            config, seeds=seeds, levels=[0.5] * models, workdir=workdir, log=print
        ).states.params
    else:
        params = train.fit(config, workdir, log=print).state.params
    leaves = [parallel.host(leaf) for leaf in jax.tree.leaves(params)]
    np.savez(pattern.format(jax.process_index()), *leaves)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))

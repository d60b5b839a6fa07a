"""Gaussian vs masking vs salt-and-pepper corruption, each over its levels.

    python experiments/corruption_types.py --workdir=W [--quick]
        [--seeds=0,1,2] [--axis=KEY=V1,V2 ...]

The same as ``dae-jax sweep --grid=corruption_types ...`` (the grid is in dae_jax/grids.py; every
flag of ``dae-jax sweep --help`` applies). Killed, the same command resumes it; with
more values on an axis, it trains only the new models.
"""

from dae_jax import sweep


def main() -> None:
    sweep.script("corruption_types")


if __name__ == "__main__":
    main()

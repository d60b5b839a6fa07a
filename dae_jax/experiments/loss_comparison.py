"""MSE vs binary cross-entropy across Gaussian noise levels.

    python experiments/loss_comparison.py --workdir=W [--quick]
        [--seeds=0,1,2] [--axis=KEY=V1,V2 ...]

The same as ``dae-jax sweep --grid=loss_comparison ...`` (the grid is in dae_jax/grids.py; every
flag of ``dae-jax sweep --help`` applies). Killed, the same command resumes it; with
more values on an axis, it trains only the new models.
"""

from dae_jax import sweep


def main() -> None:
    sweep.script("loss_comparison")


if __name__ == "__main__":
    main()

"""How does the noise level change what a DAE learns? (level 0: a plain autoencoder)

    python experiments/noise_sweep.py --workdir=W [--quick] [--seeds=0,1,2] [--axis=KEY=V1,V2 ...]

The same as ``dae-jax sweep --grid=noise_sweep ...`` (the grid is in dae_jax/grids.py; every
flag of ``dae-jax sweep --help`` applies). Killed, the same command resumes it; with
more values on an axis, it trains only the new models.
"""

from dae_jax import sweep


def main() -> None:
    sweep.script("noise_sweep")


if __name__ == "__main__":
    main()

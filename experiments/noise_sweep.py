"""How does the noise level change what a DAE learns?

A thin main: the script is ``dae_jax/experiments/noise_sweep.py`` (from an installed package:
``python -m dae_jax.experiments.noise_sweep``); ``--help`` shows its flags.
"""

from dae_jax.experiments.noise_sweep import main

if __name__ == "__main__":
    main()

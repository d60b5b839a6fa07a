"""How does the noise level change what a DAE learns? (level 0: a plain autoencoder)

The same as ``dae-jax sweep --grid=noise_sweep`` (from an installed package:
``python -m dae_jax.experiments.noise_sweep``); ``--help`` shows its flags.
"""

from dae_jax import sweep

if __name__ == "__main__":
    sweep.script("noise_sweep")

"""MSE vs binary cross-entropy across Gaussian noise levels.

The same as ``dae-jax sweep --grid=loss_comparison`` (from an installed package:
``python -m dae_jax.experiments.loss_comparison``); ``--help`` shows its flags.
"""

from dae_jax import sweep

if __name__ == "__main__":
    sweep.script("loss_comparison")

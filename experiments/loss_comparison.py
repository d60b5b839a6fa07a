"""MSE vs binary cross-entropy across the Gaussian noise sweep.

A thin main: the script is ``dae_jax/experiments/loss_comparison.py`` (from an installed package:
``python -m dae_jax.experiments.loss_comparison``); ``--help`` shows its flags.
"""

from dae_jax.experiments.loss_comparison import main

if __name__ == "__main__":
    main()

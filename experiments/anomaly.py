"""Anomaly detection with DAEs: train on all classes but one, score test images.

A thin main: the script is ``dae_jax/experiments/anomaly.py`` (from an installed package:
``python -m dae_jax.experiments.anomaly``); ``--help`` shows its flags.
"""

from dae_jax.experiments.anomaly import main

if __name__ == "__main__":
    main()

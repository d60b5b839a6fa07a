"""The experiment scripts, runnable from an installed package:

    python -m dae_jax.experiments.noise_sweep --workdir=W [--quick] ...

(``experiments/NAME.py`` in a checkout runs the same ``main``). Each module's docstring
is its ``--help``.
"""

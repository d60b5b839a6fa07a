"""The experiment scripts, runnable from an installed package:

    python -m dae_jax.experiments.noise_sweep --workdir=W [--quick] ...

(``experiments/NAME.py`` in a checkout runs the same ``main``). Each module's docstring
is its ``--help``.
"""

NAMES = ("noise_sweep", "corruption_types", "loss_comparison", "pretrain_finetune", "anomaly")

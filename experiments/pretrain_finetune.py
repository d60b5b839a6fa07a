"""Does DAE pre-training help a classifier, and when?

A thin main: the script is ``dae_jax/experiments/pretrain_finetune.py`` (from an installed package:
``python -m dae_jax.experiments.pretrain_finetune``); ``--help`` shows its flags.
"""

from dae_jax.experiments.pretrain_finetune import main

if __name__ == "__main__":
    main()

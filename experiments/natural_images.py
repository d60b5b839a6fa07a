"""DnCNN on natural photos against BM3D (sigma 15, 25, 50 /255).

A thin main: the script is ``dae_jax/experiments/natural_images.py`` (from an installed
package: ``python -m dae_jax.experiments.natural_images``); ``--help`` shows its flags.
"""

from dae_jax.experiments.natural_images import main

if __name__ == "__main__":
    main()

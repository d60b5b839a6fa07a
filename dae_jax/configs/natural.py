"""DnCNN on natural photos at sigma 25/255, against BM3D: the denoising field's setting.

Trains on random 40x40 patches (flipped and rotated) of scikit-image's natural photos
(``data.name=skimage``: 11 training photos; camera, coffee and chelsea held out), in
grayscale as the field's BSD68 and Set12 benchmarks, with unclipped Gaussian noise.
The model is DnCNN (Zhang et al. 2017) made smaller for a 2-core CPU: 8 convolutions of
32 maps instead of 17 of 64. Its defaults train in about 30 minutes on 2 CPU cores; on a
GPU raise ``train.epochs``, ``model.depth`` (17) and ``model.features`` (64).
Evaluation per epoch is on the held-out photos' common 300x451 centres;
``experiments/natural_images.py`` scores whole photos against BM3D.
"""

import ml_collections

from dae_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "skimage"
    config.data.channels = 1
    config.data.patch_size = 40
    config.data.patches_per_image = 256  # 11 photos: 2816 patches an epoch, 44 steps of 64
    config.data.augment = True

    config.model.kind = "dncnn"
    config.model.depth = 8
    config.model.features = 32

    config.noise.kind = "gaussian"
    config.noise.level = 25 / 255
    config.noise.clip = False  # the field's convention: the noisy image is not clipped

    config.optim.learning_rate = 1e-3
    config.train.batch_size = 64
    config.train.epochs = 30
    config.train.log_every = 44
    config.eval.batch_size = 1  # three whole 300x451 centres
    config.eval.num_figure_images = 3
    return config

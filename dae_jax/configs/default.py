"""The research default: the tutorial's network on Fashion-MNIST, with saner training.

What differs from the tutorial (`seed.py`) and why:
- Fashion-MNIST, not MNIST: it ships offline as a Debian package and is harder,
  so differences between settings show.
- Gaussian sigma 0.5, clipped to [0, 1]: the corrupted input stays an image
  (sigma 1.0 unclipped drowns most of the signal and PSNR of the input is ~0 dB).
- Adam learning rate 1e-3: 1e-2 (the tutorial's) is near the edge of stability
  for this MLP and ends at a worse loss.
Everything else (784-512-256-128 mirrored, ReLU, MSE, batch 128, 10 epochs,
log every 100 steps) is the tutorial's.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # JAX's persistent compilation cache: a second run of the same config skips
    # compiling. "" turns it off.
    config.compile_cache = "~/.cache/dae_jax/jax_compile_cache"
    # float32 | bfloat16: the dtype the models compute in (matmuls, convolutions,
    # activations); parameters, gradients and Adam's state stay float32, and the outputs
    # are cast to float32 before the loss and the metrics (Flax's dtype / param_dtype).
    config.precision = "float32"

    config.data = ml_collections.ConfigDict()
    # mnist | fashion_mnist | kmnist | cifar10 | svhn_cropped | stl10 | celeb_a (tfds names),
    # folder (the images in data.local_dir), skimage (scikit-image's photos), synthetic
    config.data.name = "fashion_mnist"
    # mnist family: a directory of the four IDX files (.gz or raw); folder: the image directory
    config.data.local_dir = ""
    config.data.tfds_dir = ""  # tensorflow-datasets data_dir; "" = tfds's default
    config.data.train_size = 0  # use the first N training images; 0 = all
    config.data.test_size = 0  # use the first N test images; 0 = all
    config.data.channels = 0  # 1 = grayscale, 3 = RGB (converted if need be); 0 = as stored
    # (H, W, C) of the images, filled in from the data ((0, 0, C) when their sizes differ);
    # a value given here is checked against the data
    config.data.image_shape = ()
    # Train on random square patches of this side, cropped on the device each step; 0 = whole
    config.data.patch_size = 0
    config.data.patches_per_image = 1  # patches: an epoch crops this many from each image
    config.data.augment = False  # patches: random flips and 90-degree rotations
    config.data.test_fraction = 0.1  # folder without a test/ subfolder: the test share

    config.model = ml_collections.ConfigDict()
    config.model.kind = "mlp"  # mlp | conv | dncnn
    config.model.hidden = (512, 256, 128)  # mlp: encoder widths; the decoder mirrors them
    config.model.tied_weights = False  # mlp: decoder kernels are the encoder's, transposed
    # conv: channels per level; each level after the first halves the image (28 -> 14 -> 7);
    # an image the strides do not divide is padded and cropped back
    config.model.channels = (32, 64, 64)
    config.model.skip = False  # conv: add each encoder map to the decoder map of its size
    config.model.convs_per_level = 1  # conv: 3x3 convolutions per level and direction
    config.model.depth = 17  # dncnn: 3x3 convolutions (Zhang et al. 2017: 17)
    config.model.features = 64  # dncnn: feature maps of each hidden convolution

    config.noise = ml_collections.ConfigDict()
    config.noise.kind = "gaussian"  # gaussian | masking | salt_and_pepper
    config.noise.level = 0.5  # gaussian: sigma; masking, salt_and_pepper: fraction
    config.noise.clip = True  # gaussian only: clip the noisy input to [0, 1]

    config.loss = "mse"  # mse | bce

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3  # the peak rate, with a schedule
    config.optim.weight_decay = 0.0  # AdamW's decoupled weight decay; 0 = Adam
    config.optim.schedule = "constant"  # constant | cosine (linear warmup, cosine decay to 0)
    config.optim.warmup_steps = 0  # cosine: steps of linear warmup from 0
    config.optim.grad_clip = 0.0  # clip gradients to this global norm; 0 = off

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 10
    config.train.batch_size = 128
    config.train.log_every = 100  # steps per compiled chunk and per log line
    # Steps per iteration of the compiled loop (lax.scan's unroll); speed only; 0 = auto (1).
    config.train.scan_unroll = 0
    # Split each batch over a mesh of all devices; on whenever several are visible.
    config.train.data_parallel = False

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_epochs = 1  # the last epoch is always saved
    config.checkpoint.keep = 3  # newest checkpoints kept in W/checkpoints/

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 1000
    config.eval.num_figure_images = 8  # columns of figures/denoising.png

    # W/tensorboard/ event files: per-epoch losses, PSNR, SSIM, speed, the figure.
    config.tensorboard = True
    # Trace at least this many training steps (whole chunks of train.log_every, after the
    # first chunk) into W/profile/; 0 = off.
    config.profile_steps = 0
    return config

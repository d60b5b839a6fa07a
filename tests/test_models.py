import json
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dae_jax import fast_conv, models
from dae_jax.configs import default, seed


def _model(hidden=(512, 256, 128)):
    return models.MlpDae(hidden, rngs=nnx.Rngs(params=jax.random.key(0)))


def test_seed_shape_has_the_tutorials_parameter_count():
    # 784-512-256-128 and mirrored, with biases: the PyTorch tutorial's DAE.
    expected = sum(a * b + b for a, b in zip((784, 512, 256), (512, 256, 128), strict=True))
    expected += sum(a * b + b for a, b in zip((128, 256, 512), (256, 512, 784), strict=True))
    assert models.num_params(_model()) == expected == 1_132_944


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (3, 784)])
def test_shapes_for_both_input_layouts(shape):
    model = _model()
    x = jax.random.uniform(jax.random.key(1), shape)
    codes = model.encode(x)
    assert codes.shape == (3, 128)
    assert bool(jnp.all(codes >= 0))  # ReLU on the code, as in the tutorial
    decoded = model.decode(codes)
    assert decoded.shape == (3, 28, 28, 1)
    assert bool(jnp.all((decoded >= 0) & (decoded <= 1)))
    y = model(x)
    assert y.shape == shape
    np.testing.assert_allclose(y.reshape(3, -1), decoded.reshape(3, -1), rtol=1e-6)
    np.testing.assert_allclose(model.to_pixels(model.outputs(x)), y, rtol=1e-6)


def test_widths_come_from_the_config():
    config = default.get_config()
    config.model.hidden = (100, 10)
    model = cast(models.MlpDae, models.create(config, key=jax.random.key(0)))
    assert [layer.kernel.shape for layer in model.encoder] == [(784, 100), (100, 10)]
    assert [layer.kernel.shape for layer in model.decoder] == [(10, 100), (100, 784)]
    assert model.encode(jnp.zeros((2, 784))).shape == (2, 10)


def test_seed_config_is_the_tutorial():
    config = seed.get_config()
    assert config.data.name == "mnist"
    assert tuple(config.model.hidden) == (512, 256, 128)
    assert (config.noise.kind, config.noise.level, config.noise.clip) == ("gaussian", 1.0, False)
    assert (config.loss, config.optim.learning_rate) == ("mse", 1e-2)
    assert (config.train.batch_size, config.train.epochs, config.train.log_every) == (128, 10, 100)


def _config(**model):
    config = default.get_config()
    for key, value in model.items():
        config.model[key] = value
    return config


@pytest.mark.parametrize(
    "model_config, code_size",
    [
        ({"kind": "mlp", "tied_weights": True}, 128),
        ({"kind": "conv"}, 7 * 7 * 64),
        ({"kind": "conv", "skip": True}, 7 * 7 * 64),
        ({"kind": "conv", "channels": (8, 16)}, 14 * 14 * 16),
        ({"kind": "conv", "channels": (4,)}, 28 * 28 * 4),
    ],
)
def test_every_kind_keeps_the_model_contract(model_config, code_size):
    model = models.create(_config(**model_config), key=jax.random.key(0))
    for shape in ((3, 28, 28, 1), (3, 784)):
        x = jax.random.uniform(jax.random.key(1), shape)
        codes = model.encode(x)
        assert codes.shape == (3, code_size)
        y = model(x)
        assert y.shape == shape
        assert bool(jnp.all((y >= 0) & (y <= 1)))
        np.testing.assert_allclose(model.to_pixels(model.outputs(x)), y, rtol=1e-6)
        if not model_config.get("skip"):
            np.testing.assert_allclose(model.decode(codes).reshape(shape), y, rtol=1e-5, atol=1e-6)


def test_conv_with_skips_refuses_to_decode_codes_alone():
    model = models.create(_config(kind="conv", skip=True), key=jax.random.key(0))
    codes = model.encode(jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="call the model on the input"):
        model.decode(codes)


def test_skip_connections_change_the_output_but_not_the_parameters():
    plain = models.create(_config(kind="conv"), key=jax.random.key(0))
    skip = models.create(_config(kind="conv", skip=True), key=jax.random.key(0))
    assert models.num_params(plain) == models.num_params(skip)
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    assert not np.allclose(plain(x), skip(x))


def test_tied_weights_share_one_kernel_and_it_gets_both_gradients():
    tied = cast(
        models.MlpDae,
        models.create(_config(tied_weights=True, hidden=(32, 8)), key=jax.random.key(0)),
    )
    untied = cast(models.MlpDae, models.create(_config(hidden=(32, 8)), key=jax.random.key(0)))
    # Half the kernels: only the encoder's exist; the decoder has biases only.
    kernels = [p for path, p in nnx.to_flat_state(nnx.state(tied, nnx.Param)) if "kernel" in path]
    assert [k.shape for k in kernels] == [(784, 32), (32, 8)]
    assert models.num_params(tied) == 784 * 32 + 32 + 32 * 8 + 8 + 32 + 784
    # The same function as an untied model whose decoder kernels are the transposes.
    untied_encoder = cast(list[nnx.Linear], list(untied.encoder))
    untied_decoder = cast(list[nnx.Linear], list(untied.decoder))
    for enc, dec in zip(untied_encoder, reversed(untied_decoder), strict=True):
        assert dec.bias is not None
        dec.kernel[...] = enc.kernel[...].T
        dec.bias[...] = jnp.zeros_like(dec.bias[...])
    for a, b in zip(cast(list[nnx.Linear], list(tied.encoder)), untied_encoder, strict=True):
        assert a.bias is not None and b.bias is not None
        a.kernel[...], a.bias[...] = b.kernel[...], b.bias[...]
    x = jax.random.uniform(jax.random.key(1), (4, 784))
    np.testing.assert_allclose(tied(x), untied(x), rtol=1e-5, atol=1e-6)

    # The shared kernel's gradient is the sum of its two uses' gradients.
    def loss(model):
        return jnp.mean((model(x) - x) ** 2)

    g_tied = nnx.grad(loss)(tied)
    g_untied = nnx.grad(loss)(untied)
    for i, j in ((0, 1), (1, 0)):
        expected = g_untied.encoder[i].kernel[...] + g_untied.decoder[j].kernel[...].T
        np.testing.assert_allclose(g_tied.encoder[i].kernel[...], expected, rtol=1e-4, atol=1e-7)
        assert float(jnp.abs(g_untied.decoder[j].kernel[...]).sum()) > 0


def test_a_conv_dae_pads_an_image_its_strides_do_not_divide_and_crops_back():
    model = models.ConvDae((8, 8, 8, 8), rngs=nnx.Rngs(0))  # 28 -> 32 -> 16 -> 8 -> 4
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    assert model(x).shape == (2, 28, 28, 1)
    assert model.encode(x).shape == (2, 4 * 4 * 8)
    assert model.decode(model.encode(x)).shape == (2, 28, 28, 1)
    odd = jax.random.uniform(jax.random.key(2), (1, 37, 50, 1))
    assert model(odd).shape == (1, 37, 50, 1)


def _assert_close(fast, plain, what):
    """Same up to float32 summation order: within 2e-5 of the largest entry."""
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale + 1e-7, err_msg=what)


def _same_params_and_grads(fast_apply, plain_apply, fast_module, plain_module, x):
    """Forward, and gradients wrt every parameter and the input, of both computations."""

    def loss(module, x, apply):
        y = apply(module, x)
        return jnp.sum(jnp.sin(y)), y  # a nonlinear loss: the gradient varies per output

    (_, y_fast), (g_fast, gx_fast) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        fast_module, x, fast_apply
    )
    (_, y_plain), (g_plain, gx_plain) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        plain_module, x, plain_apply
    )
    _assert_close(y_fast, y_plain, "forward")
    _assert_close(nnx.state(g_fast, nnx.Param), nnx.state(g_plain, nnx.Param), "param grads")
    _assert_close(gx_fast, gx_plain, "input grad")


@pytest.mark.parametrize(
    "c_in, c_out, strides, size",
    [(1, 32, 1, 28), (32, 1, 1, 28), (8, 16, 1, 7), (8, 16, 2, 28), (16, 8, 2, 14), (8, 8, 2, 7)],
)
def test_fast_conv_is_nnx_conv(c_in, c_out, strides, size):
    def conv(fn):
        return nnx.Conv(
            c_in, c_out, (3, 3), strides=strides, conv_general_dilated=fn, rngs=nnx.Rngs(0)
        )

    fast, plain = conv(fast_conv.conv_general_dilated), conv(jax.lax.conv_general_dilated)
    x = jax.random.normal(jax.random.key(1), (3, size, size, c_in))
    _same_params_and_grads(lambda m, x: m(x), lambda m, x: m(x), fast, plain, x)


@pytest.mark.parametrize("c_in, c_out, size", [(64, 64, 7), (64, 32, 14), (8, 4, 5)])
def test_fast_conv_transpose_is_nnx_conv_transpose(c_in, c_out, size):
    layer = nnx.ConvTranspose(c_in, c_out, (3, 3), strides=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, size, size, c_in))
    assert fast_conv.conv_transpose(layer, x).shape == (3, 2 * size, 2 * size, c_out)
    _same_params_and_grads(fast_conv.conv_transpose, lambda m, x: m(x), layer, layer, x)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("convs_per_level", [1, 2])
def test_fast_conv_dae_is_the_plain_one_with_the_same_parameters(skip, convs_per_level):
    def model(fast_convs):
        return models.ConvDae(
            skip=skip,
            convs_per_level=convs_per_level,
            fast_convs=fast_convs,
            rngs=nnx.Rngs(params=jax.random.key(0)),
        )

    fast, plain = model(True), model(False)
    # The same parameters, names and shapes: checkpoints restore into either.
    fast_params = nnx.to_flat_state(nnx.state(fast, nnx.Param))
    plain_params = nnx.to_flat_state(nnx.state(plain, nnx.Param))
    assert [path for path, _ in fast_params] == [path for path, _ in plain_params]
    for (_, a), (_, b) in zip(fast_params, plain_params, strict=True):
        np.testing.assert_array_equal(a[...], b[...])
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    _same_params_and_grads(lambda m, x: m.logits(x), lambda m, x: m.logits(x), fast, plain, x)


@pytest.mark.slow  # in this process, but ~10 s on 2 CPU cores: two vmapped conv gradients
def test_fast_conv_dae_gradients_under_vmap_over_models():
    # The sweeps train several models as one vmapped program (train.fit_many).
    def split(fast_convs, seed):
        model = models.ConvDae(
            (4, 8), skip=True, fast_convs=fast_convs, rngs=nnx.Rngs(params=jax.random.key(seed))
        )
        return nnx.split(model, nnx.Param)

    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))

    def grads(fast_convs):
        graphdef, _ = split(fast_convs, 0)
        params = jax.tree.map(lambda *p: jnp.stack(p), *(split(fast_convs, s)[1] for s in (0, 1)))

        def loss(params):
            return jnp.mean((nnx.merge(graphdef, params)(x) - x) ** 2)

        return jax.vmap(jax.grad(loss))(params)

    _assert_close(grads(True), grads(False), "vmapped param grads")


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(
    "model_config",
    [
        {"kind": "mlp", "hidden": (32, 8)},
        {"kind": "mlp", "hidden": (32, 8), "tied_weights": True},
        {"kind": "conv", "channels": (4, 8)},
        {"kind": "conv", "channels": (4, 8), "skip": True},
        {"kind": "dncnn", "depth": 3, "features": 8},
    ],
)
def test_bfloat16_computes_in_bfloat16_with_float32_parameters_and_outputs(model_config):
    config = _config(**model_config)
    config.precision = "bfloat16"
    model = models.create(config, key=jax.random.key(0))
    config.precision = "float32"
    reference = models.create(config, key=jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    # The same parameters as the float32 model: precision changes the compute only.
    for a, b in zip(params, jax.tree.leaves(nnx.state(reference, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)
    # Every matmul / convolution takes bfloat16 operands ...
    jaxpr = str(jax.make_jaxpr(lambda x: model.outputs(x))(x))
    assert "bf16" in jaxpr and ("dot_general" in jaxpr or "conv_general_dilated" in jaxpr)
    assert str(jax.make_jaxpr(lambda x: reference.outputs(x))(x)).count("bf16") == 0
    # ... but what the loss and metrics see, the codes and the gradients are float32.
    outputs, codes = model.outputs(x), model.encode(x)
    assert outputs.dtype == codes.dtype == model(x).dtype == jnp.float32
    grads = nnx.grad(lambda m: jnp.mean((m.outputs(x) - x) ** 2))(model)
    assert {g.dtype for g in jax.tree.leaves(nnx.state(grads, nnx.Param))} == {jnp.dtype("float32")}
    # bfloat16 keeps 8 bits of mantissa: outputs agree with float32 to ~1e-2 of their scale.
    scale = float(jnp.max(jnp.abs(reference.outputs(x))))
    np.testing.assert_allclose(outputs, reference.outputs(x), atol=0.02 * scale + 1e-3)


def test_bad_precision_is_one_line():
    from dae_jax.configs import validate
    from dae_jax.errors import UserError

    config = default.get_config()
    config.precision = "float16"
    with pytest.raises(UserError) as error:
        validate(config)
    assert str(error.value) == (
        "config precision='float16' is invalid: must be one of float32, bfloat16 (the dtype "
        "the models compute in)"
    )


@pytest.mark.slow
def test_bfloat16_training_trains_and_ends_near_float32(tmp_path):
    """``precision=bfloat16`` through the real training loop: the loss falls, the final
    test loss is within 5% of float32's from the same seed (measured: 0.3%, 0.01 dB), and the
    trained parameters and Adam's moments are float32."""
    from dae_jax import train
    from tests.conftest import tiny_config

    results = {}
    for precision in ("float32", "bfloat16"):
        config = tiny_config(precision=precision)
        config.train.epochs = 3
        config.tensorboard = False
        results[precision] = train.fit(config, tmp_path / precision, log=lambda line: None)
    bf16 = results["bfloat16"]
    losses = [r["train_loss"] for r in bf16.history]
    assert losses[-1] < 0.8 * losses[0], losses
    final = {p: r.history[-1]["test_loss"] for p, r in results.items()}
    assert abs(final["bfloat16"] - final["float32"]) <= 0.05 * final["float32"], final
    psnr = {p: r.history[-1]["test_psnr_denoised"] for p, r in results.items()}
    assert abs(psnr["bfloat16"] - psnr["float32"]) <= 0.25, psnr
    leaves = jax.tree.leaves((bf16.state.params, bf16.state.opt_state))
    assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)
    }
    assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["precision"] == (
        "bfloat16"
    )

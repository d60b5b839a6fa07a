"""Config files (``get_config()``) and the checks every config passes before anything compiles."""

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dae_jax.data import NAMES as DATASETS
from dae_jax.errors import UserError


def __getattr__(name: str) -> Any:
    """The registries' names (``NOISE_KINDS``, ``LOSSES``, ``MODEL_KINDS``), read from
    their modules on first use: importing the configs (``dae-jax --help``) needs no JAX."""
    if name == "NOISE_KINDS":
        from dae_jax.corruption import CORRUPTIONS

        return tuple(CORRUPTIONS)
    if name == "LOSSES":
        from dae_jax.losses import PER_EXAMPLE

        return tuple(PER_EXAMPLE)
    if name == "MODEL_KINDS":
        from dae_jax.models import KINDS

        return tuple(KINDS)
    raise AttributeError(f"module 'dae_jax.configs' has no attribute {name!r}")


CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "default.py"  # --config when none is given
# Seeds JAX turns into distinct keys: jax.random.key keeps the low 32 bits of an int
# (2**32 gives the run of seed 0, -1 the run of 2**32 - 1) and overflows past 2**63.
SEED_LIMIT = 2**32
SCHEDULES = ("constant", "cosine")  # optim.schedule: dae_jax.step.Optim
# config.precision: the models' compute dtype (dae_jax.models.PRECISIONS maps them to dtypes).
PRECISIONS = ("float32", "bfloat16")
# Keys that change how fast a run goes and what it logs, not what it learns: a sweep's
# resume may change them, and dae-jax table never makes them a column.
SPEED_KEYS = ("compile_cache", "train.log_every", "train.scan_unroll", "profile_steps")


def names() -> tuple[str, ...]:
    """The config files shipped with dae_jax, by name: ``--config=seed``."""
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_")))


def resolve(spec: str) -> str:
    """The config file ``--config=SPEC`` means: an existing file as given, else a shipped
    config by name (``seed``, ``seed.py`` or ``dae_jax/configs/seed.py`` from any
    directory, so an installed package needs no checkout), or a past run's resolved config:
    its ``config.json`` or its workdir. Raises ``UserError`` otherwise."""
    if Path(spec).is_file():
        return spec
    if Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        return str(Path(spec) / "config.json")  # a past run's workdir: its resolved config
    for name in names():
        if spec in (name, f"{name}.py", f"dae_jax/configs/{name}.py"):
            return str(CONFIG_DIR / f"{name}.py")
    if Path(spec).is_dir():
        raise UserError(
            f"--config={spec} is a directory; give a Python file with get_config() "
            f"or one of the names {', '.join(names())}, e.g. --config=seed"
        )
    raise UserError(
        f"--config={spec}: no such file or config name; give a Python file with get_config() "
        f"or one of the names {', '.join(names())}, e.g. --config=seed"
    )


def run_config_path(spec: str) -> Path | None:
    """The JSON config ``--config=SPEC`` names (a past run's ``config.json``, as
    :func:`resolve` returns it), or None for a Python config file."""
    path = Path(spec)
    return path if path.suffix == ".json" and path.is_file() else None


def load_json(path: Path) -> ml_collections.ConfigDict:
    """A past run's resolved config (``W/config.json``) as a config to repeat or vary:
    the default config with the run's values (lists as tuples where the default has a
    tuple); ``data.image_shape`` is read from the data again. Raises ``UserError`` for a
    file that is not such a config."""
    from dae_jax.configs import default

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(f"--config={path} cannot be read as JSON ({reason})") from None
    if not isinstance(value, dict) or not value:
        raise UserError(
            f"--config={path} is not a run's config.json (a JSON object of config keys)"
        )
    config = default.get_config()

    def merge(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, item in values.items():
            if key not in node:
                raise UserError(
                    f"--config={path} has the key {prefix}{key}, which this dae_jax does not "
                    "know; remove it from the file (the keys are listed in "
                    "dae_jax/configs/default.py)"
                )
            if isinstance(node[key], ml_collections.ConfigDict):
                if not isinstance(item, dict):
                    raise UserError(f"--config={path}: {prefix}{key} must be a JSON object")
                merge(node[key], item, f"{prefix}{key}.")
                continue
            if isinstance(node[key], tuple) and isinstance(item, list):
                item = tuple(item)
            elif isinstance(node[key], float) and _is_int(item):
                item = float(item)
            try:
                node[key] = item
            except TypeError as e:
                raise UserError(f"--config={path}: {prefix}{key}={item!r}: {e}") from None

    merge(config, value, "")
    config.data.image_shape = ()  # resolved from the data: read again (the data may change)
    return config


def _fail(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"config {key}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (the configs' numbers; the sweep's axes use it too)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


FLOAT32_MAX = 3.4028234663852886e38


def _finite32(value: Any) -> bool:
    """A number the device's float32 holds as a finite value (1e39 would be inf)."""
    return is_number(value) and math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _usable_directory(spec: str) -> bool:
    """``spec`` is "" or a directory this process can create (if missing) and write to;
    checked with a probe that leaves nothing behind."""
    if not spec:
        return True
    path = Path(spec).expanduser()
    try:
        existing = path
        while not existing.exists():
            if existing.parent == existing:
                return False
            existing = existing.parent
        if not existing.is_dir():
            return False
        if existing == path and not os.access(path, os.W_OK | os.X_OK):
            return False
        probe = tempfile.mkdtemp(prefix=".dae_jax-probe-", dir=existing)
        os.rmdir(probe)
        return True
    except (OSError, ValueError):
        return False


def resolve_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config=NAME`` (or ``--config NAME``) turned into the installed
    config file's path, before absl/config_flags parse it (they take a path only).
    Raises ``UserError`` for a name that is neither a file nor a shipped config."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg.startswith(("--config=", "-config=")):
            flag, spec = arg.split("=", 1)
            path = resolve(spec)
            out[i] = f"{flag}={path}"
        elif arg in ("--config", "-config"):
            if i + 1 >= len(out):
                raise UserError(
                    f"--config needs a value: a config name ({', '.join(names())}) or a Python file"
                )
            spec = out[i + 1]
            path = resolve(spec)
            out[i + 1] = path
        else:
            continue
        try:
            Path(path).read_bytes()
        except OSError as e:
            raise UserError(
                f"--config={spec} cannot be read ({e.strerror}); check its permissions"
            ) from None
    return out


def define_config_flag(
    argv: list[str], default_file: str, flag_values: Any = None, *, lock_config: bool = True
) -> None:
    """Defines ``--config`` (with its ``--config.KEY=VALUE`` overrides) from ``argv``, as
    resolved by :func:`resolve_argv`: a Python config file, or a past run's resolved
    config (``--config=W/config.json``), which is taken out of ``argv`` (absl cannot load
    JSON) and defined as the config itself."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FLAGS if flag_values is None else flag_values
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        spec = None
        if arg.startswith(("--config=", "-config=")):
            spec, drop = arg.split("=", 1)[1], [i]
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            spec, drop = argv[i + 1], [i, i + 1]
        path = run_config_path(spec) if spec is not None else None
        if path is not None:
            config = load_json(path)
            for j in reversed(drop):
                del argv[j]
            config_flags.DEFINE_config_dict(
                "config",
                config,
                help_string=f"The config of the run in {path.parent}.",
                flag_values=values,
                lock_config=lock_config,
                sys_argv=list(argv),
            )
            return
    config_flags.DEFINE_config_file(
        "config",
        default=default_file,
        help_string="A config file with get_config(); override keys with --config.KEY=VALUE.",
        flag_values=values,
        lock_config=lock_config,
        sys_argv=list(argv),
    )


def _unknown_keys(config: Any, reference: Any, prefix: str = "") -> list[str]:
    """Keys of ``config`` that the default config does not have, as dotted paths."""
    unknown = []
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in reference:
            unknown.append(path)
        elif isinstance(reference[key], ml_collections.ConfigDict) and isinstance(
            config[key], Mapping | ml_collections.ConfigDict
        ):
            unknown += _unknown_keys(config[key], reference[key], f"{path}.")
    return unknown


def validate(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Raises ``UserError`` naming the first bad key, its value and what is allowed.

    Returns the config as a ``ConfigDict`` (a plain dict, e.g. ``config.to_dict()``,
    is converted): use the returned value.
    """
    config = _as_config(config)

    def get(key: str) -> Any:
        node: Any = config
        try:
            for part in key.split("."):
                node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise UserError(
                f"config has no key {key}; start your config file from dae_jax/configs/default.py"
            ) from None
        return node

    checks = [*_run_and_data_checks(get), *_training_checks(get), *_optim_checks(get)]
    for key, ok, allowed in checks:
        if not ok:
            raise _fail(key, get(key), allowed)
    for key, default_value in flat(default_config()).items():  # every key has a type
        problem = type_problem(_optional(get, key, default_value), default_value)
        if problem:
            raise _fail(key, get(key), problem)
    return config


def default_config() -> ml_collections.ConfigDict:
    from dae_jax.configs import default

    return default.get_config()


def flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Every key of ``config`` as a dotted path (``noise.level``) with its value."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get_key(config: ml_collections.ConfigDict, key: str) -> Any:
    """``config``'s value at the dotted path ``key``."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets ``config``'s value at the dotted path ``key``."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def with_values(
    base: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of ``base`` with each dotted key of ``values`` set to its value."""
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in values.items():
        set_key(config, key, value)
    return config


def type_problem(value: Any, default: Any) -> str | None:
    """What a key of ``default``'s type must be, when ``value`` is not of it."""
    for kind, test, what in (
        (bool, lambda v: isinstance(v, bool), "True or False"),
        (int, _is_int, "an integer"),
        (float, is_number, "a number"),
        (str, lambda v: isinstance(v, str), "a string"),
        (tuple | list, lambda v: isinstance(v, tuple | list), "a list, e.g. (1, 2)"),
    ):
        if isinstance(default, kind):
            return None if test(value) else f"must be {what}, like its default {default!r}"
    return None


def _as_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``config`` as a ``ConfigDict`` with no key the default config lacks."""
    from dae_jax.configs import default

    if not isinstance(config, ml_collections.ConfigDict):
        if not isinstance(config, Mapping):
            raise UserError(
                f"a config must be an ml_collections.ConfigDict (or a dict of the same keys), "
                f"not {type(config).__name__}; start from dae_jax.configs.default.get_config()"
            )
        config = ml_collections.ConfigDict(dict(config))
    unknown = _unknown_keys(config, default.get_config())
    if unknown:
        raise UserError(
            f"unknown config key {unknown[0]!r}; the keys are listed in dae_jax/configs/default.py"
        )
    return config


_Check = tuple[str, bool, str]  # key, whether its value is allowed, what is allowed


def _optional(get: Callable[[str], Any], key: str, default: Any) -> Any:
    """``key``'s value, or ``default`` in a config written before the key existed."""
    try:
        return get(key)
    except UserError:
        return default


def _run_and_data_checks(get: Callable[[str], Any]) -> list[_Check]:
    seed = get("seed")
    checks = [
        (
            "seed",
            _is_int(seed) and 0 <= seed < SEED_LIMIT,
            f"must be an integer from 0 to {SEED_LIMIT - 1} (JAX keys hold 32 bits: any other "
            "seed repeats the run of one of these, or overflows)",
        ),
        (
            "compile_cache",
            isinstance(get("compile_cache"), str) and _usable_directory(get("compile_cache")),
            'must be "" (no cache) or a directory this user can create and write to',
        ),
        (
            "precision",
            _optional(get, "precision", "float32") in PRECISIONS,
            f"must be one of {', '.join(PRECISIONS)} (the dtype the models compute in)",
        ),
        (
            "profile_steps",
            _is_int(_optional(get, "profile_steps", 0)) and _optional(get, "profile_steps", 0) >= 0,
            "must be an integer >= 0 (0 = off)",
        ),
        (
            "tensorboard",
            isinstance(_optional(get, "tensorboard", True), bool),
            "must be True or False",
        ),
        (
            "noise.clip",
            isinstance(_optional(get, "noise.clip", True), bool),
            "must be True or False",
        ),
        ("data.name", get("data.name") in DATASETS, f"must be one of {', '.join(DATASETS)}"),
    ]
    for key in ("data.train_size", "data.test_size"):
        checks.append(
            (key, _is_int(get(key)) and get(key) >= 0, "must be an integer >= 0 (0 = all)")
        )
    return checks + _image_checks(get) + _model_checks(get)


def _model_checks(get: Callable[[str], Any]) -> list[_Check]:
    model_kinds = __getattr__("MODEL_KINDS")
    hidden, channels = get("model.hidden"), get("model.channels")
    checks: list[_Check] = [
        (
            "model.kind",
            get("model.kind") in model_kinds,
            f"must be one of {', '.join(model_kinds)}",
        ),
        (
            "model.hidden",
            isinstance(hidden, tuple | list)
            and len(hidden) > 0
            and all(_is_int(w) and w > 0 for w in hidden),
            "must be a non-empty list of positive integers, e.g. (512, 256, 128)",
        ),
        (
            "model.channels",
            isinstance(channels, tuple | list)
            and 1 <= len(channels) <= 6
            and all(_is_int(c) and c > 0 for c in channels),
            "must be 1 to 6 positive integers (each level after the first halves the "
            "image), e.g. (32, 64, 64)",
        ),
        (
            "model.convs_per_level",
            _is_int(get("model.convs_per_level")) and get("model.convs_per_level") >= 1,
            "must be an integer >= 1",
        ),
        (
            "model.depth",
            _is_int(get("model.depth")) and 2 <= get("model.depth") <= 100,
            "must be an integer from 2 to 100 (DnCNN's 3x3 convolutions)",
        ),
        (
            "model.features",
            _is_int(get("model.features")) and 1 <= get("model.features") <= 4096,
            "must be an integer from 1 to 4096",
        ),
    ]
    for key in ("model.tied_weights", "model.skip"):
        checks.append((key, isinstance(get(key), bool), "must be True or False"))
    return checks


def _image_checks(get: Callable[[str], Any]) -> list[_Check]:
    shape, patch = get("data.image_shape"), get("data.patch_size")
    patching = _is_int(patch) and patch > 0
    fraction = get("data.test_fraction")
    return [
        ("data.channels", get("data.channels") in (0, 1, 3), "must be 0 (as stored), 1 or 3"),
        (
            "data.image_shape",
            isinstance(shape, tuple | list)
            and (
                len(shape) == 0
                or (len(shape) == 3 and all(_is_int(n) and n >= 0 for n in shape))
                and shape[2] in (1, 3)
            ),
            "must be () (read from the data) or (H, W, C) with C 1 or 3, e.g. (32, 32, 3)",
        ),
        (
            "data.patch_size",
            _is_int(patch) and 0 <= patch <= 4096,
            "must be an integer from 0 (whole images) to 4096",
        ),
        (
            "data.patches_per_image",
            _is_int(get("data.patches_per_image"))
            and get("data.patches_per_image") >= 1
            and (patching or get("data.patches_per_image") == 1),
            "must be an integer >= 1, and 1 unless data.patch_size is set",
        ),
        (
            "data.augment",
            isinstance(get("data.augment"), bool) and (patching or not get("data.augment")),
            "must be True or False, and False unless data.patch_size is set (it flips and "
            "rotates the patches)",
        ),
        (
            "data.test_fraction",
            is_number(fraction) and 0 < fraction < 1,
            "must be a number between 0 and 1 (the share of a folder's images to test on)",
        ),
    ]


def _training_checks(get: Callable[[str], Any]) -> list[_Check]:
    noise_kinds, loss_names = __getattr__("NOISE_KINDS"), __getattr__("LOSSES")
    kind, level, lr = get("noise.kind"), get("noise.level"), get("optim.learning_rate")
    checks = [("noise.kind", kind in noise_kinds, f"must be one of {', '.join(noise_kinds)}")]
    if kind in noise_kinds:  # each kind's range lives with the kind
        from dae_jax.corruption import LEVELS

        low, high, problem = LEVELS[kind]
        checks.append(("noise.level", _finite32(level) and low <= level <= high, problem))
    checks += [
        ("loss", get("loss") in loss_names, f"must be one of {', '.join(loss_names)}"),
        (
            "loss",
            get("model.kind") != "dncnn" or get("loss") == "mse",
            "dncnn predicts pixels, not logits: it trains on loss=mse",
        ),
        (
            "optim.learning_rate",
            _finite32(lr) and lr > 0,
            "must be a finite number > 0",
        ),
    ]
    for key in (
        "train.epochs",
        "train.batch_size",
        "train.log_every",
        "eval.batch_size",
        "checkpoint.every_epochs",
        "checkpoint.keep",
    ):
        checks.append((key, _is_int(get(key)) and get(key) >= 1, "must be an integer >= 1"))
    checks += [
        (
            "train.scan_unroll",
            _is_int(get("train.scan_unroll")) and get("train.scan_unroll") >= 0,
            "must be an integer >= 0 (0 = auto)",
        ),
        (
            "train.data_parallel",
            isinstance(get("train.data_parallel"), bool),
            "must be True or False",
        ),
        (
            "eval.num_figure_images",
            _is_int(get("eval.num_figure_images")) and get("eval.num_figure_images") >= 1,
            "must be an integer >= 1",
        ),
    ]
    return checks


def _optim_checks(get: Callable[[str], Any]) -> list[_Check]:
    """The optimizer's keys besides the learning rate (configs before them: defaults)."""
    return [
        (
            "optim.weight_decay",
            _finite32(_optional(get, "optim.weight_decay", 0.0))
            and _optional(get, "optim.weight_decay", 0.0) >= 0,
            "must be a finite number >= 0 (0 = Adam, no decay)",
        ),
        (
            "optim.schedule",
            _optional(get, "optim.schedule", "constant") in SCHEDULES,
            f"must be one of {', '.join(SCHEDULES)}",
        ),
        (
            "optim.warmup_steps",
            _is_int(_optional(get, "optim.warmup_steps", 0))
            and _optional(get, "optim.warmup_steps", 0) >= 0,
            "must be an integer >= 0",
        ),
        (
            "optim.grad_clip",
            _finite32(_optional(get, "optim.grad_clip", 0.0))
            and _optional(get, "optim.grad_clip", 0.0) >= 0,
            "must be a finite number >= 0 (the global gradient norm to clip to; 0 = off)",
        ),
    ]

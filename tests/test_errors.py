"""Every user mistake ends in one line on stderr, the right exit code, and no traceback."""

import gzip

import pytest

from dae_jax import cli
from tests.test_data import write_idx_dir

GAUSSIAN = "the Gaussian noise's standard deviation must be a finite number >= 0"
WIDTHS = "must be a non-empty list of positive integers, e.g. (512, 256, 128)"
POSITIVE = "must be a finite number > 0"
KEYS = "the keys are listed in dae_jax/configs/default.py"

# (arguments after `dae-jax train --workdir=W`, expected stderr line, exit code)
BAD_CONFIGS = [
    (
        ["--config.model.kind=transformer"],
        "error: config model.kind='transformer' is invalid: must be one of mlp, conv, dncnn",
        2,
    ),
    (
        ["--config.model.kind=conv", "--config.model.channels=(8,8,8,8,8,8,8)"],
        "error: config model.channels=(8, 8, 8, 8, 8, 8, 8) is invalid: must be 1 to 6 "
        "positive integers (each level after the first halves the image), e.g. (32, 64, 64)",
        2,
    ),
    (
        ["--config.model.convs_per_level=0"],
        "error: config model.convs_per_level=0 is invalid: must be an integer >= 1",
        2,
    ),
    (
        ["--config.train.scan_unroll=-1"],
        "error: config train.scan_unroll=-1 is invalid: must be an integer >= 0 (0 = auto)",
        2,
    ),
    (
        ["--config.data.name=imagenet"],
        "error: config data.name='imagenet' is invalid: must be one of mnist, fashion_mnist, "
        "kmnist, cifar10, svhn_cropped, stl10, celeb_a, folder, skimage, synthetic",
        2,
    ),
    (
        ["--config.noise.kind=pink"],
        "error: config noise.kind='pink' is invalid: must be one of gaussian, masking, "
        "salt_and_pepper",
        2,
    ),
    (["--config.loss=l1"], "error: config loss='l1' is invalid: must be one of mse, bce", 2),
    (["--config.noise.level=-0.1"], f"error: config noise.level=-0.1 is invalid: {GAUSSIAN}", 2),
    (["--config.noise.level=nan"], f"error: config noise.level=nan is invalid: {GAUSSIAN}", 2),
    (["--config.noise.level=inf"], f"error: config noise.level=inf is invalid: {GAUSSIAN}", 2),
    (
        ["--config.noise.kind=masking", "--config.noise.level=1.5"],
        "error: config noise.level=1.5 is invalid: masking corrupts a fraction of the pixels: "
        "it must be in [0, 1]",
        2,
    ),
    (
        ["--config.noise.kind=salt_and_pepper", "--config.noise.level=-0.5"],
        "error: config noise.level=-0.5 is invalid: salt_and_pepper corrupts a fraction of the "
        "pixels: it must be in [0, 1]",
        2,
    ),
    (
        ["--config.train.batch_size=0"],
        "error: config train.batch_size=0 is invalid: must be an integer >= 1",
        2,
    ),
    (
        ["--config.data.name=synthetic", "--config.train.batch_size=100000"],
        "error: train.batch_size=100000 is larger than the training set (4096 images); "
        "use a smaller batch",
        2,
    ),
    (
        ["--config.train.epochs=0"],
        "error: config train.epochs=0 is invalid: must be an integer >= 1",
        2,
    ),
    (
        ["--config.optim.learning_rate=0"],
        f"error: config optim.learning_rate=0.0 is invalid: {POSITIVE}",
        2,
    ),
    (
        ["--config.optim.learning_rate=-1e-3"],
        f"error: config optim.learning_rate=-0.001 is invalid: {POSITIVE}",
        2,
    ),
    (
        ["--config.optim.learning_rate=inf"],
        f"error: config optim.learning_rate=inf is invalid: {POSITIVE}",
        2,
    ),
    (["--config.model.hidden=()"], f"error: config model.hidden=() is invalid: {WIDTHS}", 2),
    (
        ["--config.model.hidden=(10,0)"],
        f"error: config model.hidden=(10, 0) is invalid: {WIDTHS}",
        2,
    ),
    (
        ["--config.checkpoint.keep=0"],
        "error: config checkpoint.keep=0 is invalid: must be an integer >= 1",
        2,
    ),
    (["--config.nope=1"], f"error: unknown config key 'nope' (--config.nope); {KEYS}", 2),
    (
        ["--config.train.lr=1"],
        f"error: unknown config key 'train.lr' (--config.train.lr); {KEYS}",
        2,
    ),
    (
        ["--config.train.epochs=abc"],
        "error: flag --config.train.epochs=abc: invalid literal for int() with base 10: 'abc' "
        "(dae-jax train --help)",
        2,
    ),
    (["--bogus"], "error: Unknown command line flag 'bogus' (dae-jax train --help)", 2),
    (
        ["--config=no/such/config.py"],
        "error: --config=no/such/config.py: no such file or config name; give a Python file "
        "with get_config() or one of the names default, natural, seed, e.g. --config=seed",
        2,
    ),
]


def run_main(capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["dae-jax", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.mark.parametrize(("args", "line", "code"), BAD_CONFIGS, ids=lambda v: str(v)[:40])
def test_bad_config_values(tmp_path, capsys, args, line, code):
    got_code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", *args)
    assert (got_code, lines) == (code, [line])
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_broken_config_file(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    code, lines, _ = run_main(
        capsys, "train", f"--workdir={tmp_path}", f"--config={tmp_path}/broken.py"
    )
    assert (code, lines) == (
        2,
        ["error: cannot load the --config file: SyntaxError: invalid syntax (broken.py, line 1)"],
    )


def test_workdir_that_is_a_file_or_not_writable(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    code, lines, _ = run_main(capsys, "train", f"--workdir={afile}")
    assert (code, lines) == (
        2,
        [f"error: --workdir={afile} is a file; give a directory (new or existing)"],
    )
    code, lines, _ = run_main(capsys, "train", f"--workdir={afile}/run")
    assert (code, lines) == (
        2,
        [f"error: --workdir={afile}/run is not writable (Not a directory); give another"],
    )
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "t10k-labels-idx1-ubyte.gz").unlink(),
            "{d} has no t10k-labels-idx1-ubyte (nor t10k-labels-idx1-ubyte.gz); it needs the four "
            "IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte",
        ),
        (
            lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(b"\x00\x00\x08\x01" + bytes(100))
            ),
            "{d}/train-images-idx3-ubyte.gz is not an IDX images file: magic number 0x00000801, "
            "expected 0x00000803; replace the file",
        ),
        (
            lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())[:-1])
            ),
            "{d}/train-images-idx3-ubyte.gz is truncated or padded: 15679 bytes of data, the "
            "header promises 15680 (20x28x28); replace the file",
        ),
        (
            lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes(3))
            ),
            "{d}: 20 train images but 3 labels; the files belong to different datasets",
        ),
        (
            lambda d: (d / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip"),
            "cannot read IDX file {d}/t10k-images-idx3-ubyte.gz: Not a gzipped file (b'no'); "
            "replace the file",
        ),
    ],
    ids=["missing", "magic", "truncated", "count", "not-gzip"],
)
def test_bad_local_idx_directory(tmp_path, capsys, damage, message):
    directory = tmp_path / "idx"
    write_idx_dir(directory, gz=True)
    damage(directory)
    code, lines, _ = run_main(
        capsys,
        "train",
        f"--workdir={tmp_path / 'w'}",
        "--config.data.name=mnist",
        f"--config.data.local_dir={directory}",
    )
    assert (code, lines) == (2, ["error: " + message.format(d=directory)])


def test_commands_that_need_a_trained_run(tmp_path, capsys):
    code, lines, _ = run_main(capsys, "evaluate", f"--workdir={tmp_path}")
    assert (code, lines) == (
        1,
        [
            f"error: {tmp_path} holds no run (no config.json); train one first: "
            f"dae-jax train --workdir={tmp_path}"
        ],
    )
    code, lines, _ = run_main(capsys, "denoise", f"--workdir={tmp_path}", "x.png")
    assert (code, lines) == (2, ["error: denoise needs --output=DIR: where the denoised images go"])
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path}", "extra")
    assert (code, lines) == (
        2,
        ["error: unexpected argument 'extra' for train (dae-jax train --help)"],
    )

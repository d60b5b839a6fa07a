"""Each experiment script's --quick run writes every file it promises, with real numbers."""

import csv
import json
import subprocess

import pytest
from PIL import Image

from tests.conftest import COMPILE_CACHE, run_python

FIGURES = ("quality", "train_vs_test_level", "reconstructions", "probe")
AXES = {
    "noise_sweep": ["noise.level"],
    "corruption_types": ["noise.kind", "noise.level"],
    "loss_comparison": ["loss", "noise.level"],
}

# Every test here runs an experiment script in a fresh process (the scripts' flags are
# absl's global FLAGS, and they end with sys.exit), most of them a --quick sweep.
pytestmark = pytest.mark.slow

CONV = ("--config.model.kind=conv", "--config.model.channels=(4,8)", "--config.model.skip=True")


def _quick(script: str, workdir, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_python(
        f"experiments/{script}.py",
        f"--workdir={workdir}",
        "--quick",
        "--config.data.name=synthetic",
        f"--config.compile_cache={COMPILE_CACHE}",
        *flags,
        timeout=timeout,
    )


def _run_quick(script: str, workdir, *flags: str) -> None:
    result = _quick(script, workdir, *flags)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("script", "flags"),
    [(script, ()) for script in sorted(AXES)] + [("noise_sweep", CONV)],
    ids=[*sorted(AXES), "noise_sweep-conv"],
)
def test_quick_run_writes_every_promised_file(tmp_path, script, flags):
    """Each sweep script is ``dae-jax sweep --grid=<script>``: a tidy table with a column
    per axis, every model scored at both levels of its kind, figures."""
    _run_quick(script, tmp_path, *flags)
    rows = _csv(tmp_path / "results.csv")
    assert list(rows[0])[1 : 1 + len(AXES[script]) + 1] == [*AXES[script], "seed"]
    assert {"noisy input", "clip", "gaussian_blur", "median_filter", "raw pixels"} <= {
        r["model"] for r in rows
    }
    models = [r for r in rows if r["seed"]]
    assert {r["seed"] for r in models} == {"0"}  # --quick: one seed, 2 levels per axis
    assert len({r["noise.level"] for r in models}) == 2
    for r in (r for r in models if r["metric"] == "psnr"):
        same_kind = [
            m for m in models
            if m["model"] == r["model"] and m["metric"] == "psnr"
        ]  # fmt: skip
        assert len(same_kind) == 2  # --matrix: at both test levels of its kind
    for metric in ("psnr", "ssim", "mse", "probe_accuracy", "final_train_loss"):
        values = [float(r["value"]) for r in models if r["metric"] == metric]
        assert values and all(v == v for v in values), metric  # present, not NaN
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == script and len(results["rows"]) == len(rows)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith(f"# {script}") and "**" in markdown
    assert "| " + " | ".join(AXES[script]) + " | noisy PSNR |" in markdown
    for name in FIGURES:
        with Image.open(tmp_path / "figures" / f"{name}.png") as figure:
            assert figure.size[0] > 300 and figure.size[1] > 200
    if flags == CONV:
        assert "model conv (4, 8) x1 with skips" in markdown


def _csv(path):
    with path.open() as file:
        return list(csv.DictReader(file))


def test_pretrain_finetune_quick_run(tmp_path):
    _run_quick("pretrain_finetune", tmp_path, "--label_fractions=0.1,1")
    rows = _csv(tmp_path / "results.csv")
    variants = {r["variant"] for r in rows}
    assert variants == {
        "random init",
        "AE, stacked (level 0)",
        "DAE masking 0.25, stacked",
        "DAE Gaussian 0.3, stacked",
        "AE, end-to-end (level 0)",
        "DAE gaussian 0.5, end-to-end",
    }
    accuracy = [r for r in rows if r["metric"] == "test_accuracy"]
    assert len(accuracy) == len(variants) * 2  # 2 label fractions x 1 seed
    assert {r["label_fraction"] for r in accuracy} == {"0.1", "1.0"}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in accuracy)
    assert max(float(r["value"]) for r in accuracy) > 0.2  # above chance (0.1)
    markdown = (tmp_path / "results.md").read_text()
    assert "| pre-training | 0.1 of labels | 1 of labels |" in markdown and "**" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["fractions"] == [0.1, 1.0]
    for name in ("accuracy_vs_labels", "validation_curves"):
        with Image.open(tmp_path / "figures" / f"{name}.png") as figure:
            assert figure.size[0] > 300 and figure.size[1] > 200


def test_anomaly_quick_run(tmp_path):
    _run_quick("anomaly", tmp_path, "--classes=3,7")
    rows = _csv(tmp_path / "results.csv")
    assert {(r["held_out_class"], r["score"]) for r in rows} == {
        (c, s) for c in ("3", "7") for s in ("reconstruction", "denoised")
    }
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    markdown = (tmp_path / "results.md").read_text()
    assert "| mean over classes |" in markdown and "Hardest classes" in markdown
    with Image.open(tmp_path / "figures" / "roc.png") as figure:
        assert figure.size == (600, 600)
    bad = _quick("anomaly", tmp_path, "--classes=12", timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: --classes=12 is not a class of synthetic (0..9)"
    )


@pytest.mark.parametrize(
    ("script", "flag", "line"),
    [
        (
            "noise_sweep",
            "--seeds=0,x",
            "error: --seeds=0,x is not a list of ints; give e.g. --seeds=0,1,2",
        ),
        (
            "noise_sweep",
            "--config.train.lr=1",
            "error: unknown config key 'train.lr' (--config.train.lr); "
            "--help lists the config keys",
        ),
        (
            "noise_sweep",
            "--config.noise.level=0.3",
            "error: --config.noise.level does not apply here: noise.level is an axis of this "
            "sweep; give its values with --axis=noise.level=V1,V2",
        ),
        (
            "noise_sweep",
            "--config.seed=3",
            "error: --config.seed does not apply here: the seeds are --seeds=0,1,2",
        ),
        (
            "noise_sweep",
            "--levels=0.1,x",
            "error: --axis=noise.level: 'x' is not a float like its default 0.5",
        ),
        (
            "noise_sweep",
            "--learning_rates=-1",
            "error: config optim.learning_rate=-1.0 is invalid: must be a finite number > 0",
        ),
        (
            "corruption_types",
            "--config.noise.kind=masking",
            "error: --config.noise.kind does not apply here: noise.kind is an axis of this "
            "sweep; give its values with --axis=noise.kind=V1,V2",
        ),
        (
            "loss_comparison",
            "--config.loss=bce",
            "error: --config.loss does not apply here: loss is an axis of this sweep; give "
            "its values with --axis=loss=V1,V2",
        ),
        (
            "anomaly",
            "--classes=shirt",
            "error: --classes=shirt is not a list of ints; give e.g. --classes=0,6",
        ),
        (
            "pretrain_finetune",
            "--label_fractions=0.1,abc",
            "error: --label_fractions=0.1,abc is not a list of floats; "
            "give e.g. --label_fractions=0.01,0.1,1",
        ),
        (
            "pretrain_finetune",
            "--label_fractions=0,1",
            "error: --label_fractions: 0 is not a fraction of the labels in (0, 1]; "
            "give e.g. --label_fractions=0.01,0.1,1",
        ),
        (
            "pretrain_finetune",
            "--pretrain_epochs=0",
            "error: --pretrain_epochs=0 must be at least 1",
        ),
        (
            "pretrain_finetune",
            "--finetune_learning_rate=-1",
            "error: --finetune_learning_rate=-1 must be > 0 (or 0 for the config's "
            "optim.learning_rate)",
        ),
        (
            "pretrain_finetune",
            "--val_size=0",
            "error: --val_size=0 must be between 1 and half the training set",
        ),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_script_flags_end_in_one_line(tmp_path, script, flag, line):
    result = run_python(
        f"experiments/{script}.py",
        f"--workdir={tmp_path}",
        "--config.data.name=synthetic",
        f"--config.compile_cache={COMPILE_CACHE}",
        flag,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]


def test_sweep_help_shows_its_own_flags_and_the_config_keys():
    result = run_python("experiments/noise_sweep.py", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--axis", "--levels", "--learning_rates", "--seeds", "--workdir", "--quick"):
        assert flag in result.stdout, flag
    assert "noise_sweep: How does the noise level change" in result.stdout

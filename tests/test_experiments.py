"""Each experiment script's --quick run writes every file it promises, with real numbers."""

import csv
import json
import subprocess

import pytest
from PIL import Image

from tests.conftest import COMPILE_CACHE, run_python

FIGURES = ("quality_vs_level", "train_vs_test_level", "reconstructions", "probe_vs_level")
ARMS = {
    "noise_sweep": {"gaussian/mse"},
    "corruption_types": {"gaussian/mse", "masking/mse", "salt_and_pepper/mse"},
    "loss_comparison": {"gaussian/mse", "gaussian/bce"},
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


@pytest.fixture(scope="module")
def noise_sweep_run(tmp_path_factory):
    """An uninterrupted quick noise sweep."""
    workdir = tmp_path_factory.mktemp("noise_sweep")
    _run_quick("noise_sweep", workdir)
    return workdir


def test_a_killed_sweep_resumes_to_the_same_results(noise_sweep_run, tmp_path):
    """kill -9 while the population trains, then the same command: the sweep continues
    from its checkpoints and stages, and its results.csv is identical to an
    uninterrupted run's; every model is kept and restorable."""
    import os
    import signal
    import sys
    import time

    import dae_jax
    from tests.conftest import REPO

    command = [
        sys.executable, "experiments/noise_sweep.py", f"--workdir={tmp_path}", "--quick",
        "--config.data.name=synthetic", f"--config.compile_cache={COMPILE_CACHE}",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    population = tmp_path / "models" / "gaussian-mse"
    deadline = time.monotonic() + 300
    while not (population / "metrics.jsonl").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (tmp_path / "results.csv").exists()
    _run_quick("noise_sweep", tmp_path)
    assert (tmp_path / "results.csv").read_text() == (noise_sweep_run / "results.csv").read_text()
    run = dae_jax.restore(population, model=1, warn=lambda line: None)
    assert run.config.noise.level == 0.1 and run.config.noise.kind == "gaussian"
    # The same command once more: everything is done, nothing is retrained.
    again = _quick("noise_sweep", tmp_path)
    assert again.returncode == 0, again.stderr
    assert "is already trained for 1 epochs" in again.stdout
    assert (tmp_path / "results.csv").read_text() == (noise_sweep_run / "results.csv").read_text()


@pytest.mark.parametrize(
    ("script", "flags"),
    [(script, ()) for script in sorted(ARMS)] + [("noise_sweep", CONV)],
    ids=[*sorted(ARMS), "noise_sweep-conv"],
)
def test_quick_run_writes_every_promised_file(tmp_path, script, flags, request):
    if script == "noise_sweep" and not flags:
        tmp_path = request.getfixturevalue("noise_sweep_run")  # shared with the resume test
    else:
        _run_quick(script, tmp_path, *flags)
    with (tmp_path / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    models = {r["model"] for r in rows}
    assert ARMS[script] <= models
    assert {"noisy input", "clip", "gaussian_blur", "median_filter", "raw pixels"} <= models
    dae_rows = [r for r in rows if r["model"] in ARMS[script]]
    # --quick: 1 seed x 2 levels per arm; each model scored at both test levels of its kind
    for arm in ARMS[script]:
        scored = {
            (r["train_level"], r["test_level"])
            for r in dae_rows
            if r["model"] == arm and r["metric"] == "psnr"
        }
        assert len(scored) == 4, (arm, scored)
    assert {r["seed"] for r in dae_rows} == {"0"}
    for metric in ("psnr", "ssim", "mse", "probe_accuracy", "final_train_loss"):
        values = [float(r["value"]) for r in dae_rows if r["metric"] == metric]
        assert values and all(v == v for v in values), metric  # present, not NaN
    probes = [float(r["value"]) for r in dae_rows if r["metric"] == "probe_accuracy"]
    assert all(0.1 < p <= 1.0 for p in probes)  # above chance on the synthetic classes

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == script and len(results["rows"]) == len(rows)
    assert len(results["summary"]) == 2 * len(ARMS[script])
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith(f"# {script}") and "**" in markdown
    assert "| model | train = test level |" in markdown
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
            "error: --config.noise.level does not apply here: a sweep sets it per model: "
            "give --levels=0.1,0.5",
        ),
        (
            "noise_sweep",
            "--config.seed=3",
            "error: --config.seed does not apply here: a sweep sets it per model: "
            "give --seeds=0,1,2",
        ),
        (
            "noise_sweep",
            "--levels=0.1,x",
            "error: --levels=0.1,x is not a list of floats; give e.g. --levels=0.1,0.5",
        ),
        (
            "noise_sweep",
            "--learning_rates=-1",
            "error: config optim.learning_rate=-1.0 is invalid: must be a finite number > 0",
        ),
        (
            "corruption_types",
            "--config.noise.kind=masking",
            "error: --config.noise.kind does not apply here: this script trains every noise "
            "kind itself",
        ),
        (
            "loss_comparison",
            "--config.loss=bce",
            "error: --config.loss does not apply here: this script trains both losses itself",
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
    for flag in ("--levels", "--learning_rates", "--seeds", "--workdir", "--quick"):
        assert flag in result.stdout, flag
    assert "--config.noise.kind='gaussian'" in result.stdout


def test_noise_kind_and_learning_rates_take_effect(tmp_path):
    """--config.noise.kind and --learning_rates change what trains, and the record says so."""
    _run_quick(
        "noise_sweep", tmp_path, "--config.noise.kind=masking", "--levels=0.25",
        "--learning_rates=1e-3,1e30",
    )  # fmt: skip
    rows = _csv(tmp_path / "results.csv")
    models = {r["model"] for r in rows if r["train_kind"]}
    assert models == {"masking/mse lr=0.001", "masking/mse lr=1e+30"}
    assert {r["test_kind"] for r in rows if r["metric"] == "psnr"} == {"masking"}
    diverged = [r for r in rows if r["metric"] == "diverged_in_epoch"]
    assert [r["model"] for r in diverged] == ["masking/mse lr=1e+30"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| masking/mse lr=1e+30 (1 diverged, left out) | 0.25 |" in markdown
    text = (tmp_path / "results.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in results.json"))
    settings = json.loads((tmp_path / "sweep.json").read_text())
    assert settings["config"]["noise"]["kind"] == "masking"

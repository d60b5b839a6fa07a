"""Each experiment script's --quick run writes every file it promises, with real numbers."""

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO

FIGURES = ("quality_vs_level", "train_vs_test_level", "reconstructions", "probe_vs_level")
ARMS = {
    "noise_sweep": {"gaussian/mse"},
    "corruption_types": {"gaussian/mse", "masking/mse", "salt_and_pepper/mse"},
    "loss_comparison": {"gaussian/mse", "gaussian/bce"},
}


@pytest.mark.parametrize("script", sorted(ARMS))
def test_quick_run_writes_every_promised_file(tmp_path, script):
    result = subprocess.run(
        [
            sys.executable,
            f"experiments/{script}.py",
            f"--workdir={tmp_path}",
            "--quick",
            "--config.data.name=synthetic",
            "--config.compile_cache=",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
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

"""dae-jax sweep and dae-jax table, in this process: axes, populations, extension,
resume, tidy results, errors. The kill -9 test (subprocesses) is in the slow tier."""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import dae_jax
from dae_jax import step, train
from dae_jax.errors import UserError
from tests.conftest import REPO, TINY_FLAGS, cli_here, tiny_config

# One epoch of the tiny config; BM3D off where a test is not about it (it is slow).
FLAGS = [f for f in TINY_FLAGS if "epochs" not in f] + ["--config.train.epochs=1"]
TARGET = [
    "--axis=model.tied_weights=False,True",
    "--axis=noise.kind=gaussian,masking",
    "--axis=noise.level=0.25",
    "--seeds=0,1",
]


def _rows(workdir):
    with (workdir / "results.csv").open() as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The issue's example: tied x kind x one level x 2 seeds = 8 models."""
    workdir = tmp_path_factory.mktemp("sweep") / "w"
    result = cli_here("sweep", f"--workdir={workdir}", *TARGET, *FLAGS, "--nobm3d")
    assert result.returncode == 0, result.stderr
    return workdir, result


def test_eight_models_train_as_two_programs_into_one_tidy_table(target):
    workdir, result = target
    assert (
        "8 models; 8 to train in 2 new population(s) (one compiled program each)" in result.stdout
    )
    manifest = json.loads((workdir / "sweep.json").read_text())
    # The noise kind is traced: each tied/untied population holds both kinds x 2 seeds.
    assert [len(p["members"]) for p in manifest["populations"]] == [4, 4]
    assert [p["static"] for p in manifest["populations"]] == [{}, {"model.tied_weights": True}]
    rows = _rows(workdir)
    assert list(rows[0])[:5] == ["model", "model.tied_weights", "noise.kind", "noise.level", "seed"]
    models = [r for r in rows if r["seed"]]
    combos = {(r["model.tied_weights"], r["noise.kind"], r["seed"]) for r in models}
    assert len(combos) == 8
    for r in (r for r in models if r["metric"] == "psnr"):
        assert r["test_kind"] == r["noise.kind"] and float(r["test_level"]) == 0.25
        assert 5 < float(r["value"]) < 40
    assert {"noisy input", "clip", "gaussian_blur", "median_filter", "raw pixels"} <= {
        r["model"] for r in rows
    }  # BM3D (off here, for speed): the slow colour sweep and the scripts' quick runs
    probes = [float(r["value"]) for r in models if r["metric"] == "probe_accuracy"]
    assert len(probes) == 8 and all(0.1 < p <= 1 for p in probes)
    markdown = (workdir / "results.md").read_text()
    assert "| model.tied_weights | noise.kind | noise.level | noisy PSNR |" in markdown
    assert "| noise.kind, noise.level | model.tied_weights=False | model.tied_weights=True |" in (
        markdown
    )
    assert " ± " in markdown and "**" in markdown
    for name in ("quality", "probe", "train_vs_test_level", "reconstructions"):
        assert (workdir / "figures" / f"{name}.png").stat().st_size > 10_000
    # Each model is kept, restorable with its own values.
    run = dae_jax.restore(workdir / "models" / "model.tied_weights=True", model=3, warn=print)
    assert run.config.model.tied_weights and run.config.noise.kind == "masking"
    assert run.config.seed == 1
    # evaluate takes a member's own noise kind and level; the level in one spelling
    population = workdir / "models" / "model.tied_weights=True"
    for spelling in ("0.25", "2.5e-1"):
        result = cli_here("evaluate", f"--workdir={population}", "--model=3")
        assert result.returncode == 0, result.stderr
        result = cli_here(
            "evaluate", f"--workdir={population}", "--model=3", f"--noise.level={spelling}"
        )
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (population / "evaluation").iterdir()) == [
        "masking-0.25-model3.json"
    ]
    # TensorBoard tells the runs apart by their axis values.
    assert (
        workdir / "models" / "model.tied_weights=True" / "tensorboard" / "model-3" / "hparams"
    ).is_dir()


@pytest.mark.slow
def test_the_same_command_again_trains_nothing_and_writes_the_same_results(target, tmp_path):
    workdir, _ = target
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    again = cli_here("sweep", f"--workdir={copy}", *TARGET, *FLAGS, "--nobm3d")
    assert again.returncode == 0, again.stderr
    assert "all 8 models are planned already" in again.stdout
    assert "First training step" not in again.stdout
    assert (copy / "results.csv").read_text() == (workdir / "results.csv").read_text()
    # results.md rewritten from the cached stages: the same tables (the header says the time)
    tables = [(w / "results.md").read_text().split("\n\n|", 1)[1] for w in (copy, workdir)]
    assert tables[0] == tables[1]


@pytest.mark.slow
def test_more_values_extend_a_finished_sweep_training_only_the_new_models(target, tmp_path):
    workdir, _ = target
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    more = [a if "noise.level" not in a else "--axis=noise.level=0.25,0.5" for a in TARGET]
    result = cli_here("sweep", f"--workdir={copy}", *more, *FLAGS, "--nobm3d")
    assert result.returncode == 0, result.stderr
    assert (
        "16 models; 8 to train in 2 new population(s) (one compiled program each), the other 8"
        in result.stdout
    )
    assert result.stdout.count("First training step") == 2  # the new populations only
    rows, old = _rows(copy), _rows(workdir)
    levels = {r["noise.level"] for r in rows if r["seed"]}
    assert levels == {"0.25", "0.5"}

    def own_scores(table):
        return {
            (r["model"], r["seed"], r["metric"]): r["value"]
            for r in table
            if r["seed"] and r["noise.level"] == "0.25" and r["test_level"] in ("0.25", "")
        }

    assert own_scores(rows) == own_scores(old)  # the models trained before are the same
    assert "| False | gaussian | 0.5 |" in (copy / "results.md").read_text()


def test_traced_axes_share_one_program_and_weight_decay_takes_effect(tmp_path):
    result = cli_here(
        "sweep", f"--workdir={tmp_path}", "--axis=optim.weight_decay=0,0.5",
        "--axis=optim.learning_rate=1e-3,3e-3", "--seeds=0", "--nobm3d", "--noprobe",
        "--nomatrix", *FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "4 models; 4 to train in 1 new population(s) (one compiled program each)" in result.stdout
    )
    assert result.stdout.count("Training on one device (cpu): 4 models at once") == 1
    kernels = []
    for k in range(4):
        run = dae_jax.restore(tmp_path / "models" / "base", model=k, warn=print)
        kernels.append(float(np.linalg.norm(np.asarray(run.model.encoder[0].kernel[...]))))
    # members: (wd 0, lr 1e-3), (0, 3e-3), (0.5, 1e-3), (0.5, 3e-3): decay shrinks weights
    assert kernels[2] < kernels[0] and kernels[3] < kernels[1]


@pytest.mark.slow
def test_optimizer_options_schedule_and_clipping(tmp_path):
    config = tiny_config(**{"optim.schedule": "cosine", "optim.warmup_steps": 4})
    config.train.epochs = 3
    cosine = train.fit(config, tmp_path / "cosine", log=lambda _: None)
    rates = [r["learning_rate"] for r in cosine.history]
    steps = 3 * (512 // 64)
    expected = [1e-3 * 0.5 * (1 + np.cos(np.pi * (e * 8 - 1 - 4) / (steps - 4))) for e in (1, 2, 3)]
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-9)
    lines = (tmp_path / "cosine" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["learning_rate"] for r in records if r["event"] == "epoch"] == rates
    # The cosine spans the run: resuming with other epochs would change it, and is refused.
    config.train.epochs = 4
    with pytest.raises(UserError, match="schedule spans 3 epochs"):
        train.fit(config, tmp_path / "cosine", log=lambda _: None)

    def moved(clip: float) -> float:
        run = train.fit(
            tiny_config(**{"optim.grad_clip": clip}), tmp_path / f"clip{clip}", log=lambda _: None
        )
        start = step.init_state(tiny_config(), step.key_streams(0).init)[1].params
        deltas = [
            np.abs(np.asarray(a) - np.asarray(b)).max()
            for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(start), strict=True)
        ]
        return float(max(deltas))

    assert moved(1e-12) < 0.1 * moved(0.0)  # a tiny norm: Adam's steps shrink to nothing


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--axis=model.width=1,2"], "--axis=model.width=...: unknown config key 'model.width'"),
        (
            ["--axis=data.train_size=1,2"],
            "--axis=data.train_size=...: data.train_size cannot be a sweep axis",
        ),
        (
            ["--axis=noise.level"],
            "--axis=noise.level is not KEY=V1,V2,...; e.g. --axis=noise.level=0.1,0.5",
        ),
        (
            ["--axis=model.tied_weights=yes"],
            "--axis=model.tied_weights: 'yes' is not a bool like its default False",
        ),
        (
            ["--axis=noise.level=0.1,0.1"],
            "--axis=noise.level=0.1,0.1 repeats a value; give each value once",
        ),
        (
            ["--axis=noise.level=0.1", "--config.noise.level=0.3"],
            "--config.noise.level does not apply here: noise.level is an axis of this sweep",
        ),
        (
            ["--axis=noise.level=0.1", "--plot=x:loss"],
            "--plot=x:loss: give x:KEY[,hue:KEY] with keys among the axes (noise.level)",
        ),
        (["--grid=nonsense"], "--grid=nonsense is neither a grid name"),
        (["--seeds=0", "--seeds=1"], "--seeds is given 2 times"),
        (
            ["--axis=noise.kind=masking", "--axis=noise.level=2"],
            "config noise.level=2.0 is invalid",
        ),
        (["--config.seed=3"], "--config.seed does not apply here: the seeds are --seeds=0,1,2"),
        (
            ["--axis=noise.level=0.1", "--axis=noise.level=0.2"],
            "--axis=noise.level=... is given twice",
        ),
        (["--seeds="], "--seeds is empty; give the seeds, e.g. --seeds=0,1,2"),
        (
            [
                "--axis=model.depth=2,3,4,5",
                "--axis=noise.level=" + ",".join(str(v / 1000) for v in range(1, 1100)),
            ],
            "this sweep has 13188 models; give at least one seed, and at most 4096 models",
        ),
    ],
    ids=lambda v: str(v)[:40],
)
def test_mistakes_end_in_one_line(tmp_path, args, line):
    result = cli_here("sweep", f"--workdir={tmp_path / 'w'}", *args, *FLAGS)
    assert result.returncode == 2, result.stdout
    (got,) = result.stderr.strip().splitlines()
    assert got.startswith("error: ") and line in got, got
    assert not (tmp_path / "w").exists()  # nothing written for a refused command


@pytest.mark.parametrize(
    "given",
    [
        ["--config=seed", "--config.noise.level=0.3"],
        ["--config", "seed", "--config.noise.level", "0.3"],
    ],
)
def test_help_lists_the_keys_of_the_config_given_with_it(given):
    result = cli_here("sweep", *given, "--help", "--nonsense")  # --help wins over a typo
    assert result.returncode == 0, result.stderr
    keys = result.stdout.split("config keys (defaults):")[1]
    assert "--config.data.name='mnist'" in keys and "--config.noise.level=0.3" in keys
    assert "override" not in result.stdout  # the flags list names the flags, not overrides


def test_a_grid_script_refuses_another_grid(tmp_path, capsys):
    from dae_jax import sweep

    argv = ["experiments/noise_sweep.py", f"--workdir={tmp_path / 'w'}", "--grid=loss_comparison"]
    assert sweep.main(argv, script_grid="noise_sweep") == 2
    (got,) = capsys.readouterr().err.strip().splitlines()
    assert got == (
        "error: --grid does not apply here: this script is the noise_sweep grid; "
        "run dae-jax sweep --grid=... for another"
    )
    assert not (tmp_path / "w").exists()


def test_a_sweep_whose_population_cannot_fit_is_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    from dae_jax import engine

    monkeypatch.setattr(engine, "available_memory", lambda: (2**20, "available on this host"))
    workdir = tmp_path / "w"
    result = cli_here("sweep", f"--workdir={workdir}", *TARGET, *FLAGS, "--nobm3d", "--noprobe")
    assert result.returncode == 1
    assert result.stderr.startswith("error: this run needs at least 0.0 GiB (4 model(s) of ")
    assert not workdir.exists()  # no sweep.json promising a population that cannot run


def test_another_base_config_or_an_old_sweep_is_refused(target, tmp_path):
    workdir, _ = target
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    other = cli_here("sweep", f"--workdir={copy}", *TARGET, *FLAGS, "--config.loss=bce")
    assert (
        other.returncode == 2
        and "holds a sweep on another base config (loss: mse -> bce)" in other.stderr
    )
    (copy / "sweep.json").write_text(json.dumps({"experiment": "noise_sweep", "arms": []}))
    old = cli_here("sweep", f"--workdir={copy}", *TARGET, *FLAGS)
    assert old.returncode == 2 and "written by an older dae_jax" in old.stderr


@pytest.mark.slow
def test_a_grid_file_gives_a_union_of_products(tmp_path):
    grid = tmp_path / "kinds.json"
    grid.write_text(json.dumps({
        "union": [{"noise.kind": ["gaussian"], "noise.level": [0.1, 0.3]},
                  {"noise.kind": ["masking"], "noise.level": [0.5]}],
        "score": {"bm3d": False, "probe": False},
    }))  # fmt: skip
    result = cli_here("sweep", f"--workdir={tmp_path / 'w'}", f"--grid={grid}", "--seeds=0", *FLAGS)
    assert result.returncode == 0, result.stderr
    rows = _rows(tmp_path / "w")
    trained = {(r["noise.kind"], r["noise.level"]) for r in rows if r["seed"]}
    assert trained == {("gaussian", "0.1"), ("gaussian", "0.3"), ("masking", "0.5")}
    assert not [r for r in rows if r["model"] in ("bm3d", "raw pixels")]
    # --matrix (the default): each Gaussian model at both Gaussian levels, masking at its own
    scored = {
        (r["noise.level"], r["test_level"]) for r in rows if r["metric"] == "psnr" and r["seed"]
    }
    assert scored == {
        ("0.1", "0.1"),
        ("0.1", "0.3"),
        ("0.3", "0.1"),
        ("0.3", "0.3"),
        ("0.5", "0.5"),
    }


@pytest.mark.slow
def test_a_model_that_diverges_is_left_out_and_said_so(tmp_path):
    result = cli_here(
        "sweep", f"--workdir={tmp_path}", "--levels=0.25", "--learning_rates=1e-3,1e30",
        "--seeds=0", "--nobm3d", "--noprobe", *FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    diverged = [r for r in _rows(tmp_path) if r["metric"] == "diverged_in_epoch"]
    assert [r["optim.learning_rate"] for r in diverged] == ["1e+30"]
    assert "| 0.25 | 1e+30 (1 of 1 diverged, left out) |" in (tmp_path / "results.md").read_text()
    json.loads(
        (tmp_path / "results.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"bare {name} in results.json"),
    )


def test_table_combines_sweeps_and_train_runs_by_their_config_differences(
    target, tiny_run, tmp_path
):
    workdir, _ = target
    out = tmp_path / "all.csv"
    result = cli_here("table", str(workdir), str(tiny_run.workdir), f"--csv={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("9 models in 2 workdir(s)")
    header = next(line for line in result.stdout.splitlines() if line.startswith("| "))
    for key in ("model.tied_weights", "noise.kind", "noise.level", "train.epochs"):
        assert key in header, header
    lines = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(lines) == 1 + 5  # header, 4 sweep combinations (2 seeds each), the train run
    with out.open() as file:
        assert len(list(csv.DictReader(file))) == 9
    twice = cli_here("table", str(workdir), str(workdir / "models"))
    assert twice.stdout.startswith("8 models in 2 workdir(s)")  # each run counted once
    empty = cli_here("table", str(tmp_path))
    assert empty.returncode == 2 and "holds no trained run" in empty.stderr


@pytest.mark.slow
def test_kill_9_at_five_random_moments_then_resume_gives_the_same_results(tmp_path):
    """A 2-population sweep (a static axis) killed at 5 random moments, each time resumed
    by the same command: its results.csv is byte for byte an uninterrupted run's."""
    args = [
        sys.executable, "-m", "dae_jax", "sweep", "--axis=model.tied_weights=False,True",
        "--axis=noise.level=0.2,0.4", "--seeds=0", "--nobm3d", *FLAGS,
    ]  # fmt: skip
    clean = subprocess.run(
        [*args, f"--workdir={tmp_path / 'clean'}"], cwd=REPO, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    for _ in range(5):
        process = subprocess.Popen(
            [*args, f"--workdir={workdir}"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(2.0, 25.0))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    final = subprocess.run(
        [*args, f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr
    assert (workdir / "results.csv").read_text() == (tmp_path / "clean" / "results.csv").read_text()


@pytest.mark.parametrize("command", ["sweep", "table", "bench"])
def test_help_of_the_commands_that_parse_their_own_flags(command):
    for args in (("help", command), (command, "--help")):
        result = cli_here(*args)
        assert result.returncode == 0, result.stderr
        assert f"dae-jax {command}" in result.stdout and "--" in result.stdout
    if command == "sweep":
        assert "noise_sweep:" in result.stdout and "--axis" in result.stdout


@pytest.mark.parametrize("name", ["noise_sweep", "corruption_types", "loss_comparison"])
def test_the_committed_sweep_results_are_what_the_writer_makes_of_their_rows(
    name, tmp_path, monkeypatch
):
    """results.csv and results.md's tables, written again from the committed results.json
    (its rows and members), are the committed files: a change to the writer keeps the
    committed results valid, or regenerates them."""
    import ml_collections

    from dae_jax import sweep

    directory = REPO / "experiments" / "results" / name
    saved = json.loads((directory / "results.json").read_text())

    def typed(value):  # JSON has lists where the config has tuples
        return tuple(value) if isinstance(value, list) else value

    specs = [
        sweep.Spec(tuple((k, typed(v)) for k, v in m["values"].items()), m["seed"])
        for m in saved["members"]
    ]
    own = {spec.values: m["test"] for spec, m in zip(specs, saved["members"], strict=True)}
    monkeypatch.setattr(sweep, "figures", lambda *args: None)
    sweep.write(
        tmp_path, saved["experiment"], ml_collections.ConfigDict(saved["config"]), saved["axes"],
        specs, own, [sweep._numbers_back(r) for r in saved["rows"]], saved["score"],
        saved["plot"], saved["command"], time.perf_counter(),
    )  # fmt: skip
    assert (tmp_path / "results.csv").read_text() == (directory / "results.csv").read_text()
    tables = [(d / "results.md").read_text().split("\n\n|", 1)[1] for d in (tmp_path, directory)]
    assert tables[0] == tables[1]

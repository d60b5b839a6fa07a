"""Issue 21: no traceback reaches a user and no value is silently changed.

The crash guard of every entry point (one line + a crash log, Ctrl-C, third-party
logging, unencodable output), strict flags and config, resume truths, nothing written
before the inputs are known good, BM3D workers from a plain script, and a few cases of
``experiments/attack.py``. In-process (``cli.main``) where possible.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dae_jax import checkpointing, cli, configs, guard, inference, report, runfiles, train
from dae_jax.configs import default
from dae_jax.errors import UserError
from tests.conftest import DAE_JAX, REPO, TINY_FLAGS, run_python, tiny_config


def tiny_flags(**values: object) -> list[str]:
    """TINY_FLAGS with some keys set otherwise (``train__epochs=3``): each key once."""
    given = {key.replace("__", "."): value for key, value in values.items()}
    kept = [f for f in TINY_FLAGS if f[len("--config.") :].split("=")[0] not in given]
    return [*kept, *(f"--config.{key}={value}" for key, value in given.items())]


def run_main(capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["dae-jax", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.fixture
def temp(tmp_path, monkeypatch) -> Path:
    """The temporary directory crash reports fall back to."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture
def fit(monkeypatch):
    """Replaces training with ``fit.action(config, workdir)``; records the config."""

    class Fit:
        seen: list = []

        @staticmethod
        def action(config, workdir):
            return None

    def fake(config, workdir):
        Fit.seen.append((config, workdir))
        return Fit.action(config, workdir)

    monkeypatch.setattr(train, "fit", fake)
    return Fit


# ------------------------------------------------------------------ the crash guard


def _raise(error):
    def action(config, workdir):
        raise error

    return action


def test_an_unexpected_exception_is_one_line_naming_a_crash_log(tmp_path, temp, capsys, fit):
    fit.action = _raise(RuntimeError("kaboom\nsecond line"))
    workdir = tmp_path / "w"
    code, lines, _ = run_main(capsys, "train", f"--workdir={workdir}", *TINY_FLAGS)
    assert code == 1 and len(lines) == 1, lines
    [report_file] = temp.glob("dae_jax-crash-*.txt")  # no workdir yet: a temporary file
    assert lines[0] == (
        "error: dae-jax train failed unexpectedly while starting the run (RuntimeError: "
        "kaboom); this is not a mistake in your input: the full traceback is in "
        f"{report_file}"
    )
    text = report_file.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: kaboom" in text
    assert not workdir.exists()

    workdir.mkdir()  # a workdir that exists takes the report
    code, lines, _ = run_main(capsys, "train", f"--workdir={workdir}", *TINY_FLAGS)
    [report_file] = (workdir / "logs").glob("crash-*.txt")
    assert code == 1 and lines[0].endswith(f"the full traceback is in {report_file}")


@pytest.mark.parametrize(
    ("error", "start"),
    [
        (MemoryError(), "error: out of memory while starting the run (MemoryError); use a"),
        (
            RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 TB"),
            "error: out of memory while starting the run (RuntimeError: RESOURCE_EXHAUSTED",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "W/metrics.jsonl"),
            "error: no space left on the device while starting the run (No space left on "
            "device: W/metrics.jsonl); free disk space",
        ),
        (
            OSError(errno.ELOOP, "Too many levels of symbolic links", "W/a"),
            "error: W/a is a symbolic link that loops",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "W/x"),
            "error: cannot write W/x while starting the run (Read-only file system)",
        ),
    ],
    ids=["memory", "xla-oom", "disk-full", "loop", "read-only"],
)
def test_failures_of_the_machine_are_one_line_saying_what_to_do(
    tmp_path, temp, capsys, fit, error, start
):
    fit.action = _raise(error)
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(start), lines
    assert "the full traceback is in" in lines[0]


def test_ctrl_c_says_where_it_stopped(tmp_path, temp, capsys, fit):
    fit.action = _raise(KeyboardInterrupt())
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS)
    assert (code, lines) == (
        130,
        ["error: dae-jax train interrupted while starting the run; nothing was written"],
    )


def test_sigterm_outside_training_stops_in_one_line(tmp_path, temp, capsys, fit):
    fit.action = lambda config, workdir: os.kill(os.getpid(), signal.SIGTERM)
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS)
    assert (code, lines) == (
        143,
        ["error: dae-jax train stopped by SIGTERM while starting the run; nothing was written"],
    )


def test_a_user_error_keeps_its_line_and_code(tmp_path, capsys, fit):
    fit.action = _raise(UserError("you did X; do Y", exit_code=1))
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS)
    assert (code, lines) == (1, ["error: you did X; do Y"])


def test_third_party_logging_goes_to_the_workdir_log_unless_verbose(tmp_path, capsys, fit):
    workdir = tmp_path / "w"

    def noisy(config, workdir):
        runfiles.prepare_workdir(Path(workdir))
        from absl import logging as absl_logging

        absl_logging.error("orbax: something in a background thread")
        logging.getLogger("asyncio").error("Task exception was never retrieved")

        def fail():
            raise ValueError("a background thread's own traceback")

        thread = threading.Thread(target=fail, name="orbax-thread")
        thread.start()
        thread.join()
        print("ordinary output")

    fit.action = noisy
    code, lines, out = run_main(capsys, "train", f"--workdir={workdir}", *TINY_FLAGS)
    assert (code, lines, out) == (0, [], "ordinary output\n")
    [log] = (workdir / "logs").glob("train-*.log")
    text = log.read_text()
    assert "orbax: something in a background thread" in text
    assert "Task exception was never retrieved" in text
    assert "ValueError: a background thread's own traceback" in text

    code, lines, _ = run_main(capsys, "train", f"--workdir={workdir}", "--verbose", *TINY_FLAGS)
    assert code == 0 and any("orbax: something" in line for line in lines)
    assert logging.getLogger().handlers == [] or not any(
        isinstance(h, guard._Handler) for h in logging.getLogger().handlers
    )  # restored after an in-process call


def test_output_the_terminal_cannot_encode_is_escaped(tmp_path, monkeypatch, fit):
    raw_out, raw_err = io.BytesIO(), io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw_out, encoding="ascii"))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw_err, encoding="ascii"))
    fit.action = lambda config, workdir: print("café \u2011 done")
    code = cli.main(["dae-jax", "train", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS])
    sys.stdout.flush()
    assert code == 0
    assert raw_out.getvalue() == b"caf\\xe9 \\u2011 done\n"
    assert sys.stdout.errors == "strict"  # restored after an in-process call


def test_the_excepthook_makes_an_uncaught_exception_one_line(temp, capsys, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    guard.install_excepthook()
    try:
        raise ImportError("no module named bm3d")
    except ImportError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "ImportError: no module named bm3d" in line
    assert "the full traceback is in" in line and "Traceback" not in line


@pytest.mark.slow
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path):
    """A subprocess interrupted at several moments of its start: one line, exit 130,
    never a traceback (a KeyboardInterrupt inside an extension's import can crash
    Python: the start-up handler ends the process instead)."""
    for delay in (0.3, 1.0, 2.5):
        process = subprocess.Popen(
            [*DAE_JAX, "train", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        if process.returncode == 0:
            continue  # it finished first
        lines = err.strip().splitlines()
        assert process.returncode == 130 and len(lines) == 1, err
        assert "Traceback" not in err
        if lines[0].startswith("stopped by SIGINT in epoch 1"):  # training had begun (a
            assert "checkpoint saved in" in lines[0]  # fast machine, a warm compile cache)
            shutil.rmtree(tmp_path / "w")
            continue
        assert " interrupted while " in lines[0]
        assert not (tmp_path / "w").exists()


# --------------------------------------------------------------- strict flags and config


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--config.model.hidden=(64,32)", "--config.model.hidden=(16,)"],
            "--config.model.hidden is given 2 times (--config.model.hidden=(64,32), "
            "--config.model.hidden=(16,)); give each flag once (a repeated flag is refused, "
            "not combined or overridden)",
        ),
        (
            ["--config.train.epochs", "3", "--config.train.epochs=4"],
            "--config.train.epochs is given 2 times (--config.train.epochs, "
            "--config.train.epochs=4); give each flag once (a repeated flag is refused, not "
            "combined or overridden)",
        ),
        (
            ["--config=seed", "--config=default"],
            "--config is given 2 times (--config=seed, --config=default); give each flag once "
            "(a repeated flag is refused, not combined or overridden)",
        ),
    ],
    ids=["list", "scalar", "config"],
)
def test_a_flag_given_twice_is_refused(tmp_path, capsys, fit, args, line):
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", *args)
    assert (code, lines) == (2, [f"error: {line}"])
    assert fit.seen == [] and not (tmp_path / "w").exists()


def test_a_refused_command_in_process_leaves_ctrl_c_as_it_was(tmp_path, capsys):
    """In a notebook or a script, a command that ends in a user error must not leave its
    start-up handler behind (it would end the Python session at the next Ctrl-C)."""
    before = signal.getsignal(signal.SIGINT)
    code, _, _ = run_main(capsys, "train", f"--workdir={tmp_path}", "--config.seed=-1")
    assert code == 2 and signal.getsignal(signal.SIGINT) is before


def test_repeated_flags_of_evaluate_and_denoise(capsys):
    code, lines, _ = run_main(
        capsys, "denoise", "--workdir=W", "--output=o", "--invert", "--noinvert", "a.png"
    )
    assert code == 2 and lines[0].startswith("error: --invert is given 2 times")
    code, lines, _ = run_main(
        capsys, "evaluate", "--workdir=W", "--noise.level=0.1", "--noise.level=0.2"
    )
    assert code == 2 and lines[0].startswith("error: --noise.level is given 2 times")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--workdir", "--config=seed"], "--workdir needs a value (the next argument is the "
         "flag --config=seed); give --workdir=VALUE"),
        (["--config=seed", "--workdir"], "--workdir needs a value (nothing follows it); "
         "give --workdir=VALUE"),
        (["--workdir= "], "--workdir=' ' is blank; give the directory the run writes to"),
        (["--workdir="], "--workdir is required: the directory the run writes to"),
    ],
    ids=["swallows", "last", "blank", "empty"],
)  # fmt: skip
def test_a_missing_or_blank_workdir_is_refused(tmp_path, monkeypatch, capsys, fit, args, line):
    monkeypatch.chdir(tmp_path)
    code, lines, _ = run_main(capsys, "train", *args)
    assert (code, lines) == (2, [f"error: {line}"])
    assert fit.seen == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "line"),
    [
        (
            "--config.compile_cache=/proc/nope",
            "config compile_cache='/proc/nope' is invalid: must be \"\" (no cache) or a "
            "directory this user can create and write to",
        ),
        (
            "--config.profile_steps=-1",
            "config profile_steps=-1 is invalid: must be an integer >= 0 (0 = off)",
        ),
        (
            "--config.noise.level=1e39",
            "config noise.level=1e+39 is invalid: the Gaussian noise's standard deviation "
            "must be a finite number >= 0",
        ),
        (
            "--config.optim.learning_rate=1e39",
            "config optim.learning_rate=1e+39 is invalid: must be a finite number > 0",
        ),
    ],
    ids=["cache", "profile", "level-float32", "lr-float32"],
)
def test_values_that_would_not_be_used_are_refused(tmp_path, capsys, fit, flag, line):
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", flag)
    assert (code, lines) == (2, [f"error: {line}"])
    assert fit.seen == [] and not (tmp_path / "w").exists()


def test_the_compile_cache_probe_leaves_nothing(tmp_path):
    config = tiny_config(compile_cache=str(tmp_path / "new" / "cache"))
    configs.validate(config)
    assert list(tmp_path.iterdir()) == []  # checked, not created
    (tmp_path / "file").write_text("x")
    config.compile_cache = str(tmp_path / "file" / "cache")
    with pytest.raises(UserError, match="compile_cache="):
        configs.validate(config)


def _past_run(tmp_path: Path) -> Path:
    """A workdir with a run's resolved config.json (as engine writes it)."""
    config = tiny_config(**{"model.hidden": (48, 24), "noise.level": 0.3})
    config.data.image_shape = (28, 28, 1)
    workdir = tmp_path / "past"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(checkpointing.plain(config), indent=2))
    return workdir


@pytest.mark.parametrize("spec", ["dir", "file"])
def test_a_past_runs_config_is_repeated_or_varied(tmp_path, capsys, fit, spec):
    past = _past_run(tmp_path)
    given = past if spec == "dir" else past / "config.json"
    code, lines, _ = run_main(
        capsys, "train", f"--workdir={tmp_path / 'new'}", f"--config={given}",
        "--config.train.epochs=5",
    )  # fmt: skip
    assert (code, lines) == (0, [])
    [(config, _)] = fit.seen
    assert config.model.hidden == (48, 24) and config.noise.level == 0.3
    assert config.train.epochs == 5 and config.data.name == "synthetic"
    assert config.data.image_shape == ()  # read from the data again


def test_a_config_json_that_is_not_a_config_is_one_line(tmp_path, capsys, fit):
    bad = tmp_path / "config.json"
    bad.write_text('{"model": {"hidden": [8], "nope": 1}}')
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", f"--config={bad}")
    assert code == 2 and lines == [
        f"error: --config={bad} has the key model.nope, which this dae_jax does not know; "
        "remove it from the file (the keys are listed in dae_jax/configs/default.py)"
    ]
    bad.write_text("false")
    code, lines, _ = run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", f"--config={bad}")
    assert code == 2 and lines == [
        f"error: --config={bad} is not a run's config.json (a JSON object of config keys)"
    ]


def test_quick_fills_only_what_the_command_line_did_not_set():
    def quick(config):
        config.data.train_size, config.train.epochs = 1024, 1

    config = default.get_config()
    config.train.epochs = 3  # as --config.train.epochs=3 set it
    said: list[str] = []
    seeds = report.apply_quick(
        quick, config, ["x", "--config.train.epochs=3"], [0, 1, 2], seeds_given=False,
        say=said.append,
    )  # fmt: skip
    assert (config.train.epochs, config.data.train_size, seeds) == (3, 1024, [0])
    assert said == ["--quick set data.train_size=1024, seeds=0 (kept what you gave: "
                    "train.epochs=3)"]  # fmt: skip
    said.clear()
    seeds = report.apply_quick(quick, default.get_config(), ["x"], [4, 5], seeds_given=True,
                               say=said.append)  # fmt: skip
    assert seeds == [4, 5] and said[0].endswith("(kept what you gave: seeds=4,5)")


# ----------------------------------------------------------------------- resume truths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run trained for 2 epochs (copy it before changing it)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.fit(tiny_config(**{"train.epochs": 2}), workdir, log=lambda line: None)
    return workdir


def _copy(trained: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_a_resume_never_cuts_a_run_back_and_its_last_line_is_true(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    before = (workdir / "config.json").read_bytes(), (workdir / "summary.json").read_bytes()
    with pytest.raises(UserError) as refused:
        train.fit(tiny_config(**{"train.epochs": 1}), workdir, log=lambda line: None)
    assert str(refused.value) == (
        f"--workdir={workdir} holds a run trained for 2 epochs; --config.train.epochs=1 would "
        "cut it back: give --config.train.epochs=2 or more to resume it, or use a new --workdir"
    )
    assert before == (
        (workdir / "config.json").read_bytes(),
        (workdir / "summary.json").read_bytes(),
    )

    lines: list[str] = []
    train.fit(tiny_config(**{"train.epochs": 3}), workdir, log=lines.append)
    assert not any("already trained" in line for line in lines)  # it just trained epoch 3
    assert any(line.startswith("Done.") for line in lines)
    lines.clear()
    train.fit(tiny_config(**{"train.epochs": 3}), workdir, log=lines.append)
    assert any("is already trained for 3 epochs" in line for line in lines)


def test_a_run_without_config_json_takes_its_checkpoints_config(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    written = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").unlink()
    assert checkpointing.plain(checkpointing.load_config(workdir)) == written


def test_a_reader_does_not_call_a_running_save_interrupted(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    (workdir / "checkpoints" / "24.orbax-checkpoint-tmp-1").mkdir()
    said: list[str] = []
    with runfiles.WorkdirLock(workdir):  # a train is running there
        checkpointing.Checkpoints(workdir / "checkpoints", read_only=True, warn=said.append)
    assert said == []
    checkpointing.Checkpoints(workdir / "checkpoints", read_only=True, warn=said.append)
    assert said == [
        "warning: skipping unfinished checkpoint 24.orbax-checkpoint-tmp-1 (its save was "
        "interrupted)"
    ]


def _experiment_root(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for name in ("gaussian-mse", "masking-mse"):
        (root / "models" / name / "checkpoints").mkdir(parents=True)
        (root / "models" / name / "config.json").write_text("{}")
    (root / "sweep.json").write_text("{}")
    return root


def test_train_refuses_an_experiments_workdir_and_evaluate_lists_its_models(tmp_path, capsys):
    root = _experiment_root(tmp_path)
    code, lines, _ = run_main(capsys, "train", f"--workdir={root}", *TINY_FLAGS)
    models = f"{root}/models/gaussian-mse, {root}/models/masking-mse"
    assert (code, lines) == (
        1,
        [
            f"error: --workdir={root} is an experiment's workdir (it holds sweep.json), not a "
            f"single run; its models are {models}: to train a run of your own use a new "
            "--workdir"
        ],
    )
    code, lines, _ = run_main(capsys, "evaluate", f"--workdir={root}")
    assert (code, lines) == (
        1,
        [
            f"error: {root} is an experiment's workdir: its models are in {models}; evaluate "
            f"one of them: dae-jax evaluate --workdir={root}/models/gaussian-mse --model=K "
            "(K: see its population.json)"
        ],
    )
    assert sorted(p.name for p in root.iterdir()) == ["models", "sweep.json"]


# ------------------------------------------------- nothing written before inputs are good


def test_a_config_error_found_while_loading_data_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "w"
    code, lines, _ = run_main(
        capsys, "train", f"--workdir={workdir}",
        *tiny_flags(data__name="folder", data__local_dir=tmp_path / "no-such-folder"),
    )  # fmt: skip
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert not workdir.exists()


def test_a_failure_before_the_first_checkpoint_removes_the_workdir_it_made(tmp_path, capsys):
    workdir = tmp_path / "new" / "w"  # its parent is new too
    code, lines, _ = run_main(
        capsys, "train", f"--workdir={workdir}", *tiny_flags(train__batch_size=100000)
    )
    assert code == 2 and lines[0].startswith("error: train.batch_size=100000 is larger than")
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_through_a_looping_link_is_one_line(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    workdir = tmp_path / "loop" / "w"
    code, lines, _ = run_main(capsys, "train", f"--workdir={workdir}", *TINY_FLAGS)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: --workdir={workdir} cannot be resolved (")
    assert lines[0].endswith("a symbolic link in it loops or is broken; give another directory")


def test_checkpoints_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("")
    (workdir / "checkpoints").write_text("mine")
    code, lines, _ = run_main(capsys, "train", f"--workdir={workdir}", *TINY_FLAGS)
    assert (code, lines) == (
        1,
        [
            f"error: {workdir / 'checkpoints'} is not a directory; move it away (a run keeps "
            "its checkpoints there) and run the same command again"
        ],
    )
    assert (workdir / "checkpoints").read_text() == "mine"


class _Saved:
    directory = Path("W/checkpoints")

    def steps(self):
        return [8]

    def path(self, step):
        return self.directory / str(step)


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "free disk space (or move the workdir)"),
        (OSError(errno.ENOTDIR, "Not a directory"), "check that W/checkpoints is a directory"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), "check that W/checkpoints"),
    ],
    ids=["full", "not-a-directory", "removed"],
)
def test_a_failed_save_advises_what_fits_its_cause(error, advice):
    message = str(checkpointing.Checkpoints._save_failed(_Saved(), 16, error))  # type: ignore[arg-type]
    assert message.startswith("cannot save checkpoint 16 in W/checkpoints (")
    assert f"the last good one is W/checkpoints/8; {advice}" in message


def test_processes_of_one_run_prepare_its_workdir_at_once(tmp_path):
    """The processes of a multi-process run prepare the same new workdir together (a
    shared write probe made one fail: 'not writable (No such file or directory)')."""
    import threading

    for attempt in range(10):
        workdir = tmp_path / f"w{attempt}"
        errors: list[Exception] = []

        def prepare(workdir=workdir, errors=errors) -> None:
            try:
                runfiles.prepare_workdir(workdir)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=prepare) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert sorted(p.name for p in workdir.iterdir()) == ["figures"]  # no probe left


def test_an_existing_workdir_is_never_rolled_back(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    runfiles.prepare_workdir(workdir)
    assert not runfiles.roll_back(workdir) and (workdir / "figures").is_dir()


# ----------------------------------------------------------------------- the BM3D pool


@pytest.mark.slow
def test_bm3d_workers_from_a_script_without_a_main_guard(tmp_path):
    pytest.importorskip("bm3d")
    script = tmp_path / "plain.py"
    script.write_text(
        "import numpy as np\n"
        "from dae_jax import baselines\n"
        "print('top level ran')\n"
        "images = np.random.default_rng(0).random((4, 16, 16, 1)).astype(np.float32)\n"
        "with baselines.bm3d_pool(4, workers=2) as pool:\n"
        "    out = baselines.bm3d_denoise(images, 0.1, pool=pool)\n"
        "print('same', bool((out == baselines.bm3d_denoise(images, 0.1)).all()))\n"
    )
    result = run_python(str(script), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["top level ran", "same True"]  # once, not per worker


# ----------------------------------------------------- orbax's leftovers after damage


class _Unraisable:
    def __init__(self, obj, error):
        self.object, self.exc_value, self.exc_type = obj, error, type(error)
        self.exc_traceback, self.err_msg = error.__traceback__, None


async def _read_array_index_and_device_put():  # named as orbax's
    pass


def test_orbaxs_leftovers_are_recognised_and_nothing_else():
    coroutine = _read_array_index_and_device_put()
    coroutine.close()

    def call_soon_threadsafe():
        raise RuntimeError("Event loop is closed")

    try:
        call_soon_threadsafe()
    except RuntimeError as e:
        closed = e
    assert checkpointing._orbax_leftover(_Unraisable(coroutine, ValueError("x")))
    assert checkpointing._orbax_leftover(_Unraisable(None, closed))
    assert not checkpointing._orbax_leftover(
        _Unraisable(None, RuntimeError("Event loop is closed"))
    )
    assert not checkpointing._orbax_leftover(_Unraisable(len, ValueError("mine")))


# ------------------------------------------------------------------ experiments/attack.py


@pytest.mark.slow
def test_attack_cases_are_clean(tmp_path):
    result = run_python(
        "experiments/attack.py", f"--workdir={tmp_path}",
        "--cases=repeated_list_flag,compile_cache_proc,sigint_while_importing", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean 3" in result.stdout


def test_evaluate_and_train_leave_hooks_as_they_were(tmp_path, capsys, monkeypatch, fit):
    hooks = threading.excepthook, sys.unraisablehook, signal.getsignal(signal.SIGINT)
    run_main(capsys, "train", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS)
    monkeypatch.setattr(inference, "evaluate_workdir", lambda *a, **k: None)
    run_main(capsys, "evaluate", f"--workdir={tmp_path / 'w'}")
    assert hooks == (threading.excepthook, sys.unraisablehook, signal.getsignal(signal.SIGINT))

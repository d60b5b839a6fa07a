"""Tries the ways a careless user, a scheduler or a full disk break a run, and counts
what happened (issue 21).

    python experiments/attack.py --workdir=runs/attack [--cases=NAME,...] [--all]
                                 [--jobs=2] [--timeout=120] [--list]

Each case runs ``dae-jax`` (``python -m dae_jax``), an experiment script or a Python
API snippet in a subprocess against a temporary directory under ``W`` (kills, signals,
damaged files, full / read-only / looping paths, odd encodings, repeated flags,
overflowing numbers, wrong shapes) and is classed by what it left:

- ``hang``: it ran past ``--timeout`` seconds;
- ``traceback``: a Python traceback (or a crash, or noise: more than one line) reached
  the terminal;
- ``data loss``: something a run had written (a checkpoint, a record) is gone or cut back;
- ``silent wrong``: it did something other than what was asked, or recorded something
  other than what it did, without saying so (exit 0 where a refusal was due, a value
  changed, a false last line, files written before the inputs were known good);
- ``wrong exit``: it refused in one clean line what should have worked;
- ``clean``: what was asked happened, or one line said why not.

It prints one line per case and the counts per class, writes ``W/attack.json``, and
exits 1 unless every case is clean. The default set (about 35 cases) takes ~4 minutes
on 2 CPU cores; ``--all`` adds the slow ones (a quick sweep with ``--quick``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

flags.DEFINE_string("workdir", None, "Directory for the cases' files.", required=True)
flags.DEFINE_list("cases", [], "Cases to run (default: all but the slow ones).")
flags.DEFINE_bool("all", False, "Also run the slow cases.")
flags.DEFINE_bool("list", False, "List the cases and exit.")
flags.DEFINE_integer("jobs", 2, "Cases run at once.")
flags.DEFINE_integer("timeout", 120, "Seconds after which a case counts as a hang.")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("clean", "traceback", "silent wrong", "data loss", "hang", "wrong exit")


@dataclasses.dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float
    hung: bool = False


@dataclasses.dataclass
class Outcome:
    case: str
    kind: str
    detail: str
    seconds: float = 0.0


@dataclasses.dataclass
class Context:
    root: Path  # W
    base: Path  # a trained tiny run (2 epochs), never written to by the cases
    cache: Path  # the compile cache the cases share
    timeout: int

    def dir(self, case: str) -> Path:
        path = self.root / "cases" / case
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def tiny(self, **values: Any) -> list[str]:
        """The flags of a config that trains in seconds, ``values`` set otherwise."""
        keys = {
            "compile_cache": self.cache,
            "data.name": "synthetic",
            "data.train_size": 512,
            "data.test_size": 96,
            "model.hidden": "(64,32,16)",
            "train.epochs": 2,
            "train.batch_size": 64,
            "train.log_every": 3,
            "eval.batch_size": 64,
            "eval.num_figure_images": 5,
        }
        keys.update({k.replace("__", "."): v for k, v in values.items()})
        return [f"--config.{key}={value}" for key, value in keys.items()]

    def copy_base(self, case: str) -> Path:
        target = self.dir(case) / "run"
        shutil.copytree(self.base, target, ignore=shutil.ignore_patterns("logs", ".lock"))
        return target


def run(
    ctx: Context,
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    limits: Callable[[], None] | None = None,
    signals: Sequence[tuple[float, int]] = (),
    close_stdout_after: int | None = None,
) -> Result:
    """Runs ``python ARGS``; ``signals``: (seconds after the start, signal) to send.
    The child starts with SIGINT's default action, as a terminal gives it, even when this
    harness runs in the background (``cmd &`` ignores SIGINT, and children inherit that)."""

    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limits is not None:
            limits()

    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=cwd or REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=prepare,
    )
    timeout = timeout or ctx.timeout
    if close_stdout_after is not None:  # `dae-jax ... | head -n N`
        assert process.stdout is not None
        for _ in range(close_stdout_after):
            process.stdout.readline()
        process.stdout.close()
    for at, signum in signals:
        time.sleep(max(0.0, started + at - time.perf_counter()))
        if process.poll() is None:
            process.send_signal(signum)
    try:
        if close_stdout_after is not None:
            assert process.stderr is not None
            process.wait(timeout)
            out, err = b"", process.stderr.read()
        else:
            out, err = process.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        hung = True
    decode = lambda b: (b or b"").decode("utf-8", "replace")  # noqa: E731
    return Result(process.returncode, decode(out), decode(err), time.perf_counter() - started, hung)


def cli(ctx: Context, *args: Any, **kwargs: Any) -> Result:
    return run(ctx, ["-m", "dae_jax", *args], **kwargs)


def judge(
    case: str,
    result: Result,
    *,
    rc: int | set[int] | None = None,
    checks: Sequence[tuple[bool, str, str]] = (),
    lines: int = 1,
    killed: bool = False,
) -> Outcome:
    """The class of ``result``: hang, traceback (or noise), the first failing check's
    class, an exit code other than ``rc``, else clean. ``lines``: error/warning lines
    stderr may have; ``killed``: a negative exit code is ours (a kill)."""
    text = result.out + result.err
    errors = [line for line in result.err.splitlines() if line.strip()]
    if result.hung:
        return Outcome(case, "hang", f"ran past {result.seconds:.0f} s", result.seconds)
    if "Traceback (most recent call last)" in text or "Fatal Python error" in text:
        first = next((line for line in errors if "Error" in line), errors[-1] if errors else "")
        return Outcome(case, "traceback", first[:160], result.seconds)
    if result.rc is not None and result.rc < 0 and not killed:
        return Outcome(case, "traceback", f"died of signal {-result.rc}", result.seconds)
    if len(errors) > lines:
        return Outcome(case, "traceback", f"{len(errors)} lines on stderr: {errors[0][:100]}")
    for ok, kind, detail in checks:
        if not ok:
            return Outcome(case, kind, detail, result.seconds)
    wanted = {rc} if isinstance(rc, int) else rc
    if wanted is not None and result.rc not in wanted:
        kind = "silent wrong" if result.rc == 0 else "wrong exit"
        line = errors[-1] if errors else ""
        return Outcome(case, kind, f"exit {result.rc}, wanted {sorted(wanted)}: {line[:120]}")
    return Outcome(case, "clean", (errors[-1] if errors else "ok")[:160], result.seconds)


def refused(case: str, result: Result, workdir: Path | None = None, rc: int = 2) -> Outcome:
    """A case that must be refused in one line, writing nothing at ``workdir``."""
    checks = []
    if workdir is not None:
        checks.append((not workdir.exists(), "silent wrong", f"{workdir.name} was written"))
    checks.append((result.err.startswith("error: "), "silent wrong", "no error line"))
    return judge(case, result, rc=rc, checks=checks)


CASES: dict[str, Callable[[Context], Outcome]] = {}
SLOW: set[str] = set()


def case(slow: bool = False) -> Callable[[Callable[[Context], Outcome]], Callable]:
    def register(function: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
        CASES[function.__name__] = function
        if slow:
            SLOW.add(function.__name__)
        return function

    return register


# ------------------------------------------------------------------ flags and config


@case()
def repeated_list_flag(ctx: Context) -> Outcome:
    w = ctx.dir("repeated_list_flag") / "w"
    flags_ = [f for f in ctx.tiny() if "model.hidden" not in f]
    result = cli(
        ctx,
        "train",
        f"--workdir={w}",
        *flags_,
        "--config.model.hidden=(64,32)",
        "--config.model.hidden=(16,)",
    )
    return refused("repeated_list_flag", result, w)


@case()
def repeated_scalar_flag(ctx: Context) -> Outcome:
    w = ctx.dir("repeated_scalar_flag") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(), "--config.train.epochs=5")
    return refused("repeated_scalar_flag", result, w)


@case()
def workdir_swallows_next_flag(ctx: Context) -> Outcome:
    d = ctx.dir("workdir_swallows_next_flag")
    result = cli(ctx, "train", "--workdir", "--config=seed", cwd=d)
    return (
        refused("workdir_swallows_next_flag", result)
        if not list(d.iterdir())
        else Outcome("workdir_swallows_next_flag", "silent wrong", f"wrote {list(d.iterdir())}")
    )


@case()
def blank_workdir(ctx: Context) -> Outcome:
    d = ctx.dir("blank_workdir")
    result = cli(ctx, "train", "--workdir= ", *ctx.tiny(), cwd=d)
    outcome = refused("blank_workdir", result)
    return outcome if not list(d.iterdir()) else Outcome("blank_workdir", "silent wrong", "wrote")


@case()
def compile_cache_proc(ctx: Context) -> Outcome:
    w = ctx.dir("compile_cache_proc") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(compile_cache="/proc/nope"))
    return refused("compile_cache_proc", result, w)


@case()
def profile_steps_negative(ctx: Context) -> Outcome:
    w = ctx.dir("profile_steps_negative") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(profile_steps=-1))
    return refused("profile_steps_negative", result, w)


@case()
def level_overflows_float32(ctx: Context) -> Outcome:
    w = ctx.dir("level_overflows_float32") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(noise__level="1e39"))
    return refused("level_overflows_float32", result, w)


@case()
def unknown_key(ctx: Context) -> Outcome:
    w = ctx.dir("unknown_key") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__lr=1))
    return refused("unknown_key", result, w)


@case()
def config_of_a_past_run(ctx: Context) -> Outcome:
    w = ctx.dir("config_of_a_past_run") / "w"
    result = cli(
        ctx,
        "train",
        f"--workdir={w}",
        f"--config={ctx.base}",
        f"--config.compile_cache={ctx.cache}",
        "--config.train.epochs=1",
    )
    checks = []
    if (w / "config.json").exists():
        base, new = (json.loads((p / "config.json").read_text()) for p in (ctx.base, w))
        new["train"]["epochs"] = base["train"]["epochs"]
        checks.append((new == base, "silent wrong", "config.json differs from the past run's"))
    return judge("config_of_a_past_run", result, rc=0, checks=checks)


@case()
def config_json_not_a_config(ctx: Context) -> Outcome:
    d = ctx.dir("config_json_not_a_config")
    (d / "config.json").write_text("false")
    result = cli(ctx, "train", f"--workdir={d / 'w'}", f"--config={d / 'config.json'}")
    return refused("config_json_not_a_config", result, d / "w")


@case()
def config_file_not_utf8(ctx: Context) -> Outcome:
    d = ctx.dir("config_file_not_utf8")
    (d / "mine.py").write_bytes(
        b"NAME = 'caf\xe9'\nfrom dae_jax.configs.default import get_config as get_config\n"
    )
    tiny = ctx.tiny(train__epochs=1)
    result = cli(ctx, "train", f"--workdir={d / 'w'}", f"--config={d / 'mine.py'}", *tiny)
    return refused("config_file_not_utf8", result, d / "w")


@case()
def flag_of_another_command(ctx: Context) -> Outcome:
    w = ctx.dir("flag_of_another_command") / "w"
    return refused("flag_of_another_command", cli(ctx, "train", f"--workdir={w}", "--output=o"), w)


# ----------------------------------------------------------------------- resume truths


@case()
def resume_with_fewer_epochs(ctx: Context) -> Outcome:
    w = ctx.copy_base("resume_with_fewer_epochs")
    before = (w / "config.json").read_bytes()
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=1))
    same = (w / "config.json").read_bytes() == before
    return judge(
        "resume_with_fewer_epochs",
        result,
        rc={1, 2},
        checks=[(same, "silent wrong", "config.json rewritten")],
    )


@case()
def resume_last_line(ctx: Context) -> Outcome:
    w = ctx.copy_base("resume_last_line")
    first = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=3))
    if first.rc != 0:
        return judge("resume_last_line", first, rc=0)
    second = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=3))
    return judge(
        "resume_last_line",
        second,
        rc=0,
        checks=[
            (
                "already trained" not in first.out,
                "silent wrong",
                "'already trained' after training",
            ),
            ("already trained for 3" in second.out, "silent wrong", "no 'already trained' line"),
        ],
    )


def _experiment_root(ctx: Context, name: str) -> Path:
    root = ctx.dir(name) / "sweep"
    shutil.copytree(
        ctx.base, root / "models" / "gaussian-mse", ignore=shutil.ignore_patterns("logs")
    )
    (root / "sweep.json").write_text("{}")
    return root


@case()
def train_on_a_sweep_root(ctx: Context) -> Outcome:
    root = _experiment_root(ctx, "train_on_a_sweep_root")
    result = cli(ctx, "train", f"--workdir={root}", *ctx.tiny())
    alone = sorted(p.name for p in root.iterdir()) == ["models", "sweep.json"]
    return judge(
        "train_on_a_sweep_root",
        result,
        rc={1, 2},
        checks=[(alone, "silent wrong", "a run was written at the root")],
    )


@case()
def evaluate_a_sweep_root(ctx: Context) -> Outcome:
    root = _experiment_root(ctx, "evaluate_a_sweep_root")
    result = cli(ctx, "evaluate", f"--workdir={root}")
    return judge(
        "evaluate_a_sweep_root",
        result,
        rc=1,
        checks=[
            ("models/gaussian-mse" in result.err, "silent wrong", "does not name W/models/*"),
        ],
    )


# ----------------------------------------------------------------------- damaged files


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _latest(w: Path) -> Path:
    return max(
        (p for p in (w / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )


@case()
def damaged_latest_checkpoint(ctx: Context) -> Outcome:
    w = ctx.copy_base("damaged_latest_checkpoint")
    for path in (_latest(w) / "state" / "ocdbt.process_0" / "d").glob("*"):
        _cut(path)
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=3))
    kept = (w / "damaged_checkpoints").is_dir()
    return judge(
        "damaged_latest_checkpoint",
        result,
        rc=0,
        lines=0,
        checks=[
            (kept, "data loss", "the damaged checkpoint was not set aside"),
            ("Resuming from checkpoint" in result.out, "data loss", "did not resume"),
        ],
    )


@case()
def every_checkpoint_garbled_evaluate(ctx: Context) -> Outcome:
    w = ctx.copy_base("every_checkpoint_garbled_evaluate")
    for step in (p for p in (w / "checkpoints").iterdir() if p.name.isdigit()):
        for path in step.rglob("*"):
            if path.is_file():
                path.write_bytes(b"\0garbage" * 8)
    result = cli(ctx, "evaluate", f"--workdir={w}")
    return judge("every_checkpoint_garbled_evaluate", result, rc=1, lines=4)


@case()
def checkpoints_is_a_file(ctx: Context) -> Outcome:
    w = ctx.copy_base("checkpoints_is_a_file")
    shutil.rmtree(w / "checkpoints")
    (w / "checkpoints").write_text("not a directory")
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny())
    return judge(
        "checkpoints_is_a_file",
        result,
        rc={1, 2},
        checks=[
            ((w / "checkpoints").read_text() == "not a directory", "data loss", "file replaced"),
        ],
    )


@case()
def metrics_not_text(ctx: Context) -> Outcome:
    w = ctx.copy_base("metrics_not_text")
    (w / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=3))
    kept = list(w.glob("metrics.damaged-*.jsonl"))
    return judge(
        "metrics_not_text",
        result,
        rc=0,
        checks=[
            (bool(kept), "data loss", "the damaged metrics.jsonl was not kept"),
        ],
    )


@case()
def config_json_damaged_evaluate(ctx: Context) -> Outcome:
    w = ctx.copy_base("config_json_damaged_evaluate")
    (w / "config.json").write_text("{ half")
    return judge("config_json_damaged_evaluate", cli(ctx, "evaluate", f"--workdir={w}"), rc={0, 1})


@case()
def every_checkpoint_garbled_denoise(ctx: Context) -> Outcome:
    w = ctx.copy_base("every_checkpoint_garbled_denoise")
    for step in (p for p in (w / "checkpoints").iterdir() if p.name.isdigit()):
        for path in step.rglob("*"):
            if path.is_file():
                path.write_bytes(b"\0garbage" * 8)
    image = w.parent / "a.png"
    _png(image)
    result = cli(ctx, "denoise", f"--workdir={w}", f"--output={w.parent / 'out'}", str(image))
    return judge("every_checkpoint_garbled_denoise", result, rc=1, lines=4)


@case()
def checkpoints_removed_during_training(ctx: Context) -> Outcome:
    w = ctx.dir("checkpoints_removed_during_training") / "w"
    process = subprocess.Popen(
        [sys.executable, "-m", "dae_jax", "train", f"--workdir={w}", *ctx.tiny(train__epochs=80)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started = time.perf_counter()
    deadline = started + 60
    while time.perf_counter() < deadline and not (w / "checkpoints" / "8").exists():
        time.sleep(0.2)
    shutil.rmtree(w / "checkpoints", ignore_errors=True)
    try:
        _, err = process.communicate(timeout=ctx.timeout)
        hung = False
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        hung = True
    result = Result(
        process.returncode, "", err.decode(errors="replace"), time.perf_counter() - started, hung
    )
    return judge("checkpoints_removed_during_training", result, rc={0, 1})


@case()
def evaluate_while_training(ctx: Context) -> Outcome:
    w = ctx.dir("evaluate_while_training") / "w"
    train = subprocess.Popen(
        [sys.executable, "-m", "dae_jax", "train", f"--workdir={w}", *ctx.tiny(train__epochs=80)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and not (w / "checkpoints" / "16").exists():
        time.sleep(0.2)
    try:
        result = cli(ctx, "evaluate", f"--workdir={w}")
    finally:
        train.send_signal(signal.SIGTERM)
        train.communicate(timeout=ctx.timeout)
    return judge("evaluate_while_training", result, rc=0, lines=0, checks=[
        ("interrupted" not in result.out, "silent wrong", "calls the running save interrupted"),
    ])  # fmt: skip


# ------------------------------------------------------------------------------ paths


@case()
def workdir_in_proc(ctx: Context) -> Outcome:
    return refused(
        "workdir_in_proc", cli(ctx, "train", "--workdir=/proc/dae_jax_attack", *ctx.tiny()), rc=2
    )


@case()
def workdir_symlink_loop(ctx: Context) -> Outcome:
    d = ctx.dir("workdir_symlink_loop")
    (d / "loop").symlink_to(d / "loop")
    result = cli(ctx, "train", f"--workdir={d / 'loop' / 'w'}", *ctx.tiny())
    return judge("workdir_symlink_loop", result, rc={1, 2})


@case()
def workdir_is_a_file(ctx: Context) -> Outcome:
    d = ctx.dir("workdir_is_a_file")
    (d / "notes.txt").write_text("mine")
    result = cli(ctx, "train", f"--workdir={d / 'notes.txt'}", *ctx.tiny())
    return judge(
        "workdir_is_a_file",
        result,
        rc=2,
        checks=[
            ((d / "notes.txt").read_text() == "mine", "data loss", "the file was changed"),
        ],
    )


def _small_files(limit: int) -> Callable[[], None]:
    """A filesystem that takes no file over ``limit`` bytes (a full disk, or a quota)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@case()
def disk_full_during_training(ctx: Context) -> Outcome:
    w = ctx.dir("disk_full_during_training") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(), limits=_small_files(60_000))
    return judge("disk_full_during_training", result, rc=1)


@case()
def disk_full_before_the_start(ctx: Context) -> Outcome:
    w = ctx.dir("disk_full_before_the_start") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(), limits=_small_files(0))
    return judge("disk_full_before_the_start", result, rc=1)


@case()
def disk_full_resume(ctx: Context) -> Outcome:
    w = ctx.copy_base("disk_full_resume")
    steps = sorted(p.name for p in (w / "checkpoints").iterdir())
    result = cli(
        ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=4), limits=_small_files(60_000)
    )
    after = sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    return judge(
        "disk_full_resume",
        result,
        rc={0, 1},
        checks=[
            (
                set(s for s in steps if s.isdigit()) <= set(after) or len(after) >= 1,
                "data loss",
                "checkpoints lost",
            ),
        ],
    )


@case()
def output_in_proc(ctx: Context) -> Outcome:
    d = ctx.dir("output_in_proc")
    image = d / "a.png"
    _png(image)
    result = cli(ctx, "denoise", f"--workdir={ctx.base}", "--output=/proc/dae_jax_out", str(image))
    return judge("output_in_proc", result, rc={1, 2})


def _png(path: Path, size: int = 28) -> None:
    from PIL import Image

    Image.new("L", (size, size), 128).save(path)


# -------------------------------------------------------------------------- encodings


@case()
def ascii_terminal(ctx: Context) -> Outcome:
    w = ctx.dir("ascii_terminal") / "caf\u00e9\u2011run"
    result = cli(
        ctx,
        "train",
        f"--workdir={w}",
        *ctx.tiny(train__epochs=1),
        env={"PYTHONIOENCODING": "ascii"},
    )
    return judge("ascii_terminal", result, rc=0)


@case()
def latin1_terminal_error(ctx: Context) -> Outcome:
    w = ctx.dir("latin1_terminal_error") / "\u2011w"
    result = cli(
        ctx,
        "train",
        f"--workdir={w}",
        *ctx.tiny(data__name="nope\u2011"),
        env={"PYTHONIOENCODING": "latin-1"},
    )
    return refused("latin1_terminal_error", result, w)


@case()
def denoise_odd_file_names(ctx: Context) -> Outcome:
    d = ctx.dir("denoise_odd_file_names")
    image = d / "\u00e9t\u00e9 \u2011.png"
    _png(image)
    (d / "text.png").write_text("not an image")
    result = cli(
        ctx,
        "denoise",
        f"--workdir={ctx.base}",
        f"--output={d / 'out'}",
        str(image),
        str(d / "text.png"),
        env={"PYTHONIOENCODING": "ascii"},
    )
    return judge("denoise_odd_file_names", result, rc={0, 1}, lines=2)


# ----------------------------------------------------------------------------- signals


@case()
def sigint_while_importing(ctx: Context) -> Outcome:
    w = ctx.dir("sigint_while_importing") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(), signals=[(0.4, signal.SIGINT)])
    return judge(
        "sigint_while_importing",
        result,
        rc=130,
        checks=[
            (not w.exists(), "silent wrong", "wrote the workdir"),
        ],
    )


@case()
def sigterm_while_starting(ctx: Context) -> Outcome:
    w = ctx.dir("sigterm_while_starting") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(), signals=[(2.0, signal.SIGTERM)])
    return judge(
        "sigterm_while_starting",
        result,
        rc=143,
        checks=[(not w.exists(), "silent wrong", "left a workdir behind")],
    )


def _training_signals(
    ctx: Context, name: str, signals: list[tuple[float, int]], rc: set[int]
) -> Outcome:
    w = ctx.dir(name) / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=80), signals=signals)
    if result.rc == 0:
        return Outcome(name, "clean", "finished before the signal", result.seconds)
    first = judge(name, result, rc=rc, killed=-signal.SIGKILL in rc)
    if first.kind != "clean":
        return first
    had = w.is_dir() and any(p.name.isdigit() for p in (w / "checkpoints").glob("*"))
    again = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=80))
    return judge(
        name,
        again,
        rc=0,
        checks=[
            (
                not had or "Resuming from checkpoint" in again.out,
                "data loss",
                "a checkpoint existed but the run started over",
            ),
        ],
    )


@case()
def sigint_during_training(ctx: Context) -> Outcome:
    return _training_signals(ctx, "sigint_during_training", [(9.0, signal.SIGINT)], {130})


@case()
def sigterm_during_training(ctx: Context) -> Outcome:
    return _training_signals(ctx, "sigterm_during_training", [(9.0, signal.SIGTERM)], {143})


@case()
def two_sigints(ctx: Context) -> Outcome:
    return _training_signals(
        ctx, "two_sigints", [(9.0, signal.SIGINT), (9.05, signal.SIGINT)], {130}
    )


@case()
def kill9_during_training(ctx: Context) -> Outcome:
    return _training_signals(
        ctx, "kill9_during_training", [(10.0, signal.SIGKILL)], {-signal.SIGKILL}
    )


@case()
def stdout_closed_early(ctx: Context) -> Outcome:
    w = ctx.dir("stdout_closed_early") / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__epochs=30), close_stdout_after=2)
    return judge("stdout_closed_early", result, rc={0, 1})


# ------------------------------------------------------------------------ shapes, API


API = """
import numpy as np, dae_jax
run = dae_jax.restore({base!r}, warn=lambda s: None)
try:
    out = run.model({x})
    out = np.asarray(out)
    print("accepted", out.dtype, float(out.min()), float(out.max()))
except Exception as e:
    from dae_jax.errors import UserError
    print("refused", isinstance(e, UserError), type(e).__name__)
"""


def _api(ctx: Context, name: str, x: str, *, refuse: bool) -> Outcome:
    result = run(ctx, ["-c", API.format(base=str(ctx.base), x=x)])
    words = result.out.split()
    ok = words[:2] == ["refused", "True"] if refuse else words[:1] == ["accepted"]
    return judge(
        name,
        result,
        rc=0,
        lines=0,
        checks=[
            (ok, "silent wrong" if words[:1] == ["accepted"] else "traceback", result.out[:100]),
        ],
    )


@case()
def api_wrong_image_size(ctx: Context) -> Outcome:
    return _api(ctx, "api_wrong_image_size", "np.zeros((2, 32, 32, 1), np.float32)", refuse=True)


@case()
def api_uint8_images(ctx: Context) -> Outcome:
    return _api(ctx, "api_uint8_images", "np.full((2, 28, 28, 1), 200, np.uint8)", refuse=True)


@case()
def api_wrong_channels(ctx: Context) -> Outcome:
    return _api(ctx, "api_wrong_channels", "np.zeros((2, 28, 28, 3), np.float32)", refuse=True)


# ---------------------------------------------------------- nothing written too early


@case()
def data_error_writes_nothing(ctx: Context) -> Outcome:
    d = ctx.dir("data_error_writes_nothing")
    w = d / "w"
    result = cli(
        ctx,
        "train",
        f"--workdir={w}",
        *ctx.tiny(data__name="folder", data__local_dir=d / "missing"),
    )
    return refused("data_error_writes_nothing", result, w, rc=result.rc or 1)


@case()
def batch_larger_than_data(ctx: Context) -> Outcome:
    w = ctx.dir("batch_larger_than_data") / "new" / "w"
    result = cli(ctx, "train", f"--workdir={w}", *ctx.tiny(train__batch_size=100000))
    return refused("batch_larger_than_data", result, w.parent)


@case()
def out_of_memory(ctx: Context) -> Outcome:
    w = ctx.dir("out_of_memory") / "w"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))

    result = cli(
        ctx, "train", f"--workdir={w}", *ctx.tiny(model__hidden="(100000000,)"), limits=limit
    )
    return judge(
        "out_of_memory",
        result,
        rc=1,
        checks=[
            (not w.exists(), "silent wrong", "left the workdir of a run that never started"),
        ],
    )


@case()
def sweep_out_of_memory(ctx: Context) -> Outcome:
    w = ctx.dir("sweep_out_of_memory") / "w"
    result = cli(
        ctx, "sweep", f"--workdir={w}", *ctx.tiny(model__hidden="(100000000,)"), "--seeds=0,1",
        "--nobm3d", "--noprobe",
    )  # fmt: skip
    return judge(
        "sweep_out_of_memory",
        result,
        rc=1,
        checks=[
            (not w.exists(), "silent wrong", "left a sweep.json planning models that cannot fit"),
        ],
    )


# ---------------------------------------------------------------------- slow: a sweep


@case(slow=True)
def quick_keeps_given_values(ctx: Context) -> Outcome:
    w = ctx.dir("quick_keeps_given_values") / "w"
    result = run(
        ctx,
        [
            "experiments/noise_sweep.py",
            f"--workdir={w}",
            "--quick",
            "--config.data.name=synthetic",
            f"--config.compile_cache={ctx.cache}",
            "--config.train.epochs=2",
            "--seeds=3",
        ],
        timeout=600,
    )
    config = json.loads((w / "results.json").read_text())["config"] if result.rc == 0 else {}
    return judge(
        "quick_keeps_given_values",
        result,
        rc=0,
        checks=[
            (config.get("train", {}).get("epochs") == 2, "silent wrong", "--quick replaced epochs"),
            (
                "kept what you gave" in result.out,
                "silent wrong",
                "--quick did not say what it kept",
            ),
        ],
    )


@case(slow=True)
def sweep_from_a_plain_script(ctx: Context) -> Outcome:
    d = ctx.dir("sweep_from_a_plain_script")
    (d / "plain.py").write_text(
        "from dae_jax import sweep\nfrom dae_jax.configs import default\n"
        "config = default.get_config()\nconfig.data.name = 'synthetic'\n"
        "config.data.train_size, config.data.test_size, config.train.epochs = 1024, 256, 1\n"
        f"config.compile_cache = {str(ctx.cache)!r}\n"
        f"sweep.run('plain', config, {{'noise.level': [0.5]}}, [0], {str(d / 'w')!r})\n"
    )
    result = run(ctx, [str(d / "plain.py")], timeout=600)
    return judge("sweep_from_a_plain_script", result, rc=0, lines=0)


# ---------------------------------------------------------------------------- running


def _base_run(ctx: Context) -> None:
    if (ctx.base / "summary.json").exists():
        return
    shutil.rmtree(ctx.base, ignore_errors=True)
    result = cli(ctx, "train", f"--workdir={ctx.base}", *ctx.tiny(), timeout=600)
    if result.rc != 0:
        sys.exit(f"the base run failed: {result.err.strip()}")


def _one(ctx: Context, name: str) -> Outcome:
    started = time.perf_counter()
    try:
        outcome = CASES[name](ctx)
    except Exception as e:  # the harness's own failure is not the project's
        outcome = Outcome(name, "harness error", f"{type(e).__name__}: {e}")
    outcome.seconds = time.perf_counter() - started
    return outcome


def main(argv: list[str]) -> None:
    del argv
    if flags.FLAGS.list:
        for name in CASES:
            print(f"{name}{' (slow)' if name in SLOW else ''}")
        return
    names = flags.FLAGS.cases or [n for n in CASES if flags.FLAGS.all or n not in SLOW]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown cases: {', '.join(unknown)} (--list shows them)")
    root = Path(flags.FLAGS.workdir).absolute()
    ctx = Context(root, root / "base", root / "cache", flags.FLAGS.timeout)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if any(
        n
        not in (
            "repeated_list_flag",
            "compile_cache_proc",
            "sigint_while_importing",
            "workdir_swallows_next_flag",
            "blank_workdir",
        )
        for n in names
    ):
        _base_run(ctx)
    outcomes: list[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(max(1, flags.FLAGS.jobs)) as pool:
        for outcome in pool.map(lambda n: _one(ctx, n), names):
            outcomes.append(outcome)
            line = f"{outcome.kind:>13}  {outcome.case:<36} {outcome.seconds:5.1f} s"
            print(f"{line}  {outcome.detail}", flush=True)
    counts = Counter(o.kind for o in outcomes)
    seconds = time.perf_counter() - started
    print(
        f"\n{len(outcomes)} cases in {seconds:.0f} s: "
        + ", ".join(
            f"{kind} {counts.get(kind, 0)}"
            for kind in (*CLASSES, "harness error")
            if counts.get(kind) or kind in CLASSES
        )
    )
    (root / "attack.json").write_text(
        json.dumps(
            {
                "seconds": seconds,
                "counts": counts,
                "cases": [dataclasses.asdict(o) for o in outcomes],
            },
            indent=1,
        )
        + "\n"
    )
    sys.exit(0 if counts.get("clean", 0) == len(outcomes) else 1)


if __name__ == "__main__":
    app.run(main)

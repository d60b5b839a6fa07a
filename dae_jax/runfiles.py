"""What a run writes beside its checkpoints: the workdir and its lock, config.json,
metrics.jsonl, summary.json, and the facts (versions, device) those files record.

In a multi-process run only process 0 writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import jax
import numpy as np

from dae_jax import guard, parallel
from dae_jax.errors import Interrupted, UserError, first_line

WRITE_PROBE = ".write_test-"  # + a unique suffix: prepare_workdir's check that W is writable
# What a dae_jax workdir may hold; anything else means the directory is someone else's.
RUN_FILES = {
    ".lock",
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "population.json",
    "sweep.json",
    "checkpoints",
    "damaged_checkpoints",
    "figures",
    "evaluation",
    "tensorboard",
    "profile",
    "models",
    "stages",
    "results.csv",
    "results.json",
    "results.md",
    "logs",  # what third-party libraries logged, crash reports (dae_jax.guard)
}


def _json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (inf, nan) as strings: ``"Infinity"``, ``"NaN"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (no bare ``Infinity``/``NaN``: those become strings)."""
    return json.dumps(_json_safe(value), allow_nan=False, **kwargs)


def write_json(path: Path, value: Any) -> None:
    """Writes ``path`` atomically (a kill leaves the old file or the new one)."""
    if not parallel.is_primary():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(value, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """``path``'s JSON, or None when it is missing or damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_run_file(name: str) -> bool:
    return (
        name in RUN_FILES
        or name.startswith(("metrics.", WRITE_PROBE))  # a starting process's write probe
        or name.endswith(".tmp")
    )


def check_workdir(workdir: Path) -> None:
    """Refuses, writing nothing, a file, the filesystem root, a non-empty directory that
    is not a dae_jax workdir, and a workdir another process holds (its lock)."""
    try:
        resolved = workdir.resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError for a loop
        raise UserError(
            f"--workdir={workdir} cannot be resolved ({first_line(e)}): a symbolic link in it "
            "loops or is broken; give another directory"
        ) from None
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir={workdir} is a file; give a directory (new or existing)")
    if resolved == Path(resolved.anchor):
        raise UserError(f"--workdir={workdir} is the filesystem root; give a directory of its own")
    if workdir.is_dir():
        foreign = sorted(p.name for p in workdir.iterdir() if not _is_run_file(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise UserError(
                f"--workdir={workdir} is not empty and is not a dae_jax workdir (it holds "
                f"{shown}); give a new or empty directory"
            )
        has_config = (workdir / "config.json").exists()
        has_checkpoints = (workdir / "checkpoints").is_dir()
        if has_config and not has_checkpoints and not (workdir / "metrics.jsonl").exists():
            raise UserError(
                f"--workdir={workdir} holds a config.json that no dae_jax run wrote (no "
                "checkpoints/, no metrics.jsonl); give a new or empty directory"
            )
        checkpoints = workdir / "checkpoints"
        if (checkpoints.exists() or checkpoints.is_symlink()) and not checkpoints.is_dir():
            raise UserError(
                f"{checkpoints} is not a directory; move it away (a run keeps its checkpoints "
                "there) and run the same command again",
                exit_code=1,
            )
        WorkdirLock(workdir).probe()


def refuse_experiment_root(workdir: Path) -> None:
    """A single run may not train in an experiment's (a sweep's) workdir: its models live
    in ``W/models/*``, and a stray run there would be what ``evaluate W`` finds."""
    marks = [name for name in ("sweep.json", "results.json") if (workdir / name).is_file()]
    members = experiment_models(workdir)
    if marks or members:
        shown = ", ".join(str(m) for m in members[:4]) + (" ..." if len(members) > 4 else "")
        raise UserError(
            f"--workdir={workdir} is an experiment's workdir (it holds "
            f"{', '.join(marks) or 'models/'}), not a single run"
            + (f"; its models are {shown}" if members else "")
            + ": to train a run of your own use a new --workdir",
            exit_code=1,
        )


def experiment_models(workdir: Path) -> list[Path]:
    """The runs an experiment keeps under ``W/models/``: ``W/models`` itself when it is a
    run, else each ``W/models/<name>/`` that is one."""
    models = workdir / "models"
    if not models.is_dir():
        return []
    if _is_run(models):
        return [models]
    return sorted(p for p in models.iterdir() if p.is_dir() and _is_run(p))


def _is_run(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "checkpoints").is_dir()


def prepare_workdir(workdir: Path) -> None:
    """Creates ``workdir`` (and ``figures/``); refuses what :func:`check_workdir` refuses
    and an unwritable place."""
    check_workdir(workdir)
    target = workdir.resolve()
    created = None
    for parent in (target, *target.parents):
        if parent.exists():
            break
        created = parent
    try:
        (workdir / "figures").mkdir(parents=True, exist_ok=True)
        # A probe of its own: the processes of one multi-process run do this at once.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=WRITE_PROBE):
            pass
    except OSError as e:
        raise UserError(
            f"--workdir={workdir} is not writable ({e.strerror}); give another"
        ) from None
    if created is not None:
        _created.setdefault(target, created)
    guard.workdir_ready(workdir)


# workdir (resolved) -> the outermost directory this process created for it: a command
# that fails before its workdir holds anything worth keeping removes them again.
_created: dict[Path, Path] = {}

# What a failed start leaves in a workdir that is not worth keeping (the run's own
# records of starting; logs/ goes to the crash report, tensorboard/ holds no epoch yet).
_NOT_WORTH_KEEPING = {".lock", "config.json", "sweep.json", "population.json"}


def _worth_keeping(workdir: Path) -> bool:
    """Whether ``workdir`` holds anything a run produced: a checkpoint (even a partial
    one), an epoch record, results, figures, an evaluation..."""
    for path in workdir.rglob("*"):
        if path.is_dir() or path.name in _NOT_WORTH_KEEPING or path.name.startswith(WRITE_PROBE):
            continue
        relative = path.relative_to(workdir).parts
        if relative[0] in ("logs", "tensorboard") and "checkpoints" not in relative:
            continue
        if path.name == "metrics.jsonl":
            try:
                if '"event": "epoch"' not in path.read_text(encoding="utf-8", errors="replace"):
                    continue
            except OSError:
                pass
        return True
    return False


def roll_back(workdir: Path, *, locked: bool = False) -> bool:
    """Removes ``workdir`` (and the parents made for it) when this process created it and
    it holds nothing worth keeping: a command that fails before its first checkpoint
    leaves the filesystem as it found it. ``locked``: the caller holds its lock; else it
    is taken (a workdir another process has started to use is left alone). Returns
    whether it removed anything."""
    import shutil

    try:
        target = workdir.resolve()
        root = _created.get(target)
        if root is None or not target.is_dir():
            return False
        with contextlib.ExitStack() as stack:
            if not locked and (target / ".lock").exists():
                file = stack.enter_context((target / ".lock").open("r"))
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _worth_keeping(target):
                return False
            guard.workdir_removed(target)
            shutil.rmtree(root if _only_path_to(root, target) else target)
        del _created[target]
        return True
    except OSError:  # in use, or not removable: kept as it is
        return False


def _only_path_to(root: Path, target: Path) -> bool:
    """Whether every directory from ``root`` down to ``target`` holds only the next one."""
    node = root
    while node != target:
        inside = list(node.iterdir())
        if len(inside) != 1 or (inside[0] != target and inside[0] not in target.parents):
            return False
        node = inside[0]
    return True


class WorkdirLock:
    """One writer per workdir: an exclusive ``flock`` on ``W/.lock``, which names its
    holder. The kernel releases it when the process dies (kill -9 included). In a
    multi-process run process 0 holds it."""

    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"
        self.file: IO[str] | None = None

    def __enter__(self) -> WorkdirLock:
        if not parallel.is_primary():
            return self
        file = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish (or stop "
                "it), or use another --workdir",
                exit_code=1,
            ) from None
        file.seek(0)
        file.truncate()
        file.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n"
        )
        file.flush()
        self.file = file
        return self

    def probe(self) -> None:
        """Raises the ``UserError`` of :meth:`__enter__` when another process holds the
        lock; writes nothing (a workdir without ``.lock`` is free)."""
        if not parallel.is_primary() or not self.path.is_file():
            return
        try:
            file = self.path.open("r", encoding="utf-8", errors="replace")
        except OSError:
            return  # __enter__ will say what is wrong
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = file.read().strip() or "another process"
                raise UserError(
                    f"{self.path.parent} is in use by {holder}; wait for it to finish (or stop "
                    "it), or use another --workdir",
                    exit_code=1,
                ) from None
            fcntl.flock(file, fcntl.LOCK_UN)

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if self.file is not None:
            if kind is not None and not isinstance(error, Interrupted):
                roll_back(self.path.parent, locked=True)  # a failed start leaves nothing
            self.file.truncate(0)
            self.file.close()  # closing releases the lock
            self.file = None


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed as it goes."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8") if parallel.is_primary() else None

    def write(self, event: str, **values: Any) -> None:
        if self.file is not None:
            self.file.write(dumps({"event": event, **values}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def rewind_metrics(path: Path, step: int, warn: Any = print) -> list[dict[str, Any]]:
    """Cuts ``metrics.jsonl`` back to a checkpoint at global ``step``: drops what came after
    it and any line a kill cut short. Returns the epoch records kept.

    A file that cannot be read as text (binary damage, a directory in its place) is set
    aside as ``metrics.damaged-<time>.jsonl`` and the run goes on with a new one."""
    if not path.exists() and not path.is_symlink():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        backup = path.with_name(f"metrics.damaged-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        if parallel.is_primary():
            path.replace(backup)
        warn(
            f"warning: {path} is damaged ({reason}); set aside as {backup.name}, starting a new one"
        )
        return []
    kept: list[str] = []
    history: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            continue
        if record.get("step", 0) > step:
            continue
        if record.get("event") == "epoch":
            history.append({k: v for k, v in record.items() if k != "event"})
        kept.append(line)
    if parallel.is_primary():
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return history


def versions() -> dict[str, str]:
    import flax
    import optax

    from dae_jax import __version__

    return {
        "dae_jax": __version__,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", ""),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": ocp_version(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def ocp_version() -> str:
    import orbax.checkpoint as ocp

    return str(getattr(ocp, "__version__", ""))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }


# The epoch record's numbers that go to TensorBoard, as scalars named by their key.
# The epoch record's keys that are not scalars to plot (every other number is one: the
# losses, each image metric of dae_jax.metrics.IMAGE, the learning rate, the speed).
NOT_SCALARS = ("model", "epoch", "step")


class TensorBoard:
    """``W/tensorboard/`` event files (tensorboardX: no TensorFlow needed), one run per
    member of a population (``model-<k>/``); ``tensorboard --logdir W`` shows them."""

    def __init__(self, directory: Path, members: int, enabled: bool):
        self.writers: list[Any] = []
        if enabled and parallel.is_primary():
            from tensorboardX import SummaryWriter

            self.writers = [
                SummaryWriter(str(directory if members == 1 else directory / f"model-{k}"))
                for k in range(members)
            ]

    def epoch(self, k: int, record: dict[str, Any]) -> None:
        if self.writers:
            for key, value in record.items():  # not inf (PSNR of a clean input) or NaN
                if key in NOT_SCALARS or isinstance(value, bool):
                    continue
                if isinstance(value, float | int) and math.isfinite(value):
                    self.writers[k].add_scalar(key, value, record["epoch"])

    def hparams(self, k: int, values: dict[str, Any], final: dict[str, Any]) -> None:
        """Member k's settings (e.g. a sweep's axis values) beside its last metrics, for
        TensorBoard's HPARAMS tab: the runs are told apart by name."""
        if self.writers:
            shown = {
                key: value if isinstance(value, bool | int | float | str) else str(value)
                for key, value in values.items()
            }
            metrics = {
                f"hparams/{key}": float(final[key])
                for key in ("test_psnr_denoised", "test_loss")
                if isinstance(final.get(key), float | int) and math.isfinite(final[key])
            }
            self.writers[k].add_hparams(shown, metrics, name="hparams")

    def image(self, k: int, tag: str, path: Path, step: int) -> None:
        """A written figure (PNG) as an image, e.g. the denoising figure."""
        if self.writers and path.exists():
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writers[k].add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


class Profiler:
    """Traces at least ``steps`` training steps (whole chunks) with ``jax.profiler`` into
    ``directory``, starting after the first chunk (compiling and warm-up are not in it).
    View the trace in TensorBoard's profile plugin or at ui.perfetto.dev."""

    def __init__(self, steps: int, directory: Path, say: Any):
        self.steps, self.directory, self.say = steps, directory, say
        self.chunks_seen, self.traced, self.active = 0, 0, False

    def before_chunk(self) -> None:
        if self.steps and not self.active and self.traced == 0 and self.chunks_seen >= 1:
            import jax.profiler

            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_chunk(self, length: int, outputs: Any) -> None:
        self.chunks_seen += 1
        if not self.active:
            return
        self.traced += length
        if self.traced >= self.steps:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        if self.active:
            import jax.profiler

            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            self.say(
                f"Profiled {self.traced} training steps (whole chunks; profile_steps={self.steps}) "
                f"into {self.directory}"
            )

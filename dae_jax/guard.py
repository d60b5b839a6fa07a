"""What reaches the terminal when a command fails: one line, never a traceback.

Every entry point (``dae-jax``, ``python -m dae_jax``, the experiment scripts through
``report.cli``) runs its body with :func:`run`:

- a ``UserError`` prints its own line (``error: ...``) and exits with its code;
- Ctrl-C at any moment, imports included, says what the command was doing when it
  stopped (exit 130);
- any other exception prints one line, what failed and where, naming a crash log that
  holds the full traceback: ``W/logs/crash-<time>.txt`` when the workdir exists and is
  writable, else a file in the temporary directory; exit 1;
- third-party logging (absl, orbax's background threads, asyncio), Python warnings,
  exceptions of background threads and "exception ignored" reports go to a log file,
  ``W/logs/<command>-<time>.log`` (created only when something is logged), not to the
  terminal; ``--verbose`` shows them on stderr as well (without a workdir to log to, a
  crash report holds them);
- stdout and stderr escape what their encoding cannot show (``\\u2011``), never crash.

This module imports only the standard library: an entry point installs it before its
heavy imports (JAX) start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import dae_jax
from dae_jax.errors import Interrupted, UserError, first_line, with_type

_STOP_SIGNALS = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
_BUFFERED_RECORDS = 5000  # log lines kept in memory until the workdir's log file exists
_active: Guard | None = None


class _Handler(logging.Handler):
    """Every log record: to the guard's log file (held in memory until there is one),
    and to stderr with ``--verbose``."""

    def __init__(self, guard: Guard):
        super().__init__(logging.NOTSET)
        self.guard = guard
        self.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted is not worth a traceback
            text = f"{record.levelname} {record.name} {record.msg!r}"
        self.guard._log_text(text)


class Guard:
    """The state one guarded command shares with the code it runs (see :func:`run`)."""

    def __init__(self, command: str):
        self.command = command  # e.g. "dae-jax train"
        self.stage = "starting (loading its libraries)"
        self.workdir: Path | None = None  # the command's workdir, once known
        self.wrote = False  # whether this command has made its workdir ready to write
        self.removed = False  # whether a failed start removed the workdir it had made
        self.writes_workdir = False  # train, the experiments: their workdir is their output
        self.signum: int = signal.SIGINT  # what stopped it, for a KeyboardInterrupt
        self.verbose = False
        self.log_path: Path | None = None
        self._log_dir: Path | None = None
        self._buffer: list[str] = []
        self._lock = threading.RLock()  # a record logged while logging one must not block
        self._restore: list[Callable[[], None]] = []
        self.started = time.strftime("%Y%m%d-%H%M%S")

    # ----------------------------------------------------------------- set-up

    def _enter(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # Until the work begins (begin_work), a Ctrl-C or SIGTERM ends the process at
            # once with one line: loading libraries and reading the config write nothing.
            for signum, default in _STOP_SIGNALS:
                previous = signal.getsignal(signum)
                if previous in (default, dae_jax.interrupted_while_starting):
                    signal.signal(signum, dae_jax.interrupted_while_starting)
                    self._restore.append(_restorer(signum, previous))
        for stream in (sys.stdout, sys.stderr):
            _escape_unencodable(stream, self._restore)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        root.handlers = [_Handler(self)]
        root.setLevel(logging.WARNING)

        def restore_root() -> None:
            root.handlers, root.level = handlers, level

        self._restore.append(restore_root)
        logging.captureWarnings(True)
        self._restore.append(lambda: logging.captureWarnings(False))
        # absl (orbax logs through it): warnings and errors to the log, not the terminal.
        from absl import logging as absl_logging

        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.WARNING)
        self._restore.append(lambda: absl_logging.set_verbosity(verbosity))
        thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook
        threading.excepthook = self._thread_exception
        sys.unraisablehook = self._unraisable

        def restore_hooks() -> None:
            threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook

        self._restore.append(restore_hooks)

    def begin_work(self) -> None:
        """From here on a Ctrl-C raises ``KeyboardInterrupt`` (training's own handler
        saves a checkpoint first): the command's work may need to clean up."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is dae_jax.interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if signal.getsignal(signal.SIGTERM) is dae_jax.interrupted_while_starting:
            signal.signal(signal.SIGTERM, self._terminated)

    def _terminated(self, signum: int, frame: Any) -> None:
        """SIGTERM outside training (whose own handler saves a checkpoint first): stop
        as a Ctrl-C does, cleaning up, and exit 143."""
        self.signum = signum
        raise KeyboardInterrupt

    def _exit(self, program: bool) -> None:
        """Restores what :meth:`_enter` changed; a program keeps it all to its end (what
        its libraries' threads and garbage report while Python shuts down is logged too)."""
        if program:
            return
        while self._restore:
            with contextlib.suppress(Exception):
                self._restore.pop()()
        # What was logged with no workdir to log to is dropped: a crash report holds it,
        # and --verbose showed it; a file in /tmp nobody is told of would only pile up.
        self._buffer = []

    # ------------------------------------------------------------ the log file

    def _log_text(self, text: str) -> None:
        with self._lock:
            if self.verbose:
                with contextlib.suppress(Exception):
                    print(text, file=sys.stderr, flush=True)
            if self._log_dir is not None and self._open_log():
                try:
                    with self.log_path.open("a", errors="backslashreplace") as file:  # type: ignore[union-attr]
                        file.write(text + "\n")
                    return
                except OSError:
                    pass
            if len(self._buffer) < _BUFFERED_RECORDS:
                self._buffer.append(text)

    def _open_log(self) -> bool:
        """Creates the log file in the workdir (with what was logged so far) on first use."""
        if self.log_path is not None:
            return True
        assert self._log_dir is not None
        name = self.command.split()[-1].replace("/", "_").removesuffix(".py")
        path = self._log_dir / f"{name}-{self.started}-{os.getpid()}.log"
        try:
            self._log_dir.mkdir(exist_ok=True)
            with path.open("a", errors="backslashreplace") as file:
                file.write("".join(line + "\n" for line in self._buffer))
        except OSError:
            self._log_dir = None  # read-only or full: keep it in memory
            return False
        self.log_path, self._buffer = path, []
        return True

    def attach(self, workdir: Path) -> None:
        """The workdir exists: what is logged from now on (and before) goes to W/logs/."""
        with self._lock:
            if self._log_dir is None and workdir.is_dir() and os.access(workdir, os.W_OK):
                self._log_dir = workdir / "logs"
                if self._buffer:
                    self._open_log()

    def _thread_exception(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        error = args.exc_value if args.exc_value is not None else args.exc_type()
        logging.getLogger("dae_jax").error(
            "exception in %s", name, exc_info=(args.exc_type, error, args.exc_traceback)
        )

    def _unraisable(self, unraisable: Any) -> None:
        exc = unraisable.exc_value
        logging.getLogger("dae_jax").warning(
            "%s: %r",
            unraisable.err_msg or "exception ignored",
            unraisable.object,
            exc_info=(type(exc), exc, unraisable.exc_traceback) if exc is not None else None,
        )

    # ----------------------------------------------------------------- failures

    def crash_report(self, error: BaseException) -> str:
        """Writes the traceback (and what was logged) to a crash file; says where."""
        text = "".join(
            [
                f"{self.command} failed while {self.stage}\n",
                f"command line: {' '.join(sys.argv)}\n",
                f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}; python {sys.version.split()[0]}; "
                f"{_versions()}\n\n",
                *traceback.format_exception(type(error), error, error.__traceback__),
            ]
        )
        if self._buffer:
            text += "\nlogged before the failure:\n" + "\n".join(self._buffer) + "\n"
        elif self.log_path is not None:
            text += f"\nlogged before the failure: {self.log_path}\n"
        name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}"
        places = []
        with contextlib.suppress(OSError):
            if (
                self.workdir is not None
                and self.workdir.is_dir()
                and os.access(self.workdir, os.W_OK)
            ):
                places.append((self.workdir / "logs", name))
        with contextlib.suppress(OSError):  # no usable temporary directory (a full disk)
            places.append((Path(tempfile.gettempdir()), f"dae_jax-{name}"))
        problem = "no writable directory for it"
        for directory, stem in places:
            path = directory / f"{stem}.txt"
            try:
                directory.mkdir(exist_ok=True)
                if path.exists():
                    path = directory / f"{stem}-{os.getpid()}.txt"
                path.write_text(text, errors="backslashreplace")
                self._buffer = []  # in the report now
                if self.verbose:
                    print(text, file=sys.stderr)
                return f"the full traceback is in {path}"
            except OSError as e:
                problem = e.strerror or type(e).__name__
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)  # not a half-written report
        if self.verbose:
            print(text, file=sys.stderr)
        return f"its traceback could not be saved ({problem})"

    def interrupted(self) -> str:
        """The line for a Ctrl-C: what the command was doing, and what is left of it."""
        how = "interrupted" if self.signum == signal.SIGINT else "stopped by SIGTERM"
        line = f"{self.command} {how} while {self.stage}"
        if self.wrote:
            last = " from the last checkpoint" if self.command.endswith(" train") else ""
            return f"{line}; run the same command again to resume{last}"
        if self.removed:
            return f"{line}; the workdir it had created is removed again"
        if self.writes_workdir:
            return f"{line}; nothing was written"
        return line


def _restorer(signum: int, handler: Any) -> Callable[[], None]:
    def restore() -> None:
        signal.signal(signum, handler)

    return restore


def _versions() -> str:
    found = []
    for name in ("jax", "jaxlib", "flax", "orbax.checkpoint", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            found.append(f"{name} {getattr(module, '__version__', '?')}")
    return ", ".join(found) or "no JAX loaded"


def _escape_unencodable(stream: Any, restore: list[Callable[[], None]]) -> None:
    """A stream whose encoding cannot show a character writes it as ``\\uXXXX``."""
    errors = getattr(stream, "errors", None)
    if errors in (None, "backslashreplace") or not hasattr(stream, "reconfigure"):
        return
    try:
        stream.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError, OSError):
        return
    restore.append(lambda: stream.reconfigure(errors=errors))


def _os_problem(error: OSError, stage: str) -> str | None:
    """One line for a failure of the machine (disk full, read-only, a looping path)."""
    where = f" {error.filename}" if error.filename else ""
    strerror = error.strerror or first_line(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (
            f"no space left on the device while {stage} ({strerror}{':' if where else ''}{where}); "
            "free disk space (or use another --workdir) and run the same command again"
        )
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"cannot write{where} while {stage} ({strerror}); fix its permissions or use "
            "another --workdir / --output"
        )
    if error.errno == errno.ELOOP:
        return (
            f"{where.strip() or 'a path'} is a symbolic link that loops ({strerror}) while "
            f"{stage}; fix or remove the link"
        )
    if error.errno in (errno.EIO, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR):
        return f"{where.strip() or 'a file'}: {strerror} while {stage}"
    return None


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def describe(error: BaseException, guard: Guard) -> tuple[str, int]:
    """The one line (without ``error: ``) and the exit code for an unexpected exception."""
    stage = guard.stage
    report = guard.crash_report(error)
    if isinstance(error, BrokenPipeError):
        return f"the output stream was closed (broken pipe) while {stage}", 1
    if _out_of_memory(error):
        return (
            f"out of memory while {stage} ({with_type(error, 120)}); "
            "use a smaller model or batch (e.g. --config.model.hidden, "
            f"--config.train.batch_size, --config.eval.batch_size); {report}",
            1,
        )
    if isinstance(error, OSError) and "No usable temporary directory" in str(error):
        return (
            f"no temporary directory is writable while {stage} (a full disk?); free disk "
            f"space or set TMPDIR to a writable directory; {report}",
            1,
        )
    if isinstance(error, OSError):
        problem = _os_problem(error, stage)
        if problem is not None:
            return f"{problem}; {report}", 1
    what = with_type(error)
    return (
        f"{guard.command} failed unexpectedly while {stage} ({what}); this is not a mistake "
        f"in your input: {report}",
        1,
    )


def current() -> Guard | None:
    """The guard of the command running in this process, if any."""
    return _active


def stage(text: str) -> None:
    """Says what the command is doing now (Ctrl-C and crash lines name it)."""
    if _active is not None:
        _active.stage = text


def _is_own(workdir: Path, guard: Guard) -> bool:
    if guard.workdir is None:
        return False
    try:
        return Path(workdir).resolve() == guard.workdir.resolve()
    except OSError:
        return False


def workdir_ready(workdir: Path) -> None:
    """``runfiles.prepare_workdir`` made ``workdir`` ready to write: the command's own
    workdir takes its log from now on; another directory (a sweep's model) changes nothing."""
    guard = _active
    if guard is not None and _is_own(workdir, guard):
        guard.wrote = True
        guard.attach(Path(workdir))


def workdir_removed(workdir: Path) -> None:
    """``runfiles.roll_back`` is removing ``workdir``: what was logged there moves back to
    memory (a crash report still holds it)."""
    guard = _active
    if guard is None or not _is_own(workdir, guard):
        return
    with guard._lock:
        if guard.log_path is not None:
            with contextlib.suppress(OSError):
                text = guard.log_path.read_text(errors="replace")
                guard._buffer = text.splitlines() + guard._buffer
        guard.log_path, guard._log_dir = None, None
        guard.wrote = False
        guard.removed = True


def _say(line: str) -> None:
    with contextlib.suppress(Exception):
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """A second Ctrl-C while the first one's line is written does not cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:  # unless what ran set a handler of its own (the guard's exit restores one)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


def _roll_back(guard: Guard) -> None:
    """A command that failed before its workdir holds anything worth keeping removes the
    workdir it created (``runfiles.roll_back``)."""
    runfiles = sys.modules.get("dae_jax.runfiles")
    if runfiles is not None and guard.workdir is not None:
        with contextlib.suppress(Exception):
            runfiles.roll_back(guard.workdir)


def run(command: str, body: Callable[[Guard], int | None], *, program: bool = False) -> int:
    """Runs ``body(guard)`` under the guard; returns the exit code (never raises, except
    ``SystemExit`` from ``body``, which passes through). ``program``: the process ends
    after this (an entry point): the logging stays redirected until it does."""
    global _active
    guard = Guard(command)
    outer, _active = _active, guard
    try:
        try:
            guard._enter()
            return int(body(guard) or 0)
        except Interrupted as e:
            _say(str(e))
            return e.exit_code
        except UserError as e:
            _roll_back(guard)
            _say(f"error: {e}")
            return e.exit_code
        except KeyboardInterrupt:
            with _sigint_ignored():
                _roll_back(guard)
                _say(f"error: {guard.interrupted()}")
            return 128 + guard.signum
        except SystemExit:
            raise
        except BaseException as e:  # the crash guard: one line, the traceback in a file
            with _sigint_ignored():
                _roll_back(guard)
                try:
                    line, code = describe(e, guard)
                except Exception:  # the report itself failed: still one line
                    line, code = f"{command} failed while {guard.stage} ({first_line(e)})", 1
                _say(f"error: {line}")
            return code
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being reported
        return 130
    finally:
        _active = outer
        with _sigint_ignored():
            guard._exit(program)


def exit_quietly(code: int) -> None:
    """``sys.exit(code)`` for an entry point: a Ctrl-C while Python shuts down (JAX and
    orbax clean up at exit) ends the process at once instead of printing a traceback."""
    if threading.current_thread() is threading.main_thread():

        def at_exit(signum: int, frame: Any) -> None:
            _say(f"error: {signal.Signals(signum).name} while exiting; its work was done")
            os._exit(128 + signum)

        signal.signal(signal.SIGINT, at_exit)
        signal.signal(signal.SIGTERM, at_exit)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.exit(code)


def install_excepthook() -> None:
    """For code that runs before :func:`run` can (an experiment module's imports): an
    exception nobody catches, Ctrl-C included, ends in one line and a crash file."""
    if getattr(sys.excepthook, "_dae_jax", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(error, BaseException):  # pragma: no cover - defensive
            previous(kind, error, tb)
            return
        guard = _active or Guard(Path(sys.argv[0]).name if sys.argv else "python")
        if isinstance(error, KeyboardInterrupt):
            _say(f"error: {guard.interrupted()}")
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(130)
        if isinstance(error, UserError):
            _say(f"error: {error}")
            return
        try:
            line, _ = describe(error, guard)
        except Exception:
            line = f"{guard.command} failed while {guard.stage} ({first_line(error)})"
        _say(f"error: {line}")

    hook._dae_jax = True  # type: ignore[attr-defined]
    sys.excepthook = hook

"""A sweep killed with -9 at random moments, resumed each time, ends where an
uninterrupted one does.

    python experiments/kill_resume.py --workdir=runs/kill_resume [--kills=5] [--seed=0] \\
        [-- SWEEP FLAGS...]

Runs ``experiments/noise_sweep.py`` with the sweep flags (default: a quick synthetic
sweep) once uninterrupted into ``W/reference`` (timing it), then into ``W/killed``
with ``--kills`` SIGKILLs at moments drawn uniformly over the reference's run time
(sorted; each run is killed the gap to the next moment after its start) and each
followed by the same command again, and finally lets it finish. It
prints where each kill landed and exits 1 unless the two ``results.csv`` are identical.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("workdir", None, "Directory for the two sweeps.", required=True)
flags.DEFINE_integer("kills", 5, "How many times to kill the sweep.")
flags.DEFINE_integer("seed", 0, "Seed of the random kill moments.")

DEFAULT_SWEEP = ["--quick", "--config.data.name=synthetic", "--config.compile_cache="]
SCRIPT = Path(__file__).with_name("noise_sweep.py")


def _sweep(workdir: Path, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), f"--workdir={workdir}", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stage(workdir: Path) -> str:
    """What the sweep had finished when it was killed."""
    done = sorted(p.stem for p in (workdir / "stages").glob("*.json"))
    checkpoints = sorted(
        int(p.name) for p in workdir.glob("models/*/checkpoints/*") if p.name.isdigit()
    )
    return f"stages {done or 'none'}, checkpoints at steps {checkpoints or 'none'}"


def main(argv: list[str]) -> None:
    extra = argv[1:] or DEFAULT_SWEEP
    workdir = Path(flags.FLAGS.workdir)
    rng = random.Random(flags.FLAGS.seed)
    begin = time.perf_counter()
    reference = _sweep(workdir / "reference", extra)
    _, stderr = reference.communicate()
    if reference.returncode:
        sys.exit(f"the reference sweep failed: {stderr.strip().splitlines()[-1:]}")
    seconds = time.perf_counter() - begin
    print(f"uninterrupted: {seconds:.1f} s")
    killed = workdir / "killed"
    # The kill moments, drawn over the uninterrupted run's time and sorted: run k+1 is
    # killed the gap between moments k and k+1 after its start, so the kills spread over
    # the sweep's stages instead of landing after a resumed run (shorter) has finished.
    moments = sorted(rng.uniform(0, seconds) for _ in range(flags.FLAGS.kills))
    for i, moment in enumerate(moments):
        at = moment - (moments[i - 1] if i else 0.0)
        process = _sweep(killed, extra)
        time.sleep(at)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate()
        print(f"kill {i + 1} at {at:.1f} s (exit {process.returncode}): {_stage(killed)}")
    final = _sweep(killed, extra)
    _, stderr = final.communicate()
    if final.returncode:
        sys.exit(f"the resumed sweep failed: {stderr.strip().splitlines()[-1:]}")
    same = (killed / "results.csv").read_bytes() == (
        workdir / "reference" / "results.csv"
    ).read_bytes()
    print(f"results.csv identical to the uninterrupted run's: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    app.run(main)

"""The one training loop for every run: populations, divergence, members kept and
restorable, one writer per workdir, a sweep on many devices."""

import json
import subprocess
import tempfile
import time

import jax
import numpy as np
import pytest

import dae_jax
from dae_jax import data, train
from dae_jax.errors import UserError
from tests.conftest import (
    DAE_JAX,
    REPO,
    TINY_FLAGS,
    captured,
    cli_here,
    run_python,
    tiny_config,
)

SEEDS, LEVELS = [0, 1, 0], [0.5, 0.2, 0.0]


def _quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    """Three models, the last given a learning rate that makes it diverge, and the same
    population with a sane rate for all three."""
    config = tiny_config()
    dataset = data.load(config.data, seed=0)
    workdir = tmp_path_factory.mktemp("population") / "run"
    diverging = train.fit_many(
        config,
        seeds=SEEDS,
        levels=LEVELS,
        learning_rates=[1e-3, 1e-3, 1e30],
        workdir=workdir,
        dataset=dataset,
        log=_quiet,
    )
    sane = train.fit_many(config, seeds=SEEDS, levels=LEVELS, dataset=dataset, log=_quiet)
    return workdir, diverging, sane


def test_a_diverging_model_is_frozen_and_the_others_train_as_without_it(population):
    workdir, diverging, sane = population
    assert list(diverging.diverged) == [2] and diverging.diverged[2]["epoch"] == 1
    for k in (0, 1):  # bit-identical to the population without the diverging rate
        jax.tree.map(np.testing.assert_array_equal, diverging.model(k), sane.model(k))
    frozen = jax.tree.leaves(diverging.model(2))
    assert all(np.isfinite(leaf).all() for leaf in frozen)  # where its diverging chunk began
    assert np.isnan(diverging.final(2)["train_loss"]) and diverging.final(2)["diverged"]
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [(e["epoch"], e["model"]) for e in epochs] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
        (2, 1),
        (2, 2),
    ]
    assert [e.get("diverged", False) for e in epochs[-3:]] == [False, False, True]
    assert epochs[-1]["train_loss"] == "NaN"  # valid JSON: no bare NaN
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["diverged"] == {"2": {"epoch": 1, "step": 2}}
    assert [m["optim.learning_rate"] for m in summary["members"]] == [1e-3, 1e-3, 1e30]


def test_every_member_is_kept_and_restorable(population):
    workdir, diverging, _ = population
    for k, (seed, level) in enumerate(zip(SEEDS, LEVELS, strict=True)):
        run = dae_jax.restore(workdir, model=k, warn=_quiet)
        jax.tree.map(np.testing.assert_array_equal, run.model, diverging.model(k))
        assert (run.config.seed, run.config.noise.level, run.member) == (seed, level, k)
        assert run.epoch == 2 and run.step == 16
    assert "member=1" in repr(dae_jax.restore(workdir, model=1, warn=_quiet))
    with pytest.raises(UserError, match=r"holds 3 models \(0 to 2\); --model=3 does not exist"):
        dae_jax.restore(workdir, model=3, warn=_quiet)


def test_a_population_refuses_other_members_on_resume(population, tmp_path):
    workdir, _, _ = population
    with pytest.raises(UserError, match="members: 3 -> 2 models"):
        train.fit_many(tiny_config(), seeds=[0, 1], levels=[0.5, 0.2], workdir=workdir, log=_quiet)


def test_evaluate_and_denoise_work_on_any_member(population, tmp_path):
    workdir, _, _ = population
    result = cli_here("evaluate", f"--workdir={workdir}", "--model=1")
    assert result.returncode == 0, result.stderr
    record = json.loads(next((workdir / "evaluation").glob("*model1*.json")).read_text())
    assert record["noise_level"] == 0.2 and record["model"] == 1


# Each flag once (a repeated one is refused): TINY_FLAGS with 400 epochs.
LONG_FLAGS = [
    *(f for f in TINY_FLAGS if not f.startswith("--config.train.epochs=")),
    "--config.train.epochs=400",
]


@pytest.mark.slow  # a second process trains meanwhile
def test_one_writer_per_workdir(tmp_path):
    """A run in another process holds the workdir: this one (in this process) is refused."""
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        [*DAE_JAX, "train", f"--workdir={workdir}", *LONG_FLAGS],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = cli_here("train", f"--workdir={workdir}", *TINY_FLAGS)
        assert second.returncode == 1
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"error: {workdir} is in use by pid {first.pid} on ")
        assert line.endswith("wait for it to finish (or stop it), or use another --workdir")
        # SIGTERM once the first run trains: it writes metrics.jsonl before it installs its
        # stop handler, and a signal in between ends it uncleanly (-15, not 143).
        while '"compile"' not in (workdir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert first.returncode == 143  # it saved and stopped cleanly, undisturbed


def test_train_refuses_a_directory_that_is_not_a_workdir(tmp_path):
    (tmp_path / "config.json").write_text('{"mine": 1}')
    (tmp_path / "notes.txt").write_text("my notes")
    result = cli_here("train", f"--workdir={tmp_path}", *TINY_FLAGS)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --workdir={tmp_path} is not empty and is not a dae_jax workdir (it holds "
        "notes.txt); give a new or empty directory"
    ]
    (tmp_path / "notes.txt").unlink()
    result = cli_here("train", f"--workdir={tmp_path}", *TINY_FLAGS)
    assert (
        result.returncode == 2 and "holds a config.json that no dae_jax run wrote" in result.stderr
    )
    assert (tmp_path / "config.json").read_text() == '{"mine": 1}'
    result = cli_here("train", "--workdir=/", *TINY_FLAGS)
    assert result.stderr.strip() == (
        "error: --workdir=/ is the filesystem root; give a directory of its own"
    )


def _sweep_of_8(path: str) -> None:
    """Eight models of the tiny config in one sweep, their parameters saved to ``path``."""
    config = tiny_config(**{"train.epochs": 1})
    result = train.fit_many(
        config, seeds=list(range(8)), levels=[0.1 * k for k in range(8)], log=print
    )
    np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(result.states.params)])


EIGHT_DEVICES = "import sys; from tests.test_engine import _sweep_of_8; _sweep_of_8(sys.argv[1])"


@pytest.mark.slow  # a process with 8 simulated devices
def test_a_sweep_of_8_models_over_8_devices_matches_one_device(tmp_path):
    """Eight models on eight simulated devices (one each) train as on one device: the
    same programs per model, so equal within float32 round-off (stated: 1e-6). The
    one-device sweep runs in this process (one CPU device), the other in a process
    started with 8."""
    assert jax.device_count() == 1
    with captured() as one_out:
        _sweep_of_8(str(tmp_path / "1.npz"))
    outputs = {1: (np.load(tmp_path / "1.npz"), one_out["stdout"])}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = run_python("-c", EIGHT_DEVICES, str(tmp_path / "8.npz"), env=env)
    assert result.returncode == 0, result.stderr
    outputs[8] = (np.load(tmp_path / "8.npz"), result.stdout)
    assert "one device" in outputs[1][1]
    assert "8 devices, 8 model groups x 1 data-parallel" in outputs[8][1]
    one, eight = outputs[1][0], outputs[8][0]
    for name in one.files:
        np.testing.assert_allclose(one[name], eight[name], rtol=0, atol=1e-6)


def _events(directory):
    """(tag, step, value) of every scalar and (tag, step) of images in the event files,
    read with tensorboardX's own protobuf (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars, images = [], []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.append((value.tag, event.step))
                else:
                    scalars.append((value.tag, event.step, value.simple_value))
    return scalars, images


def test_tensorboard_profile_and_epoch_callback(tmp_path):
    seen = []
    config = tiny_config(profile_steps=3)
    result = train.fit(
        config, tmp_path, log=_quiet, on_epoch=lambda record, model: seen.append((record, model))
    )
    # The callback got each epoch's record (the metrics.jsonl one) and the model.
    assert [record["epoch"] for record, _ in seen] == [1, 2]
    assert seen[-1][0] == result.history[-1]
    jax.tree.map(np.testing.assert_array_equal, seen[-1][1], result.model)
    scalars, images = _events(tmp_path / "tensorboard")
    psnr = [(step, value) for tag, step, value in scalars if tag == "test_psnr_denoised"]
    expected = [(r["epoch"], r["test_psnr_denoised"]) for r in result.history]
    assert [s for s, _ in psnr] == [1, 2]
    np.testing.assert_allclose([v for _, v in psnr], [v for _, v in expected], rtol=1e-6)
    assert {"train_loss", "test_ssim_denoised", "examples_per_second"} <= {t for t, _, _ in scalars}
    assert images == [("denoising", 2)]  # at the epoch, as the scalars
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_tensorboard_can_be_turned_off(tmp_path):
    train.fit(tiny_config(tensorboard=False, **{"train.epochs": 1}), tmp_path, log=_quiet)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "profile").exists()


def test_on_a_terminal_training_shows_a_progress_bar_and_the_lines_above_it(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    config = tiny_config(tensorboard=False, **{"train.epochs": 1})
    train.fit(config, tmp_path)  # no log: lines go through the bar
    out, err = capsys.readouterr()
    lines = (out + err).splitlines()
    assert any(line.startswith("====> Epoch: 1 Average loss") for line in lines)
    assert "8/8 [" in err and "step/s]" in err  # the bar counted every step, on stderr
    assert err.endswith(" \r")  # and was cleared at the end (leave=False)


def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    from dae_jax import engine

    free, where = engine.available_memory()
    assert free is not None and free > 2**20 and where == "available on this host"
    monkeypatch.setattr(engine, "available_memory", lambda: (2**20, "available on this host"))
    workdir = tmp_path / "w"
    with pytest.raises(UserError) as caught:
        train.fit_many(tiny_config(), seeds=[0, 1], workdir=workdir, log=_quiet)
    message = str(caught.value)
    assert message.startswith("this run needs at least 0.0 GiB (2 model(s) of ")
    assert "more than the 0.0 GiB available on this host: use a smaller model" in message
    count = int(message.split(" model(s) of ")[1].split(" ")[0].replace(",", ""))
    assert count == 106_464  # the tiny 784-64-32-16 MLP's, mirrored, each model's own
    assert not workdir.exists()


def test_the_memory_bound_counts_every_model_on_the_cpu_and_a_share_per_accelerator(
    monkeypatch,
):
    from dae_jax import engine

    dataset = data.synthetic(0, 64, 16)
    config = engine.with_image_shape(tiny_config(), dataset)
    cpu = engine.check_memory(config, 4, dataset)  # 8 CPU devices would share the host's

    class Accelerator:
        platform = "gpu"

    monkeypatch.setattr(engine.jax, "local_devices", lambda: [Accelerator()] * 4)
    monkeypatch.setattr(engine, "available_memory", lambda: (None, ""))
    each = engine.check_memory(config, 4, dataset)  # one model on each of 4 devices
    data_bytes = dataset.train_images.nbytes + dataset.test_images.nbytes
    assert cpu - data_bytes == 4 * (each - data_bytes) > 4 * 106_464 * 4 * 4


def test_a_job_s_memory_limit_counts_when_lower_than_the_host_s(tmp_path, monkeypatch):
    from dae_jax import engine

    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**29}\n")
    monkeypatch.setattr(engine, "CGROUP_MEMORY", [(str(tmp_path), "memory.max", "memory.current")])
    assert engine.available_memory() == (2**29, "left under this job's memory limit (cgroup)")
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the host's
    assert engine.available_memory()[1] == "available on this host"


def test_a_full_disk_stops_at_the_first_save_keeping_the_last_good_one(tmp_path, monkeypatch):
    from collections import namedtuple

    from dae_jax import checkpointing

    config = tiny_config(**{"train.epochs": 1})
    train.fit(config, tmp_path, log=_quiet)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(1, 1, 2**20))
    config.train.epochs = 3
    with pytest.raises(UserError) as error:
        train.fit(config, tmp_path, log=_quiet)
    assert str(error.value).startswith(
        f"cannot save checkpoint 16 in {tmp_path / 'checkpoints'} (1 MiB free, "
    )
    assert str(error.value).endswith(
        f"the last good one is {tmp_path / 'checkpoints' / '8'}; free disk space (or move the "
        "workdir) and run the same command again to resume"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["8"]
    monkeypatch.undo()  # space again: the run resumes from epoch 1 and finishes
    result = train.fit(config, tmp_path, log=_quiet)
    assert result.summary["resumed_from_step"] == 8 and len(result.history) == 3


def test_members_of_one_noise_kind_other_than_the_base_config_s_train_with_theirs():
    """A population whose members all use masking, on a base config of Gaussian noise,
    trains exactly the masking run fit makes (the kind is the members', not the base's)."""
    config = tiny_config(**{"train.epochs": 1})
    many = train.fit_many(
        config, seeds=[0], values=[{"noise.kind": "masking", "noise.level": 0.25}], log=_quiet
    )
    single = train.fit(
        tiny_config(**{"train.epochs": 1, "noise.kind": "masking", "noise.level": 0.25}),
        tempfile.mkdtemp(prefix="dae_jax-test-"), log=_quiet,
    )  # fmt: skip
    for a, b in zip(
        jax.tree.leaves(many.states.params), jax.tree.leaves(single.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b))

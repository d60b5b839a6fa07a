"""Issue 11 (trust), the command line: every flag a subcommand accepts changes what runs,
any other is refused in one line saying what to use instead; --help on every subcommand;
configs by name; seeds that would collide; a backend or launcher that cannot start."""

import socket
import time

import ml_collections
import pytest

from dae_jax import cli, configs, inference, parallel, train
from dae_jax.configs import default
from dae_jax.errors import UserError
from tests.conftest import cli_here, run_cli


def run_main(capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["dae-jax", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.fixture
def calls(monkeypatch):
    """Replaces what the commands run with recorders: what would train or evaluate run?"""
    seen: dict = {}
    monkeypatch.setattr(train, "fit", lambda config, workdir: seen.update(fit=(config, workdir)))
    monkeypatch.setattr(
        inference, "evaluate_workdir", lambda workdir, **kw: seen.update(evaluate=(workdir, kw))
    )
    monkeypatch.setattr(
        inference,
        "denoise_files",
        lambda workdir, output, images, **kw: seen.update(denoise=(output, images, kw)),
    )
    return seen


NOT_HERE = [
    (
        ["train", "--workdir=W", "--noise.level=0.1"],
        "--noise.level is a flag of evaluate, not train; to train with other noise use "
        "--config.noise.level=VALUE",
    ),
    (
        ["train", "--workdir=W", "--noise.kind", "masking"],
        "--noise.kind is a flag of evaluate, not train; to train with other noise use "
        "--config.noise.kind=VALUE",
    ),
    (
        ["evaluate", "--workdir=W", "--config.noise.level=0.3"],
        "--config.noise.level does not apply to evaluate: it evaluates the run as trained, "
        "with its own config (W/config.json); for other noise use --noise.level=VALUE",
    ),
    (
        ["evaluate", "--workdir=W", "--config.seed=3"],
        "--config.seed does not apply to evaluate: it evaluates the run as trained, with its "
        "own config (W/config.json); it takes only --noise.kind and --noise.level",
    ),
    (
        ["evaluate", "--workdir=W", "--config=seed"],
        "--config does not apply to evaluate: it evaluates the run as trained, with its own "
        "config (W/config.json); it takes only --noise.kind and --noise.level",
    ),
    (
        ["denoise", "--workdir=W", "--output=o", "--config.seed=1", "a.png"],
        "--config.seed does not apply to denoise: it uses the run's model as trained; it "
        "takes only --workdir, --output and --invert",
    ),
    (
        ["denoise", "--workdir=W", "--output=o", "--noise.level=0.3", "a.png"],
        "--noise.level does not apply to denoise: it denoises the images as they are; to "
        "measure the model under other noise use dae-jax evaluate --noise.level=VALUE",
    ),
    (
        ["train", "--workdir=W", "--output=o"],
        "--output is a flag of denoise, not train (dae-jax train --help)",
    ),
    (
        ["evaluate", "--workdir=W", "--invert"],
        "--invert is a flag of denoise, not evaluate (dae-jax evaluate --help)",
    ),
    (
        ["train", "--workdir=W", "--noinvert"],
        "--noinvert is a flag of denoise, not train (dae-jax train --help)",
    ),
    (
        ["evaluate", "--workdir=W", "--bogus=1"],
        "Unknown command line flag 'bogus' (dae-jax evaluate --help)",
    ),
    (
        ["evaluate", "--workdir=W", "--flagfile=flags.txt"],
        "--flagfile is not supported: put the flags on the command line (and settings in a "
        "config file: --config=FILE)",
    ),
    (
        ["train", "--workdir=W", "--undefok=noise.level", "--noise.level=0.1"],
        "--undefok is not supported: put the flags on the command line (and settings in a "
        "config file: --config=FILE)",
    ),
]


@pytest.mark.parametrize(("args", "message"), NOT_HERE, ids=lambda v: " ".join(v)[:40])
def test_a_flag_that_does_not_apply_is_refused(tmp_path, monkeypatch, capsys, calls, args, message):
    monkeypatch.chdir(tmp_path)
    code, lines, out = run_main(capsys, *args)
    assert (code, lines) == (2, [f"error: {message}"])
    assert calls == {} and list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_the_flags_a_command_accepts_reach_what_it_runs(tmp_path, capsys, calls):
    code, _, _ = run_main(
        capsys, "evaluate", f"--workdir={tmp_path}", "--noise.kind=masking", "--noise.level=0.3",
        "--model=2",
    )  # fmt: skip
    assert code == 0
    assert calls["evaluate"] == (
        str(tmp_path), {"noise_kind": "masking", "noise_level": 0.3, "model": 2}
    )  # fmt: skip
    code, _, _ = run_main(
        capsys, "denoise", f"--workdir={tmp_path}", "--output=o", "--invert", "a.png", "b.png"
    )
    assert code == 0
    assert calls["denoise"] == ("o", ["a.png", "b.png"], {"invert": True, "model": 0})
    code, _, _ = run_main(capsys, "train", f"--workdir={tmp_path}", "--config.noise.level=0.1")
    assert code == 0
    assert calls["fit"][0].noise.level == 0.1


@pytest.mark.parametrize("spec", ["seed", "seed.py", "dae_jax/configs/seed.py"])
def test_configs_by_name_work_outside_the_checkout(tmp_path, monkeypatch, capsys, calls, spec):
    monkeypatch.chdir(tmp_path)  # no dae_jax/configs/ here: an installed package's user
    code, lines, _ = run_main(capsys, "train", "--workdir=w", f"--config={spec}")
    assert (code, lines) == (0, [])
    config = calls["fit"][0]
    assert (config.data.name, config.noise.level, config.noise.clip) == ("mnist", 1.0, False)
    calls.clear()
    code, _, _ = run_main(capsys, "train", "--workdir=w", "--config", "default")
    assert code == 0 and calls["fit"][0].to_dict() == default.get_config().to_dict()


def test_a_config_file_still_wins_and_an_unknown_name_lists_the_names(
    tmp_path, monkeypatch, capsys, calls
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seed").write_text(
        "from dae_jax.configs import default\n"
        "def get_config():\n    c = default.get_config()\n    c.seed = 7\n    return c\n"
    )
    code, _, _ = run_main(capsys, "train", "--workdir=w", "--config=seed")
    assert code == 0 and calls["fit"][0].seed == 7  # the file in the working directory
    code, lines, _ = run_main(capsys, "train", "--workdir=w", "--config=tutorial")
    assert (code, lines) == (
        2,
        [
            "error: --config=tutorial: no such file or config name; give a Python file with "
            "get_config() or one of the names default, natural, seed, e.g. --config=seed"
        ],
    )
    code, lines, _ = run_main(capsys, "train", "--workdir=w", "--config")
    assert (code, lines) == (
        2,
        ["error: --config needs a value (nothing follows it); give --config=VALUE"],
    )
    assert configs.names() == ("default", "natural", "seed")


@pytest.mark.parametrize("flag", ["--help", "-h", "-help", "--helpfull"])
@pytest.mark.parametrize("command", ["train", "evaluate", "denoise"])
def test_help_on_every_subcommand(capsys, calls, command, flag):
    code, lines, out = run_main(capsys, command, flag, "--workdir=W", "--bogus")
    assert (code, lines, calls) == (0, [], {})
    assert out.startswith(f"usage: dae-jax {command} --workdir=W")
    assert "--workdir=W" in out
    if command == "train":
        for key, value in (
            ("seed", "0"),
            ("noise.level", "0.5"),
            ("model.hidden", "(512, 256, 128)"),
            ("data.name", "'fashion_mnist'"),
        ):
            assert f"  --config.{key}={value}\n" in out
        keys = [line.split("=")[0] for line in out.splitlines() if line.startswith("  --config.")]
        assert keys[1:] == [f"  --config.{key}" for key, _ in cli._config_keys()]
        assert len(keys) == 1 + 42  # the override flag, then every key
    if command == "evaluate":
        assert "--noise.kind=KIND    gaussian, masking, salt_and_pepper" in out
    if command == "denoise":
        assert "--invert" in out and "--output=DIR" in out


def test_version_and_top_level_help(capsys):
    code, lines, out = run_main(capsys, "--version")
    assert (code, lines, out) == (0, [], "dae-jax 0.1.0\n")
    code, _, out = run_main(capsys, "--help")
    assert code == 0 and "dae-jax COMMAND --help" in out and "--config=seed" in out
    assert run_main(capsys, "train", "--version")[::2] == (0, "dae-jax 0.1.0\n")
    assert run_main(capsys, "help", "denoise") == (0, [], cli.command_help("denoise"))


SEED_RANGE = (
    "must be an integer from 0 to 4294967295 (JAX keys hold 32 bits: any other seed repeats "
    "the run of one of these, or overflows)"
)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**32 + 4, 2**63 - 1, 2**64])
def test_seeds_that_would_repeat_another_run_are_refused(tmp_path, capsys, seed):
    code, lines, _ = run_main(
        capsys, "train", f"--workdir={tmp_path / 'w'}", f"--config.seed={seed}"
    )
    assert (code, lines) == (2, [f"error: config seed={seed} is invalid: {SEED_RANGE}"])
    assert not (tmp_path / "w").exists()


def test_seed_range_is_exactly_the_distinct_keys():
    import jax
    import numpy as np

    for seed in (0, 1, 2**31, 2**32 - 1):
        config = default.get_config()
        config.seed = seed
        configs.validate(config)
        np.testing.assert_array_equal(
            jax.random.key_data(jax.random.key(seed)), [0, seed]
        )  # distinct: the key holds the seed itself
    # The first refused seed is the one JAX would turn into seed 0's key.
    np.testing.assert_array_equal(jax.random.key_data(jax.random.key(2**32)), [0, 0])


def test_validate_refuses_unknown_keys_and_takes_a_dict():
    config = default.get_config()
    config.train.lr = 5.0
    with pytest.raises(UserError) as error:
        configs.validate(config)
    assert str(error.value) == (
        "unknown config key 'train.lr'; the keys are listed in dae_jax/configs/default.py"
    )
    config = default.get_config()
    config.extra = ml_collections.ConfigDict({"x": 1})
    with pytest.raises(UserError, match=r"^unknown config key 'extra'; "):
        configs.validate(config)

    plain = default.get_config().to_dict()
    checked = configs.validate(plain)
    assert isinstance(checked, ml_collections.ConfigDict)
    assert checked.to_dict() == plain and checked.train.epochs == 10
    plain["noise"]["levle"] = 0.1
    with pytest.raises(UserError, match=r"^unknown config key 'noise.levle'; "):
        configs.validate(plain)
    config = default.get_config()
    assert configs.validate(config) is config
    with pytest.raises(UserError) as error:
        configs.validate(None)
    assert str(error.value) == (
        "a config must be an ml_collections.ConfigDict (or a dict of the same keys), not "
        "NoneType; start from dae_jax.configs.default.get_config()"
    )


def test_a_config_file_with_an_extra_key_is_refused(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(
        "from dae_jax.configs import default\n"
        "def get_config():\n    c = default.get_config()\n    c.train.lr = 5.0\n    return c\n"
    )
    code, lines, _ = run_main(
        capsys, "train", f"--workdir={tmp_path / 'w'}", f"--config={tmp_path / 'mine.py'}"
    )
    assert (code, lines) == (
        2,
        ["error: unknown config key 'train.lr'; the keys are listed in dae_jax/configs/default.py"],
    )
    assert not (tmp_path / "w").exists()


LAUNCHER = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"}
FIX = "fix or unset the launcher's variables"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {**LAUNCHER, "JAX_PROCESS_ID": "abc"},
            "JAX_PROCESS_ID=abc is invalid: it must be this process's index, an integer from "
            f"0 to 1; {FIX}",
        ),
        (
            {**LAUNCHER, "JAX_PROCESS_ID": "2"},
            "JAX_PROCESS_ID=2 is invalid: it must be this process's index, an integer from "
            f"0 to 1; {FIX}",
        ),
        (
            {**LAUNCHER, "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"},
            "JAX_NUM_PROCESSES=0 is invalid: it must be the number of processes, an integer "
            f"from 1 to 1048576; {FIX}",
        ),
        (
            {**LAUNCHER, "JAX_COORDINATOR_ADDRESS": "host0", "JAX_PROCESS_ID": "0"},
            "JAX_COORDINATOR_ADDRESS=host0 is invalid: it must be HOST:PORT of process 0, "
            "e.g. host0:1234",
        ),
        (
            {**LAUNCHER, "JAX_PROCESS_ID": "0", "DAE_JAX_COORDINATOR_TIMEOUT": "soon"},
            "DAE_JAX_COORDINATOR_TIMEOUT=soon is invalid: it must be seconds to wait for the "
            f"others, an integer from 1 to 1000000; {FIX}",
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "many"},
            f"SLURM_NTASKS=many is invalid: it must be the number of tasks, an integer >= 1; {FIX}",
        ),
    ],
    ids=["id-abc", "id-too-big", "num-0", "address", "timeout", "slurm"],
)
def test_bad_launcher_variables_are_one_line(environ, message):
    with pytest.raises(UserError) as error:
        parallel.initialize_distributed(environ)
    assert str(error.value) == message


def test_bad_launcher_variable_from_the_command_line(tmp_path, monkeypatch):
    for name, value in {**LAUNCHER, "JAX_PROCESS_ID": "abc"}.items():
        monkeypatch.setenv(name, value)  # refused before JAX is asked to join anything
    result = cli_here("evaluate", f"--workdir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: JAX_PROCESS_ID=abc is invalid: it must be this process's index, an integer "
        f"from 0 to 1; {FIX}"
    ]


@pytest.mark.slow  # a process that waits for a coordinator
def test_a_coordinator_that_never_comes_ends_in_one_line_in_bounded_time(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    address = f"127.0.0.1:{port}"
    start = time.monotonic()
    result = run_cli(
        "evaluate",
        f"--workdir={tmp_path}",
        env={
            "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1",
            "DAE_JAX_COORDINATOR_TIMEOUT": "2",
        },
        timeout=120,
    )
    assert time.monotonic() - start < 60
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: gave up after 2 s waiting for process 0 (the coordinator) at {address} and "
        "the others; start process 0 (JAX_PROCESS_ID=0) on that host, check "
        "JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, or wait longer with "
        "DAE_JAX_COORDINATOR_TIMEOUT=SECONDS"
    ]


@pytest.mark.slow  # a fresh process: JAX's backend starts once per process
def test_a_backend_that_is_not_installed_is_one_line(tmp_path):
    result = run_cli("evaluate", f"--workdir={tmp_path}", env={"JAX_PLATFORMS": "cuda"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: JAX_PLATFORMS=cuda: JAX cannot start that backend (no plugin for it is "
        "installed); unset JAX_PLATFORMS to use what this machine has (the CPU at least), or "
        "install the backend's jax package, e.g. pip install 'jax[cuda12]' for NVIDIA GPUs"
    ]


def test_careless_workdir_and_config_arguments(tmp_path, capsys, calls):
    code, lines, _ = run_main(capsys, "evaluate", str(tmp_path))
    assert (code, lines) == (
        2,
        [
            "error: --workdir is required: the directory the run writes to "
            f"(did you mean --workdir={tmp_path}?)"
        ],
    )
    afile = tmp_path / "photo.png"
    afile.write_text("x")
    for command in ("evaluate", "denoise"):
        code, lines, _ = run_main(capsys, command, f"--workdir={afile}", "--output=o", "a.png")
        if command == "evaluate":  # --output is refused first
            assert code == 2 and "--output is a flag of denoise" in lines[0]
            code, lines, _ = run_main(capsys, command, f"--workdir={afile}")
        assert (code, lines) == (
            2,
            [f"error: --workdir={afile} is a file; give the directory of a trained run"],
        )
    code, lines, _ = run_main(capsys, "train", "--workdir=w", f"--config={tmp_path}")
    assert (code, lines) == (
        2,
        [
            f"error: --config={tmp_path} is a directory; give a Python file with get_config() "
            "or one of the names default, natural, seed, e.g. --config=seed"
        ],
    )
    assert calls == {}


@pytest.mark.slow  # processes that try to join a cluster
def test_a_cluster_that_is_not_there_or_a_busy_port_is_one_line(tmp_path):
    result = run_cli("evaluate", f"--workdir={tmp_path}", env={"DAE_JAX_DISTRIBUTED": "1"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: DAE_JAX_DISTRIBUTED=1 asks for a multi-process run, but JAX finds none to join "
        "here (coordinator_address should be defined.); start every process with the "
        "cluster's launcher (srun, mpirun, --worker=all on a TPU pod) or set "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID"
    ]
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "evaluate",
            f"--workdir={tmp_path}",
            env={
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
            },
        )
    assert result.returncode == 1  # JAX itself would crash with a segmentation fault
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} of JAX_COORDINATOR_ADDRESS=localhost:{port} is in use on this "
        "host, where process 0 must listen; pick a free port for every process"
    ]

"""``dae-jax bench``, run in this process on tiny settings: what it measures, writes and
compares, and the one-line errors for wrong flags."""

import json

import pytest

from dae_jax import bench, cli
from tests.test_data import write_idx_dir

# The seed MLP's matmuls: 784-512-256-128 and mirrored.
WIDTHS = [784, 512, 256, 128, 256, 512, 784]
MACS = sum(a * b for a, b in zip(WIDTHS[:-1], WIDTHS[1:], strict=True))


def run_bench(capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["dae-jax", "bench", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``dae-jax bench --quick`` shrunk: K = 1, 2 at batch 8 and the conv DAE at batch 4,
    both precisions; the MLP's time to quality (the quick default: float32) on a tiny
    Fashion-MNIST-shaped IDX directory, to a target the first evaluation reaches."""
    root = tmp_path_factory.mktemp("bench")
    write_idx_dir(root / "fashion", gz=True, n_train=256, n_test=64)
    with pytest.MonkeyPatch.context() as patch:
        outputs: list[str] = []
        patch.setattr("builtins.print", lambda *a, **k: outputs.append(" ".join(map(str, a))))
        code = bench.main(
            [
                "dae-jax bench",
                "--quick",
                f"--workdir={root / 'out'}",
                "--models=1,2",
                "--batch_sizes=8",
                "--conv_batch_size=4",
                "--num_images=64",
                "--matmul_size=64",
                "--repeats=1",
                "--steps=3",
                "--call_seconds=1e-9",
                f"--data_dir={root / 'fashion'}",
                "--mlp_target=1",
            ]
        )
    assert code == 0, outputs
    return root / "out", json.loads((root / "out" / "bench.json").read_text()), outputs


@pytest.mark.slow  # ~40 s on 2 cores: 6 settings and a short training, each compiled
def test_bench_measures_every_setting_in_both_precisions(tiny_run):
    workdir, results, outputs = tiny_run
    device = results["device"]
    assert device["platform"] == "cpu" and device["cpu_count"] >= 1 and device["cpu"]
    assert {"jax", "jaxlib", "flax", "optax", "python"} <= set(device["versions"])
    assert set(results["matmul_peak"]) == {"float32", "bfloat16"}
    assert all(p["flops_per_second"] > 0 for p in results["matmul_peak"].values())
    assert results["bandwidth"]["bytes_per_second"] > 0
    assert all(load >= 0 for load in results["load_average"])
    # --quick chose the workloads and the time-to-quality precision; the flags the rest.
    assert results["settings"]["workloads"] == ["population", "conv"]
    assert results["settings"]["quality_precisions"] == ["float32"]
    rows = results["rows"]
    expected = [("population", 8, 1), ("population", 8, 2), ("conv", 4, 1)]
    assert [(r["workload"], r["batch_size"], r["models"], r["precision"]) for r in rows] == [
        (*e, p) for e in expected for p in ("float32", "bfloat16")
    ]
    for r in rows:
        assert r["steps_per_call"] == 1  # --call_seconds=1e-9: one step a call
        assert 0 < r["seconds_per_step_min"] <= r["seconds_per_step_median"]
        assert r["seconds_per_step_median"] <= r["seconds_per_step_max"]
        assert r["examples_per_second"] == pytest.approx(
            r["models"] * r["batch_size"] / r["seconds_per_step_median"]
        )
        assert r["compile_seconds"] > 0 and r["memory_estimate_bytes"] > 0
        assert r["device_peak_bytes"] is None  # the CPU has no memory_stats()
        assert r["arithmetic_intensity"] == pytest.approx(r["flops_per_step"] / r["bytes_per_step"])
        peak = results["matmul_peak"][r["precision"]]["flops_per_second"]
        assert r["fraction_of_peak"] == pytest.approx(r["flops_per_second"] / peak)
    for r in rows[:4]:
        # XLA's FLOPs: at least the matmuls forward and backward (weights, and inputs of
        # all but the first layer), 2 FLOPs a multiply-add, for each of the K models.
        minimum = 2 * 8 * r["models"] * (3 * MACS - 784 * 512)
        assert r["flops_per_step"] >= minimum
        assert r["memory_estimate_bytes"] >= r["models"] * 3 * 4 * 1_132_944  # params, Adam
    assert rows[2]["flops_per_step"] == pytest.approx(2 * rows[0]["flops_per_step"], rel=0.05)
    assert "memory_stats() is not available" in results["memory_note"]
    assert any("float32 matmul peak (64x64)" in line for line in outputs)


@pytest.mark.slow
def test_bench_times_to_quality_and_writes_its_tables_and_figures(tiny_run):
    workdir, results, _ = tiny_run
    assert results["data_note"] is None  # the IDX directory was read, not synthetic data
    [quality] = results["quality"]
    assert (quality["workload"], quality["precision"], quality["target_psnr"]) == (
        "mlp",
        "float32",
        1.0,
    )
    # 256 images at batch 128: 2 steps an epoch, evaluated after each (a quarter epoch
    # rounds up to a step); the first evaluation reaches 1 dB.
    assert (quality["steps"], quality["eval_every"], quality["test_images"]) == (1, 1, 64)
    assert quality["seconds"] >= quality["compile_seconds"] + quality["eval_seconds"] > 0
    assert quality["curve"] == [
        [pytest.approx(quality["seconds"], abs=1e-3), 1, quality["best_psnr"]]
    ]
    markdown = (workdir / "bench.md").read_text()
    assert markdown.startswith("Machine: cpu (cpu; CPU ")
    assert "| mlp 512-256-128 | bfloat16 | 8 | 2 |" in markdown
    assert "| mlp 512-256-128 | float32 | gaussian 0.5 | 1.0 |" in markdown
    for name in ("population.png", "roofline.png"):
        png = (workdir / "figures" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.slow
def test_compare_puts_two_runs_side_by_side(tiny_run, tmp_path, capsys):
    workdir, results, _ = tiny_run
    # B: the same run, twice as fast.
    faster = json.loads(json.dumps(results))
    for r in faster["rows"]:
        r["seconds_per_step_median"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(faster))
    code, errors, out = run_bench(
        capsys, "--compare", str(workdir / "bench.json"), str(tmp_path / "b.json")
    )
    assert (code, errors) == (0, [])
    lines = out.splitlines()
    device = results["device"]
    machine = f"cpu (cpu; CPU {device['cpu']} x{device['cpu_count']})"
    assert lines[:2] == [
        f"A: {workdir / 'bench.json'}: {machine}",
        f"B: {tmp_path / 'b.json'}: {machine}",
    ]
    table = [line for line in lines if line.startswith("| mlp") or line.startswith("| conv")]
    assert len(table) == 6 + 1  # every speed row, then the time to quality
    assert all(" 2.00x " in line for line in table[:6])
    assert table[-1].startswith("| mlp 512-256-128 | float32 | 1.0 / 1.0 |")


@pytest.mark.parametrize(
    "args, line",
    [
        (["--bogus"], "error: Unknown command line flag 'bogus' (dae-jax bench --help)"),
        (
            ["--precisions=float16"],
            "error: --precisions: 'float16' is not one of float32, bfloat16",
        ),
        (
            ["--workloads=mlp"],
            "error: --workloads: 'mlp' is not one of population, conv, patch",
        ),
        (["--models=0,8"], "error: --models takes positive integers, not '0,8'"),
        (["--repeats=0"], "error: --repeats must be an integer >= 1, not 0"),
        (["--call_seconds=-1"], "error: --call_seconds must be a number > 0, not -1.0"),
        (
            ["results.json"],
            "error: unexpected argument 'results.json' (only --compare takes files; "
            "dae-jax bench --help)",
        ),
        (["--compare", "a.json"], "error: --compare takes two bench.json files, A and B; got 1"),
        (
            ["--compare", "missing.json", "b.json"],
            "error: --compare: cannot read missing.json (No such file or directory)",
        ),
    ],
)
def test_wrong_flags_are_one_line(capsys, args, line):
    code, errors, out = run_bench(capsys, *args)
    assert (code, errors, out) == (2, [line], "")


def test_compare_refuses_a_file_that_is_not_a_bench_result(capsys, tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.txt").write_text("not json")
    code, errors, _ = run_bench(
        capsys, "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.txt")
    )
    assert (code, errors) == (
        2,
        [f"error: --compare: {tmp_path / 'a.json'} is not a bench.json (no rows or device)"],
    )
    code, errors, _ = run_bench(
        capsys, "--compare", str(tmp_path / "b.txt"), str(tmp_path / "a.json")
    )
    assert errors == [
        f"error: --compare: {tmp_path / 'b.txt'} is not JSON; give two bench.json files"
    ]


def test_help_lists_the_flags_and_usage_names_the_command(capsys):
    code, errors, out = run_bench(capsys, "--help")
    assert (code, errors) == (0, [])
    assert out.startswith("usage: dae-jax bench [--quick]")
    for flag in ("--compare", "--precisions=LIST", "--models=LIST", "--quality=LIST"):
        assert flag in out
    assert "dae-jax bench    [--quick]" in cli.USAGE

"""Smoke tests: every benchmark runs end to end on tiny settings (no timing is asserted)."""

import pytest

from jigsawdata.benchmarks import build_shards as bench_build
from jigsawdata.benchmarks import pipeline_throughput as bench_pipeline


@pytest.mark.slow
def test_build_benchmark_runs(real_coco, tmp_path):
    result = bench_build.main(["--coco", str(real_coco), "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert result["images"] == 288 and result["crops"] > 2000
    assert result["build_seconds"]["median"] > 0 and result["ratio"] > 0
    assert (tmp_path / "r.json").is_file()
    assert "ratio build / bound" in bench_build.format_table(result)


@pytest.mark.slow
def test_pipeline_benchmark_runs(built_synthetic):
    result = bench_pipeline.run(shards=built_synthetic, workers=1, batch=4, batches=1, repeats=1)
    assert set(result["images_per_s"]) >= {"dali_cpu", "reference", "decode_whole"}
    assert result["ratio_dali_cpu_over_reference"] > 0 and result["ratio_dali_cpu_over_decode_whole"] > 0
    # CPU time per image of every pipeline, threads and worker processes together (Linux /proc);
    # with a GPU the table adds DALI-GPU and the training step it has to keep up with.
    assert set(result["cpu_ms_per_image"]) == set(result["images_per_s"]) - {"rn50_amp_step"}
    assert result["cpu_ms_per_image"]["dali_cpu"]["median"] > 0
    assert "CPU ms/image" in bench_pipeline.format_table(result)


def test_cpu_seconds_counts_live_worker_processes():
    import multiprocessing
    import time

    from jigsawdata.benchmarks.common import cpu_seconds

    context = multiprocessing.get_context("fork")
    stop = context.Event()
    worker = context.Process(target=_spin_until, args=(stop,))
    before, own = cpu_seconds(), time.process_time()
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while cpu_seconds() - before - (time.process_time() - own) < 0.2:  # the worker's share only
            assert time.monotonic() < deadline, "a worker process's CPU time is not counted"
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join()


def _spin_until(stop) -> None:
    while not stop.is_set():
        pass


@pytest.mark.slow
def test_loss_overhead_benchmark_runs():
    from jigsawdata.benchmarks import loss_overhead

    result = loss_overhead.run(arch="resnet18", batch=2, steps=1, repeats=1, erf_every=10, erf_images=1)
    assert result["plain_step_s"]["median"] > 0 and result["erf_dense_step_s"]["median"] > 0
    assert result["erf_refresh_amortised_s"] == result["erf_refresh_s"]["median"] / 10
    assert "overhead" in loss_overhead.format_table(result)


@pytest.mark.slow
def test_cost_claim_runs(built_real, real_coco):
    from jigsawdata.benchmarks import cost_claim

    result = cost_claim.run(
        real_coco, arch="resnet18", batch=4, steps=1, repeats=1, warmup=1, erf_images=1, shards=built_real
    )
    p = result["projection"]
    assert p["image_ratio"] == 64_000 * 512 / (90 * 1_281_167)
    assert p["paper_ratio"] == 1.73 / 6.80 and p["ratio"] > 0
    assert 0 <= result["jigsaw"]["data_wait_fraction"]["median"] <= 1
    assert "cost ratio Jigsaw / ImageNet" in cost_claim.format_table(result)


@pytest.mark.slow
def test_bench_all_quick_writes_the_report(real_coco, tmp_path):
    import json

    from click.testing import CliRunner
    from PIL import Image

    from jigsawdata.cli import main

    result = CliRunner().invoke(main, ["bench", "all", "--quick", "--out", str(tmp_path), "--coco", str(real_coco)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["results"]) == {"build", "pipeline", "loss", "cost"}
    assert report["environment"]["packages"]["torch"]
    md = (tmp_path / "report.md").read_text()
    assert "## cost" in md and "quick" in md
    assert Image.open(tmp_path / "cost.png").size == (640, 360)
    assert Image.open(tmp_path / "pipelines.png").size == (640, 360)


@pytest.mark.slow
def test_bench_all_without_dali_runs_the_benchmarks_that_fit(real_coco, tmp_path, monkeypatch):
    import json
    import sys

    from click.testing import CliRunner

    from jigsawdata.cli import main

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    result = CliRunner().invoke(main, ["bench", "all", "--quick", "--out", str(tmp_path), "--coco", str(real_coco)])
    assert result.exit_code == 0, result.output
    assert "skipping pipeline, cost: NVIDIA DALI cannot be imported (" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["results"]) == {"build", "loss"} and set(report["skipped"]) == {"pipeline", "cost"}
    assert "pip install 'jigsawdata[dali]'" in report["skipped"]["cost"]
    assert "## pipeline: not run" in (tmp_path / "report.md").read_text()


def test_reports_name_the_command_as_it_can_be_rerun(monkeypatch):
    """``python -m jigsawdata.benchmarks.X`` sets sys.argv[0] to the module's file, a path of one
    checkout: the report names the module instead; a console script by its name."""
    import sys
    import types

    from jigsawdata.benchmarks.common import command

    module = types.ModuleType("__main__")
    module.__spec__ = types.SimpleNamespace(name="jigsawdata.benchmarks.gpu_check")
    monkeypatch.setitem(sys.modules, "__main__", module)
    monkeypatch.setattr(sys, "argv", ["/somewhere/benchmarks/gpu_check.py", "--out", "r"])
    assert command() == "python -m jigsawdata.benchmarks.gpu_check --out r"
    module.__spec__ = types.SimpleNamespace(name="jigsawdata.__main__")  # python -m jigsawdata bench ...
    monkeypatch.setattr(sys, "argv", ["/x/jigsawdata/__main__.py", "bench", "all"])
    assert command() == "python -m jigsawdata bench all"
    module.__spec__ = None
    monkeypatch.setattr(sys, "argv", ["/home/u/.venv/bin/jigsawdata", "bench", "all"])
    assert command() == "jigsawdata bench all"


def test_bench_outside_a_checkout_asks_for_coco(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from jigsawdata.benchmarks import common
    from jigsawdata.cli import main

    monkeypatch.setattr(common, "DEFAULT_COCO", tmp_path / "absent")
    result = CliRunner().invoke(main, ["bench", "build", "--quick", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "bench build reads real photographs: give --coco DIR" in result.output
    assert not (tmp_path / "r").exists()


def test_gpu_check_skips_the_tests_it_cannot_find(monkeypatch, tmp_path):
    from jigsawdata.benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # an installed package: no tests/ beside it
    summary = gpu_check.run(tmp_path / "report", tmp_path, only=("tests",))
    assert summary["steps"]["tests"]["status"] == "skipped"
    assert "source checkout" in summary["steps"]["tests"]["reason"]
    assert "## tests: skipped" in (tmp_path / "report" / "summary.md").read_text()

"""Pre-training end to end on the real subset: the loss falls, kill-and-resume is exact."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.trainer.checkpoint import load
from jigsawdata.trainer.pretrain import PretrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_thirty_iterations_of_resnet18_lower_the_loss(built_real, tmp_path):
    logs = []
    cfg = PretrainConfig(
        shards=str(built_real),
        out=str(tmp_path / "run"),
        arch="resnet18",
        iterations=30,
        batch=8,
        warmup=3,
        log_every=1,
        checkpoint_every=30,
        erf_every=100,
        erf_images=2,
        workers=2,
        seed=0,
        device="cpu",
    )
    Trainer(cfg, on_log=logs.append).train()
    losses = [m["loss"] for m in logs]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    # Batch-8 losses move by ~0.3 from step to step: compare the mean of the last half with the
    # first steps and with the loss of a uniform prediction over the 81 classes (ln 81 = 4.39).
    late = sum(losses[15:]) / 15
    assert late < sum(losses[:5]) / 5 - 0.2 and late < math.log(81) - 0.3, losses
    assert {"lr", "images_per_s", "data_wait_s", "data_wait_fraction"} <= set(logs[0])
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 30
    # The exported backbone loads into torchvision.
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "r18.pth")])
    assert result.exit_code == 0, result.output
    missing = torchvision.models.resnet18().load_state_dict(
        torch.load(tmp_path / "r18.pth", weights_only=True), strict=False
    )
    assert set(missing.missing_keys) == {"fc.weight", "fc.bias"}


def _args(shards, out, iterations=12):
    return [
        "pretrain",
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--iterations",
        str(iterations),
        "--batch",
        "4",
        "--warmup",
        "2",
        "--canvas",
        "128",
        "--template-split",
        "32",
        "--checkpoint-every",
        "4",
        "--erf-every",
        "6",
        "--erf-images",
        "2",
        "--workers",
        "2",
        "--log-every",
        "2",
        "--device",
        "cpu",
    ]  # exact resume is asserted bit for bit: pinned to the CPU's deterministic kernels


@pytest.mark.slow
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(built_real, tmp_path):
    straight = tmp_path / "straight"
    assert CliRunner().invoke(main, _args(built_real, straight)).exit_code == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jigsawdata", *_args(built_real, killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    at_kill, seconds_at_kill = load(killed)["iteration"], load(killed)["train_device_seconds"]
    assert 4 <= at_kill < 12
    started = time.monotonic()
    result = CliRunner().invoke(main, [*_args(built_real, killed), "--resume"])
    resumed_wall = time.monotonic() - started
    assert result.exit_code == 0, result.output
    a, b = load(straight), load(killed)
    assert a["iteration"] == b["iteration"] == 12
    # The clock goes on from the checkpoint's count and adds no more than the resumed process
    # ran (one process): neither reset to zero nor counting the lost steps twice. Bounded by
    # measured wall time, not by the other run's, so a loaded machine cannot fail it.
    assert seconds_at_kill < b["train_device_seconds"] <= seconds_at_kill + resumed_wall
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["erf_weights"].keys() == b["erf_weights"].keys()
    assert all(torch.equal(a["erf_weights"][k], b["erf_weights"][k]) for k in a["erf_weights"])
    logged = [
        [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (straight, killed)
    ]
    assert logged[0] == logged[1] == sorted(set(logged[0]))  # one record per logged iteration, none repeated


@pytest.mark.slow
def test_sigterm_saves_and_resume_alone_continues_to_the_weights_of_an_uninterrupted_run(built_real, tmp_path, caplog):
    """Slurm's preemption: SIGTERM saves the iteration reached (not only every --checkpoint-every)
    and exits 143; `--out RUN --resume` alone reads the rest from the run's config.json."""
    straight = tmp_path / "straight"
    assert CliRunner().invoke(main, [*_args(built_real, straight), "--keep-checkpoints", "2"]).exit_code == 0
    kept = sorted(p.name for p in straight.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000008.pt", "checkpoint-00000012.pt"]
    assert os.path.samefile(straight / "checkpoint-00000012.pt", straight / "checkpoint.pt")
    assert load(straight / "checkpoint-00000008.pt")["iteration"] == 8

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jigsawdata", *_args(built_real, stopped)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (stopped / "metrics.jsonl").is_file() or not (stopped / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "no log record before the run ended"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    at = load(stopped)["iteration"]
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at iteration {at} of 12, checkpoint saved: continue with `jigsawdata pretrain --out "
        f"{stopped} --resume`"
    ), err
    assert 2 <= at < 12
    command = load(stopped)["provenance"]["command"]  # of the subprocess: this test's own argv is pytest's
    assert command == " ".join(["jigsawdata", *_args(built_real, stopped)])
    result = CliRunner().invoke(main, ["pretrain", "--out", str(stopped), "--resume"])
    assert result.exit_code == 0, result.output
    a, b = load(straight), load(stopped)
    assert b["iteration"] == 12 and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())

    # runs are tied to their data and their command
    manifest_sha = hashlib.sha256((built_real / "manifest.json").read_bytes()).hexdigest()
    for record in (json.loads((stopped / "config.json").read_text())["resolved"]["provenance"], b["provenance"]):
        assert record["shards"] == {"location": str(built_real), "manifest_sha256": manifest_sha}
        assert record["revision"] is None or len(record["revision"].removesuffix("+dirty")) == 40

    # a longer run continues on the longer schedule, saying so; a shorter one than reached is refused
    with caplog.at_level("WARNING"):
        result = CliRunner().invoke(main, ["pretrain", "--out", str(stopped), "--resume", "--iterations", "14"])
    assert result.exit_code == 0 and load(stopped)["iteration"] == 14, result.output
    assert any(
        "--iterations 14 instead of 12: from iteration 12 the learning rate follows the 14-iteration "
        "schedule" in r.getMessage()
        for r in caplog.records
    )
    result = CliRunner().invoke(main, ["pretrain", "--out", str(stopped), "--resume", "--iterations", "13"])
    assert result.exit_code == 1 and "it is at iteration 14 already" in result.output
    result = CliRunner().invoke(main, ["pretrain", "--out", str(stopped), "--resume"])
    assert result.exit_code == 0 and result.output.startswith(f"nothing to do: {stopped} is at iteration 14 of 14")


@pytest.mark.slow
def test_run_directory_is_protected(built_real, tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, _args(built_real, out, iterations=1)).exit_code == 0
    result = CliRunner().invoke(main, _args(built_real, out, iterations=1))
    assert result.exit_code == 1 and "pass --resume" in result.output
    result = CliRunner().invoke(main, [*_args(built_real, out, iterations=1), "--tau", "0.6", "--resume"])
    assert result.exit_code == 1 and "settings differ from the saved run in tau" in result.output


def test_bad_settings_are_refused(built_real, tmp_path, monkeypatch):
    with monkeypatch.context() as env:
        env.setenv("WORLD_SIZE", "3")
        with pytest.raises(InputError, match="--batch 4 is not divisible by the 3 ranks"):
            Trainer(PretrainConfig(shards=str(built_real), out=str(tmp_path / "x"), batch=4, device="cpu"))
    with pytest.raises(InputError, match="--tau"):
        Trainer(PretrainConfig(shards=str(built_real), out=str(tmp_path / "x"), tau=1.5))


@pytest.mark.parametrize("neck", [[], ["--neck", "fpn", "--fpn-channels", "32"]], ids=["backbone", "fpn"])
@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(built_real, tmp_path, neck):
    """DistributedDataParallel over gloo: both ranks train, each on its share of the shards,
    and the checkpoint keeps both data positions; with the FPN, every level's ERF maps are
    averaged over the ranks."""
    out = tmp_path / "ddp"
    args = _args(built_real, out, iterations=4)
    args[args.index("--erf-every") + 1] = "2"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "jigsawdata",
        *args,
        "--workers",
        "1",
        *neck,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load(out)
    assert ckpt["iteration"] == 4 and len(ckpt["data"]["states"]) == 2
    assert ckpt["data"]["states"][0] != ckpt["data"]["states"][1]
    levels = {"P2": 32, "P3": 16, "P4": 8, "P5": 4} if neck else {"C5": 4}
    assert {k: tuple(v.shape) for k, v in ckpt["erf_weights"].items()} == {k: (4, g, g) for k, g in levels.items()}


@pytest.mark.gpu
def test_short_gpu_run_with_dali_gpu(built_real, tmp_path):
    logs = []
    cfg = PretrainConfig(
        shards=str(built_real),
        out=str(tmp_path / "gpu"),
        arch="resnet50",
        iterations=20,
        batch=64,
        warmup=5,
        log_every=5,
        erf_every=10,
        erf_images=16,
        device="cuda",
        pipeline="dali",
        workers=4,
        amp="bf16",
    )
    trainer = Trainer(cfg, on_log=logs.append)
    trainer.train()
    assert trainer.device.type == "cuda" and len(logs) == 4
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)
    assert logs[-1]["data_wait_fraction"] < 0.5


def test_dali_source_hands_batches_to_the_training_device(built_real):
    """DALI returns labels (always) and CPU-backend images on the CPU; the source moves both
    to the training device ('meta' stands in for a GPU here: any device but the CPU)."""
    from jigsawdata.pipelines.config import fixed
    from jigsawdata.trainer.data import DaliSource

    source = DaliSource(built_real, 4, fixed(), device=torch.device("meta"), workers=1, rank=0, world_size=1)
    images, labels = next(source)
    assert images.device.type == labels.device.type == "meta"
    assert images.shape == (4, 3, 224, 224) and labels.shape == (4, 4)


def test_resume_on_another_kind_of_device_is_refused(tmp_path):
    from jigsawdata.trainer.runtime import check_resume_device

    check_resume_device("cpu", torch.device("cpu"), tmp_path)
    check_resume_device(None, torch.device("cpu"), tmp_path)  # checkpoints that did not record it
    with pytest.raises(
        InputError, match="saved on the CUDA and cannot be resumed on the CPU: resume it with --device cuda"
    ):
        check_resume_device("cuda", torch.device("cpu"), tmp_path)


@pytest.mark.gpu
def test_gpu_run_interrupted_after_a_checkpoint_resumes_on_the_gpu(built_real, tmp_path, monkeypatch):
    """fp16 (a grad scaler with state), DALI GPU reader state and CUDA RNG state all make the
    round trip through a checkpoint and the run continues to its end."""
    cfg = dict(
        shards=str(built_real),
        out=str(tmp_path / "gpu"),
        arch="resnet18",
        iterations=6,
        batch=16,
        warmup=2,
        log_every=1,
        erf_every=3,
        erf_images=4,
        checkpoint_every=3,
        device="cuda",
        pipeline="dali",
        workers=2,
        amp="fp16",
    )
    real_save = Trainer.save

    def save_then_crash(self):
        real_save(self)
        raise KeyboardInterrupt("simulated crash after the first checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            Trainer(PretrainConfig(**cfg)).train()
    assert load(tmp_path / "gpu")["iteration"] == 3
    resumed = Trainer(PretrainConfig(**cfg), resume=True)
    assert resumed.iteration == 3 and resumed.scaler.is_enabled() and resumed.scaler.get_scale() > 0
    resumed.train()
    ckpt = load(tmp_path / "gpu")
    assert ckpt["iteration"] == 6 and ckpt["device_type"] == "cuda"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_dali_cpu_workers_are_part_of_the_data_position(built_real, tmp_path):
    """On the CPU, --workers is the number of DALI pipelines, each with its own reader state:
    a resume with another count is refused in one line instead of reading other samples."""
    out = tmp_path / "run"
    args = _args(built_real, out, iterations=4)
    assert CliRunner().invoke(main, args).exit_code == 0
    assert len(load(out)["data"]["states"][0]["parts"]) == 2
    args[args.index("--workers") + 1] = "1"
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 1 and "resume with --workers 2" in result.output, result.output
    assert load(out)["iteration"] == 4


@pytest.mark.slow
def test_erf_command_draws_a_runs_receptive_fields(built_real, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    args = _args(built_real, run, iterations=2)
    args[args.index("--erf-every") + 1] = "2"
    assert CliRunner().invoke(main, args).exit_code == 0
    out = tmp_path / "erf.png"
    result = CliRunner().invoke(
        main, ["erf", str(run), "--out", str(out), "--images", "2", "--region", "BR", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "iteration 2, 2 images" in result.output
    assert Image.open(out).size == (2 * 128 + 220, 2 * 128)  # the canvas at 2x, then the weights panel

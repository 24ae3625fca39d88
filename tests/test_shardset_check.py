"""Pipelines refuse damaged or unsafe shards before the first batch, with one line naming
the shard; the check is cached; numeric options are validated."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.files import write_json_atomic
from jigsawdata.shardset.check import check_shard_set
from jigsawdata.shardset.shards import write_shard


@pytest.fixture
def shards(tmp_path, built_synthetic) -> Path:
    out = tmp_path / "set"
    shutil.copytree(built_synthetic, out)
    return out


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def _vouch(root: Path, name: str) -> None:
    """Make the manifest vouch for the shard as it is now (a hostile or buggy publisher)."""
    manifest = json.loads((root / "manifest.json").read_text())
    for group in manifest["groups"].values():
        for shard in group["shards"]:
            if shard["name"] == name:
                shard["bytes"] = (root / name).stat().st_size
                shard["sha256"] = hashlib.sha256((root / name).read_bytes()).hexdigest()
                shard.pop("idx_sha256", None)
    write_json_atomic(root / "manifest.json", manifest)


def _truncate(root: Path) -> str:
    victim = sorted(root.glob("S/*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return f"S/{victim.name}"


def _damage_a_header(root: Path) -> str:
    victim = sorted(root.glob("T/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    with tarfile.open(victim) as tar:
        offset = tar.getmembers()[6].offset
    data[offset + 148 : offset + 156] = b"garbage!"  # the checksum of the 7th member's header
    victim.write_bytes(bytes(data))
    return f"T/{victim.name}"


def _unsafe_member(root: Path) -> str:
    victim = sorted(root.glob("W/*.tar"))[0]
    with tarfile.open(victim, "a") as tar:
        info = tarfile.TarInfo("../../evil.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    _vouch(root, f"W/{victim.name}")
    return f"W/{victim.name}"


def _label_out_of_range(root: Path) -> str:
    victim = sorted(root.glob("S/*.tar"))[1]
    with tarfile.open(victim) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    samples: dict[str, list] = {}
    for name, data in members:
        stem, ext = name.split(".", 1)
        samples.setdefault(stem, []).append((ext, b"77" if ext == "cls" else data))
    write_shard(victim, list(samples.items()))
    _vouch(root, f"S/{victim.name}")
    return f"S/{victim.name}"


_NOT_A_JPEG = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"
"""Starts and ends as a JPEG; decodes to nothing."""


def _undecodable(root: Path, shards: slice = slice(0, 1)) -> str:
    """Every sample of the chosen W shards gets a .jpg that does not decode, and the manifest
    vouches for it."""
    victims = sorted(root.glob("W/*.tar"))[shards]
    for victim in victims:
        with tarfile.open(victim) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        samples: dict[str, list] = {}
        for name, data in members:
            stem, ext = name.split(".", 1)
            samples.setdefault(stem, []).append((ext, _NOT_A_JPEG if ext == "jpg" else data))
        write_shard(victim, list(samples.items()))
        _vouch(root, f"W/{victim.name}")
    return f"W/{victims[0].name}"


DAMAGES = {
    "truncated": (_truncate, "bytes, the manifest says"),
    "header": (_damage_a_header, "sha256 differs"),
    "unsafe": (_unsafe_member, "parent reference"),
    "label": (_label_out_of_range, "label 77 is outside 0..6"),
    "undecodable": (_undecodable, "its .jpg does not decode (not an image format Pillow knows)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("pipeline", ["dali", "reference"])
def test_preview_refuses_a_damaged_shard_naming_it(shards, tmp_path, damage, pipeline):
    make, message = DAMAGES[damage]
    name = make(shards)
    line = _one_line_error(
        ["preview", str(shards), "--out", str(tmp_path / "p.png"), "--pipeline", pipeline, "--count", "2"]
    )
    assert line.startswith(f"Error: {name} of {shards} is ") and message in line, line
    assert "--no-verify" in line and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("pipeline", ["dali", "reference"])
def test_pretrain_refuses_a_damaged_shard_before_the_first_batch(shards, tmp_path, pipeline):
    name = _damage_a_header(shards)
    line = _one_line_error(
        [
            "pretrain",
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "run"),
            "--arch",
            "resnet18",
            "--iterations",
            "1",
            "--batch",
            "4",
            "--pipeline",
            pipeline,
            "--device",
            "cpu",
            "--workers",
            "1",
            "--erf-images",
            "2",
        ]
    )
    assert line.startswith(f"Error: {name} of {shards} is damaged") and not (tmp_path / "run").exists()


@pytest.mark.parametrize("pipeline,workers", [("dali", 1), ("reference", 0), ("reference", 1)])
@pytest.mark.slow
def test_a_sample_that_does_not_decode_stops_an_unchecked_run_in_one_line(shards, tmp_path, pipeline, workers):
    """With --no-verify nothing is checked first: the reader names the sample (the reference
    pipeline, also from a DataLoader worker) or the set and `verify` (DALI names neither)."""
    name = _undecodable(shards, slice(None))
    line = _one_line_error(
        [
            "pretrain",
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "run"),
            "--arch",
            "resnet18",
            "--iterations",
            "2",
            "--batch",
            "2",
            "--canvas",
            "64",
            "--template-split",
            "32",
            "--pipeline",
            pipeline,
            "--device",
            "cpu",
            "--workers",
            str(workers),
            "--erf-images",
            "2",
            "--no-verify",
        ]
    )
    if pipeline == "dali":
        assert (
            line.startswith(f"Error: DALI could not read or decode a sample of {shards} (")
            and f"run `jigsawdata verify {shards}`" in line
        ), line
    else:
        assert (
            line.startswith(f"Error: {shards / name.split('-')[0]}")
            and ": its .jpg does not decode (not an image format Pillow knows): run `jigsawdata verify`" in line
        ), line


def test_the_check_is_cached_by_size_and_mtime(shards, tmp_path):
    cache = tmp_path / "cache"
    files = len(list(shards.glob("*/*.tar"))) + len(list(shards.glob("*/*.idx")))
    assert check_shard_set(shards, cache) == files
    assert check_shard_set(shards, cache) == 0, "a second run reads nothing"
    victim = sorted(shards.glob("W/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] = 1  # in the end-of-archive padding: only the sha256 can tell
    victim.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"W/{victim.name} of .* is damaged: its sha256 differs"):
        check_shard_set(shards, cache)
    data[-1] = 0
    victim.write_bytes(bytes(data))
    assert check_shard_set(shards, cache) == 1


def test_no_verify_skips_the_check(shards, tmp_path):
    victim = sorted(shards.glob("W/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] = 1  # harmless to a reader, fatal to the sha256
    victim.write_bytes(bytes(data))
    result = CliRunner().invoke(
        main,
        [
            "preview",
            str(shards),
            "--out",
            str(tmp_path / "p.png"),
            "--pipeline",
            "reference",
            "--count",
            "2",
            "--no-verify",
        ],
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["make-synthetic", "X", "--images", "-1"], "-1 is not in the range x>=1"),
        (["evaluate-pretrain", ".", "--shards", ".", "--images", "0"], "'--images': 0 is not in the range x>=1"),
        (["make-synthetic", "X", "--images", "0"], "0 is not in the range x>=1"),
        (["preview", ".", "--out", "p.png", "--count", "0"], "0 is not in the range x>=1"),
        (["pretrain", "--shards", ".", "--out", "r", "--workers", "-1"], "-1 is not in the range x>=0"),
        (["pretrain", "--shards", ".", "--out", "r", "--erf-images", "0"], "0 is not in the range x>=1"),
        (["pretrain", "--shards", ".", "--out", "r", "--tau", "1.5"], "1.5 is not in the range 0.0<=x<=1.0"),
        (["build-shards", ".", "--out", "o", "--workers", "-2"], "-2 is not in the range x>=0"),
        (["build-shards", ".", "--out", "o", "--seed", "-1"], "-1 is not in the range x>=0"),
        (["build-shards", ".", "--out", "o", "--max-pixels", "0"], "0 is not in the range x>=1"),
        (["finetune", "--coco", ".", "--out", "f", "--max-iters", "0"], "0 is not in the range x>=1"),
        (["erf", ".", "--out", "e.png", "--images", "0"], "0 is not in the range x>=1"),
    ],
)
def test_numeric_options_are_validated(tmp_path, args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_pretrain_workers_zero_needs_the_reference_pipeline(shards, tmp_path):
    line = _one_line_error(
        ["pretrain", "--shards", str(shards), "--out", str(tmp_path / "run"), "--workers", "0", "--device", "cpu"]
    )
    assert "DALI needs >= 1 thread; 0 (in-process) is for --pipeline reference" in line
    assert not (tmp_path / "run").exists()


def test_finetune_seed_is_checked_before_anything_is_created(tmp_path):
    result = CliRunner().invoke(
        main, ["finetune", "--coco", str(tmp_path), "--out", str(tmp_path / "ft"), "--seed", "-1", "--device", "cpu"]
    )
    assert result.exit_code == 2 and "-1 is not in the range x>=0" in result.output
    assert not (tmp_path / "ft").exists()
    conf = tmp_path / "ft.yaml"
    conf.write_text(f"coco: {tmp_path}\nout: {tmp_path / 'ft'}\nseed: -1\n")
    line = _one_line_error(["finetune", "--config", str(conf), "--device", "cpu"])
    assert "--seed must be >= 0, got -1" in line and not (tmp_path / "ft").exists()


def test_an_unexpected_failure_is_one_line_not_a_traceback(built_synthetic, monkeypatch):
    import jigsawdata.shardset.check

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected\nwith a second line")

    monkeypatch.setattr(jigsawdata.shardset.check, "verify_shard_set", broken)
    result = CliRunner().invoke(main, ["verify", str(built_synthetic)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == "Error: RuntimeError: something nobody expected (rerun with -vv for the traceback)", (
        result.output
    )
    assert "Traceback" not in result.output


def test_verify_prints_the_first_problems_and_how_many_more(built_synthetic, monkeypatch):
    import jigsawdata.shardset.check

    problems = [f"S/S-000000.tar: sample {i:06d} is wrong" for i in range(25)]
    monkeypatch.setattr(jigsawdata.shardset.check, "verify_shard_set", lambda *args, **kwargs: problems)
    result = CliRunner().invoke(main, ["verify", str(built_synthetic)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[:20] == [f"FAIL {p}" for p in problems[:20]]
    assert lines[20:] == ["FAIL ... and 5 more problems (25 in all; --all prints every one)"]
    result = CliRunner().invoke(main, ["verify", str(built_synthetic), "--all"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"FAIL {p}" for p in problems]


def test_a_bad_canvas_is_a_one_line_error(built_synthetic, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "pretrain",
            "--shards",
            str(built_synthetic),
            "--out",
            str(tmp_path / "r"),
            "--canvas",
            "100",
            "--device",
            "cpu",
            "--arch",
            "resnet18",
        ],
    )
    assert result.exit_code == 1 and "canvas 100 is not a multiple of the stride 32" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "canvas,split,message",
    [
        (
            "64",
            "16",
            "split 16 leaves a region without a cell of the stride-32 feature grid (cell centres at 16, 48, ...): "
            "use a split in 17..48, e.g. 32",
        ),
        ("224", "209", "use a split in 17..208, e.g. 192"),
        ("32", "16", "canvas 32 holds one cell of the stride-32 feature grid, too few for four regions"),
    ],
)
def test_a_template_with_a_region_of_no_cell_is_refused(built_synthetic, tmp_path, canvas, split, message):
    """Such a region's loss is a mean over no cells, NaN: the run trained on it silently."""
    line = _one_line_error(
        [
            "pretrain",
            "--shards",
            str(built_synthetic),
            "--out",
            str(tmp_path / "r"),
            "--canvas",
            canvas,
            "--template-split",
            split,
            "--device",
            "cpu",
            "--arch",
            "resnet18",
        ]
    )
    assert message in line and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_diverged_loss_stops_the_run_before_its_weights_are_saved(built_synthetic, tmp_path, monkeypatch):
    import torch

    from jigsawdata.trainer.pretrain import Trainer

    real_loss = Trainer.loss
    monkeypatch.setattr(
        Trainer,
        "loss",
        lambda self, output, labels: real_loss(self, output, labels) * (float("nan") if self.iteration >= 2 else 1.0),
    )
    run = tmp_path / "run"
    line = _one_line_error(
        [
            "-q",
            "pretrain",
            "--shards",
            str(built_synthetic),
            "--out",
            str(run),
            "--arch",
            "resnet18",
            "--iterations",
            "6",
            "--batch",
            "2",
            "--canvas",
            "64",
            "--template-split",
            "32",
            "--device",
            "cpu",
            "--workers",
            "1",
            "--erf-images",
            "2",
            "--log-every",
            "2",
            "--checkpoint-every",
            "2",
        ]
    )
    assert line == (
        f"Error: the loss became nan by iteration 4: the run diverged (lower --lr-peak, or --amp off); "
        f"{run} keeps the last checkpoint from before"
    )
    saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2 and all(torch.isfinite(t).all() for t in saved["model"].values())


@pytest.mark.slow
def test_ctrl_c_exits_130_in_one_line_and_a_closed_pipe_quietly(built_synthetic, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jigsawdata",
            "pretrain",
            "--shards",
            str(built_synthetic),
            "--out",
            str(run),
            "--arch",
            "resnet18",
            "--iterations",
            "100000",
            "--batch",
            "2",
            "--canvas",
            "64",
            "--template-split",
            "32",
            "--device",
            "cpu",
            "--pipeline",
            "reference",
            "--workers",
            "0",
            "--erf-images",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "config.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err

    # a reader that has gone before the first line is written (`| head -1` once it has its line)
    info = subprocess.run(
        f"{sys.executable} -m jigsawdata info {built_synthetic} | true; exit ${{PIPESTATUS[0]}}",
        shell=True,
        capture_output=True,
        text=True,
        executable="/bin/bash",
    )
    assert info.returncode == 141 and info.stderr == "", info.stderr

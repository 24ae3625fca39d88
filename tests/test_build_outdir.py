"""build-shards writes only its own output: never into a user's folder, never over its
input, never adopting files it did not write, one build per part at a time."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from jigsawdata.build.outdir import BuildLock
from jigsawdata.build.run import BuildConfig, build_shards
from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.shardset.check import verify_shard_set


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_users_folder_is_refused_and_left_untouched(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "mine"
    (out / "S").mkdir(parents=True)
    (out / "S" / "S-000000.tar").write_bytes(b"my own tar")
    (out / "README.md").write_text("my notes")
    before = _files(out)
    with pytest.raises(InputError, match=r"is not empty \(README.md, S\) and holds no jigsawdata build"):
        build_shards(synthetic_source, out, small_cfg)
    assert _files(out) == before


def test_out_equal_to_the_input_is_refused_but_a_folder_inside_the_root_is_fine(tmp_path, synthetic_root, small_cfg):
    runner = CliRunner()
    before = _files(synthetic_root)
    for out, what in (
        (synthetic_root, "the data set's root"),
        (synthetic_root / "train", "the image folder"),
        (synthetic_root / "annotations", "the annotation folder"),
    ):
        result = runner.invoke(main, ["build-shards", str(synthetic_root), "--out", str(out)])
        assert result.exit_code == 1 and f"is {what}" in result.output, result.output
        assert f"e.g. {synthetic_root / 'jigsaw-shards'}" in result.output  # beside the images, not inside them
    assert _files(synthetic_root) == before, "the data set's own README and files are untouched"
    inside = tmp_path / "copy"
    shutil.copytree(synthetic_root, inside)
    result = runner.invoke(main, ["build-shards", str(inside), "--out", str(inside / "jigsaw-shards")])
    assert result.exit_code == 0, result.output


def test_after_manifest_removal_a_rebuild_with_other_settings_is_refused(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "out"
    build_shards(synthetic_source, out, small_cfg)
    (out / "manifest.json").unlink()
    with pytest.raises(InputError, match="holds no jigsawdata build"):
        build_shards(synthetic_source, out, BuildConfig(seed=11, chunk_images=5, shard_samples=16, jpeg_quality=20))


def test_a_kept_staging_area_refuses_other_settings_and_proves_its_shards(
    tmp_path, synthetic_source, small_cfg, built_synthetic
):
    out = tmp_path / "out"
    build_shards(synthetic_source, out, small_cfg, keep_staging=True)
    (out / "manifest.json").unlink()
    with pytest.raises(InputError, match="different params"):
        build_shards(synthetic_source, out, BuildConfig(seed=11, chunk_images=5, shard_samples=16, jpeg_quality=20))
    victim = sorted(out.glob("T/*.tar"))[0]
    victim.write_bytes(b"x" * victim.stat().st_size)  # same size, not the bytes this build wrote
    build_shards(synthetic_source, out, small_cfg, keep_staging=True)
    shutil.rmtree(next(out.glob(".staging-*")))
    assert _files(out) == _files(built_synthetic) and verify_shard_set(out) == []


def test_a_shard_this_build_did_not_record_is_rewritten_not_adopted(
    tmp_path, synthetic_source, small_cfg, built_synthetic
):
    class Stop(Exception):
        pass

    def stop_at_write(stage, items, crops):
        if stage == "write":
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        build_shards(synthetic_source, out, small_cfg, progress=stop_at_write)
    first = sorted(out.glob("S/*.tar"))[0]
    written_by_us = first.read_bytes()
    planted = sorted(built_synthetic.glob("S/*.tar"))[1]  # a name this build writes later, planted beforehand
    (out / "S" / planted.name).write_bytes(b"\0" * planted.stat().st_size)
    shutil.copy(planted.with_suffix(".idx"), out / "S" / planted.with_suffix(".idx").name)
    build_shards(synthetic_source, out, small_cfg)
    assert first.read_bytes() == written_by_us
    assert _files(out) == _files(built_synthetic) and verify_shard_set(out) == []


def _hold_lock(path: str, ready, release) -> None:
    with BuildLock(Path(path)):
        ready.set()
        release.wait(30)


@pytest.mark.slow
def test_a_second_concurrent_build_exits_with_a_clear_message(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out / ".staging-000-of-001.lock"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(
            InputError, match=r"another build is writing to .*out \(it holds \.staging-000-of-001\.lock\)"
        ):
            build_shards(synthetic_source, out, small_cfg)
        build_shards(synthetic_source, out, small_cfg, part=1, parts=2)  # another part may run beside it
    finally:
        release.set()
        holder.join(30)
    assert not list(out.glob("*.lock"))
    build_shards(synthetic_source, out, small_cfg, part=0, parts=2)
    assert not list(out.glob("*.lock")) and (out / "parts" / "manifest-000-of-002.json").is_file()


def test_a_lock_left_by_a_killed_build_does_not_block(tmp_path, synthetic_source, small_cfg, built_synthetic):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".staging-000-of-001.lock").write_text("")  # what kill -9 leaves: a file nobody holds
    build_shards(synthetic_source, out, small_cfg)
    assert _files(out) == _files(built_synthetic)


def test_refused_runs_leave_no_run_directory(tmp_path):
    for args in (
        [
            "pretrain",
            "--shards",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "run"),
            "--pipeline",
            "reference",
            "--device",
            "cpu",
        ],
        ["finetune", "--coco", str(tmp_path), "--out", str(tmp_path / "ft"), "--device", "cpu"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


def test_export_refuses_to_write_over_its_input(tmp_path):
    import torch

    from jigsawdata.trainer.checkpoint import FORMAT
    from jigsawdata.trainer.model import DenseClassifier

    run = tmp_path / "run"
    run.mkdir()
    model = DenseClassifier("resnet18", 3)
    torch.save(
        {"format": FORMAT, "model": model.state_dict(), "arch": "resnet18", "iteration": 1}, run / "checkpoint.pt"
    )
    before = (run / "checkpoint.pt").read_bytes()
    for target in (run / "checkpoint.pt", run):
        result = CliRunner().invoke(main, ["export", str(target), "--out", str(run / "checkpoint.pt")])
        assert result.exit_code == 1 and "would overwrite its input" in result.output, result.output
    assert (run / "checkpoint.pt").read_bytes() == before
    (run / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(run / "config.json")])
    assert result.exit_code == 1 and "would overwrite a file of the run it exports" in result.output, result.output
    assert (run / "config.json").read_text() == "{}"
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "bb.pth")])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_a_resumed_build_rewrites_a_shard_whose_index_was_damaged(tmp_path, synthetic_source, small_cfg, monkeypatch):
    """A shard is reused only when both its tar and its .idx are the bytes this build wrote."""
    import jigsawdata.build.run as build

    clean = tmp_path / "clean"
    build_shards(synthetic_source, clean, small_cfg)
    out, real_write, calls = tmp_path / "out", build.write_shard, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill during the write phase")
        return real_write(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(build, "write_shard", crash_on_second)
        with pytest.raises(KeyboardInterrupt):
            build_shards(synthetic_source, out, small_cfg)
    idx = next(out.rglob("*.idx"))
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[2] = str(int(fields[2]) - 1)  # the first .jpg's size off by one: still a well-formed index
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    build_shards(synthetic_source, out, small_cfg)
    assert _files(out) == _files(clean)
    assert verify_shard_set(out) == []


def test_a_part_of_another_split_or_seed_is_refused_at_build_time(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "parts"
    build_shards(synthetic_source, out, small_cfg, part=0, parts=2)
    before = _files(out)
    with pytest.raises(InputError, match="holds a build with different parts"):
        build_shards(synthetic_source, out, small_cfg, part=0, parts=3)
    with pytest.raises(InputError, match="holds a build with different params"):
        build_shards(synthetic_source, out, BuildConfig(seed=12, chunk_images=5, shard_samples=16), part=1, parts=2)
    assert _files(out) == before
    build_shards(synthetic_source, out, small_cfg, part=1, parts=2)  # the other part of the same build is fine


def test_a_new_run_needs_a_new_or_empty_directory(tmp_path):
    from jigsawdata.trainer.runtime import claim_run_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    assert claim_run_dir(mine, resume=False) == mine  # empty is fine
    (mine / "config.json").write_text("{my own}")
    with pytest.raises(InputError, match=r"is not empty \(config.json\) and holds no checkpoint"):
        claim_run_dir(mine, resume=False)
    assert (mine / "config.json").read_text() == "{my own}"


def test_finetune_refuses_a_batch_larger_than_the_split(tmp_path, synthetic_root):
    from jigsawdata.trainer.finetune import FinetuneConfig, Finetuner

    cfg = FinetuneConfig(
        coco=str(synthetic_root),
        out=str(tmp_path / "ft"),
        split="train",
        arch="resnet18",
        batch=16,
        max_images=4,
        device="cpu",
        workers=0,
    )
    with pytest.raises(InputError, match="--batch 16 needs 16 training images per process, but split train has 4"):
        Finetuner(cfg)
    assert not (tmp_path / "ft").exists()

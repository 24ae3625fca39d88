"""build-shards end to end: format, determinism, resumption, parts, verify."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jigsawdata.build.merge import merge_parts
from jigsawdata.build.run import BuildConfig, build_shards
from jigsawdata.build.sampling import SamplingConfig
from jigsawdata.cli import main
from jigsawdata.coco.reader import load_coco
from jigsawdata.errors import InputError
from jigsawdata.files import write_json_atomic
from jigsawdata.shardset.check import summarize, verify_shard_set
from jigsawdata.shardset.index import read_index
from jigsawdata.shardset.manifest import Manifest, read_manifest
from jigsawdata.synthetic.shapes import make_synthetic_coco

FIELDS = {"image_id", "ann_id", "category_id", "label", "group", "gt_box", "crop_box", "width", "height", "source"}


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a shard set by relative path (the staging area is gone when done)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.tar"))


@pytest.mark.slow
def test_samples_round_trip_through_tarfile(built_synthetic, synthetic_source):
    manifest = read_manifest(built_synthetic)
    images = {im.image_id: im for im in synthetic_source.images}
    labels = {c.category_id: c.label for c in synthetic_source.classes}
    seen = 0
    for shard in _shards(built_synthetic):
        group = shard.parent.name
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.isreg() for m in members)
            names = [m.name for m in members]
            assert [n.rsplit(".", 1)[1] for n in names] == ["jpg", "cls", "json"] * (len(names) // 3)
            for jpg, cls, js in zip(names[::3], names[1::3], names[2::3]):
                meta = json.loads(tar.extractfile(js).read())
                assert int(tar.extractfile(cls).read()) == meta["label"]
                assert set(meta) == FIELDS and meta["group"] == group
                crop = Image.open(io.BytesIO(tar.extractfile(jpg).read()))
                assert crop.size == (meta["width"], meta["height"])
                x0, y0, x1, y1 = meta["crop_box"]
                assert (x1 - x0, y1 - y0) == crop.size
                image = images[meta["image_id"]]
                assert x1 <= image.width and y1 <= image.height
                if meta["ann_id"] is None:
                    assert meta["category_id"] == 0 and meta["label"] == len(synthetic_source.classes)
                else:
                    assert meta["label"] == labels[meta["category_id"]]
                seen += 1
    assert seen == sum(g.samples for g in manifest.groups.values())


def test_labels_follow_sorted_category_ids(built_synthetic):
    manifest = read_manifest(built_synthetic)
    ids = [c.category_id for c in manifest.classes]
    assert ids == sorted(ids) and [c.label for c in manifest.classes] == list(range(len(ids)))
    assert manifest.to_json()["background"] == {"label": len(ids), "category_id": 0, "name": "background"}


def test_manifest_and_index_agree(built_synthetic, small_cfg):
    manifest = read_manifest(built_synthetic)
    assert manifest.params["seed"] == small_cfg.seed
    assert manifest.params["sampling"]["pos_per_neg"] == 10.0
    table = read_index(built_synthetic / "index.parquet").to_pylist()
    shard_names = [s.name for s in manifest.shards]
    assert len(shard_names) > 3, "the fixture is meant to make several shards per group"
    assert [r["shard"] for r in table] == sorted([r["shard"] for r in table], key=shard_names.index)
    for group, info in manifest.groups.items():
        assert info.samples == sum(r["group"] == group for r in table)
    assert manifest.counts["positives"] + manifest.counts["negatives"] == len(table)


def test_samples_are_shuffled_not_in_image_order(built_synthetic):
    rows = read_index(built_synthetic / "index.parquet").to_pylist()
    for group in "STW":
        keys = [r["key"] for r in rows if r["group"] == group]
        assert keys != sorted(keys)


def test_readable_by_webdataset(built_synthetic):
    import webdataset as wds

    shards = [str(p) for p in _shards(built_synthetic)]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == len(read_index(built_synthetic / "index.parquet"))
    assert all(s["jpg"].size == (s["json"]["width"], s["json"]["height"]) for s in samples)
    assert all(s["cls"] == s["json"]["label"] for s in samples)


@pytest.mark.slow
def test_readable_by_dali_cpu_with_the_written_index(built_synthetic):
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    shards = [str(p) for p in _shards(built_synthetic) if p.parent.name == "T"]
    n = read_manifest(built_synthetic).groups["T"].samples

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, meta = fn.readers.webdataset(
            paths=shards,
            index_paths=[s[:-4] + ".idx" for s in shards],
            ext=["jpg", "json"],
            missing_component_behavior="error",
        )
        return fn.decoders.image(jpg, device="cpu"), meta

    p = pipe()
    p.build()
    images, metas = p.run()
    for i in range(n):
        meta = json.loads(bytes(np.array(metas.at(i))).decode())
        assert meta["group"] == "T"
        assert images.at(i).shape == (meta["height"], meta["width"], 3)


@pytest.mark.slow
def test_byte_identical_for_one_and_two_workers(tmp_path, synthetic_source, small_cfg, built_synthetic):
    two = tmp_path / "two"
    build_shards(synthetic_source, two, small_cfg, workers=2)
    assert _files(two) == _files(built_synthetic)


class _Stop(Exception):
    pass


def _stop_after(stage: str, calls: int):
    seen = {"n": 0}

    def progress(s, items, crops):
        if s == stage:
            seen["n"] += 1
            if seen["n"] >= calls:
                raise _Stop

    return progress


@pytest.mark.parametrize("stage,calls", [("extract", 2), ("write", 3)])
def test_interrupted_build_resumes_to_identical_bytes(
    tmp_path, synthetic_source, small_cfg, built_synthetic, stage, calls
):
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        build_shards(synthetic_source, out, small_cfg, progress=_stop_after(stage, calls))
    assert not (out / "manifest.json").exists()
    assert list(out.glob(".staging-*/chunk-*.json")), "the interruption should leave staged work"
    resumed = []
    build_shards(synthetic_source, out, small_cfg, progress=lambda s, i, c: resumed.append((s, i)))
    assert _files(out) == _files(built_synthetic)
    if stage == "extract":  # chunks staged before the stop are not extracted again
        assert resumed[0][0] == "extract" and resumed[0][1] > 0


def test_finished_build_is_not_redone_and_other_settings_are_refused(built_synthetic, synthetic_source, small_cfg):
    before = _files(built_synthetic)
    build_shards(synthetic_source, built_synthetic, small_cfg, progress=lambda *a: pytest.fail("redid work"))
    assert _files(built_synthetic) == before
    with pytest.raises(InputError, match="different params"):
        build_shards(synthetic_source, built_synthetic, BuildConfig(seed=12, chunk_images=5, shard_samples=16))


@pytest.mark.slow
def test_verify_passes_then_catches_a_flipped_byte(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "out"
    build_shards(synthetic_source, out, small_cfg)
    assert verify_shard_set(out) == []
    victim = _shards(out)[1]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0x01
    victim.write_bytes(bytes(data))
    problems = verify_shard_set(out)
    assert problems[0] == f"{victim.relative_to(out)}: sha256 differs from the manifest"
    assert all(p.startswith(str(victim.relative_to(out))) for p in problems), problems  # with what the byte broke
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and str(victim.relative_to(out)) in result.output


def test_verify_catches_a_missing_shard_and_a_wrong_count(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "out"
    manifest = build_shards(synthetic_source, out, small_cfg).to_json()
    _shards(out)[0].unlink()
    manifest["groups"]["W"]["shards"][0]["samples"] += 1
    write_json_atomic(out / "manifest.json", manifest)
    problems = verify_shard_set(out)
    assert any("missing" in p for p in problems)
    assert any(p.startswith("W/W-000000.tar") and "manifest says" in p for p in problems)


def test_verify_rejects_unsafe_member_names(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "out"
    build_shards(synthetic_source, out, small_cfg)
    victim = _shards(out)[0]
    with tarfile.open(victim, "a") as tar:
        info = tarfile.TarInfo("../evil.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    problems = verify_shard_set(out)
    assert any("parent reference" in p and p.startswith(str(victim.relative_to(out))) for p in problems)


def test_newer_major_format_is_refused(built_synthetic, tmp_path):
    manifest = read_manifest(built_synthetic).to_json()
    manifest["format_version"] = "2.0"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format version 2.0; this jigsawdata understands format 1.0"):
        read_manifest(tmp_path)


@pytest.mark.slow
def test_parts_merge_to_the_same_samples(tmp_path, synthetic_source, small_cfg, built_synthetic):
    out = tmp_path / "parts"
    build_shards(synthetic_source, out, small_cfg, part=1, parts=2, workers=2)
    with pytest.raises(InputError, match=r"parts \[0\] of 2 are not built yet"):
        merge_parts(out)
    build_shards(synthetic_source, out, small_cfg, part=0, parts=2)
    merged = merge_parts(out)
    single = read_manifest(built_synthetic)
    assert merged.counts == single.counts
    assert {g: v.samples for g, v in merged.groups.items()} == {g: v.samples for g, v in single.groups.items()}
    assert all("-p00" in s.name for s in merged.shards)
    assert sorted(read_index(out / "index.parquet").column("key").to_pylist()) == sorted(
        read_index(built_synthetic / "index.parquet").column("key").to_pylist()
    )
    assert verify_shard_set(out) == []
    assert summarize(out)["groups"]["S"]["samples"] == single.groups["S"].samples
    assert "# Jigsaw pre-training shards" in (out / "README.md").read_text()


def test_merge_checks_each_part_file_and_keeps_the_keys_all_parts_share(tmp_path, synthetic_source, small_cfg, caplog):
    out = tmp_path / "parts"
    for k in range(2):
        build_shards(synthetic_source, out, small_cfg, part=k, parts=2)
    paths = sorted((out / "parts").glob("manifest-*.json"))
    originals = [p.read_text() for p in paths]

    def edit(change) -> None:
        for k, (p, text) in enumerate(zip(paths, originals)):
            data = json.loads(text)
            change(k, data)
            p.write_text(json.dumps(data))

    edit(lambda k, d: d.update(part=None) if k == 0 else None)
    with pytest.raises(InputError, match="manifest-000-of-002.json holds no part number, not the part its name says"):
        merge_parts(out)
    edit(lambda k, d: d.update(part=1))
    with pytest.raises(InputError, match="manifest-000-of-002.json holds part 1 of 2, not the part its name says"):
        merge_parts(out)

    def extras(k, d):
        d.update(provenance="lab-7", batch=f"b{k}")
        d["groups"]["S"]["note"] = "hand-picked"
        d["classes"][0]["synonyms"] = ["puck"]

    edit(extras)
    merge_parts(out)
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["provenance"] == "lab-7" and "batch" not in merged
    assert merged["groups"]["S"]["note"] == "hand-picked" and merged["classes"][0]["synonyms"] == ["puck"]
    assert "manifest keys batch differ" in caplog.text


@pytest.mark.slow
def test_merge_checks_the_part_indexes_and_the_merged_manifest_before_writing(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "parts"
    for k in range(2):
        build_shards(synthetic_source, out, small_cfg, part=k, parts=2)
    first, second = sorted((out / "parts").glob("manifest-*.json"))
    index0, index1 = sorted((out / "parts").glob("index-*.parquet"))
    original = first.read_text()
    data, other = json.loads(original), json.loads(second.read_text())
    group, extra = data["groups"]["S"], other["groups"]["S"]  # a shard listed by both parts
    group.update(
        shards=group["shards"] + extra["shards"][:1],
        samples=group["samples"] + extra["shards"][0]["samples"],
        bytes=group["bytes"] + extra["shards"][0]["bytes"],
    )
    first.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"the parts do not merge into a valid shard set: .*'S/S-p001-\d+\.tar' twice"):
        merge_parts(out)
    assert not (out / "manifest.json").exists() and not (out / "index.parquet").exists()
    first.write_text(original)

    def swap() -> None:
        index0.rename(tmp_path / "i")
        index1.rename(index0)
        (tmp_path / "i").rename(index1)

    swap()
    with pytest.raises(InputError, match="index-000-of-002.parquet is not the index its part manifest records"):
        merge_parts(out)
    swap()
    index1.unlink()
    with pytest.raises(
        InputError,
        match=r"index-001-of-002.parquet is missing: delete .*manifest-001-of-002\.json "
        r"and rerun build-shards with --part 1/2",
    ):
        merge_parts(out)


def test_a_damaged_part_manifest_is_named_when_another_part_builds(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "parts"
    for k in range(2):
        build_shards(synthetic_source, out, small_cfg, part=k, parts=3)
    (out / "parts" / "manifest-000-of-003.json").write_text("[1]")
    with pytest.raises(InputError, match=r"manifest-000-of-003.json is not a manifest \(a JSON object\)"):
        build_shards(synthetic_source, out, small_cfg, part=2, parts=3)
    (out / "parts" / "manifest-000-of-003.json").write_text("{")
    with pytest.raises(InputError, match=r"manifest-000-of-003.json is not valid JSON \(Expecting"):
        build_shards(synthetic_source, out, small_cfg, part=2, parts=3)


def test_merge_refuses_parts_of_different_builds(tmp_path, synthetic_source, small_cfg):
    out = tmp_path / "parts"
    build_shards(synthetic_source, out, small_cfg, part=0, parts=2)
    other = BuildConfig(seed=99, chunk_images=5, shard_samples=16)
    build_shards(synthetic_source, tmp_path / "other", other, part=1, parts=2)
    for p in (tmp_path / "other" / "parts").iterdir():
        p.rename(out / "parts" / p.name)
    with pytest.raises(InputError, match="disagrees .* on 'params'"):
        merge_parts(out)


def test_cli_build_info_verify(tmp_path, synthetic_root):
    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(main, ["build-shards", str(synthetic_root), "--out", str(out), "--shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    sizes = [p.stat().st_size for p in _shards(out)]
    assert len(sizes) > 3 and max(sizes) < 20_000 + 40_000  # one sample may overflow the bound
    result = runner.invoke(main, ["info", str(out), "--json"])
    summary = json.loads(result.output)
    assert set(summary["groups"]) == {"S", "T", "W"} and "background" in summary["classes"]
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0


@pytest.mark.parametrize("name,size", [("000000000009_0001.jpg", 0), ("a.json", 1), ("x" * 95 + ".jpg", 123456789)])
def test_ustar_header_matches_tarfile(name, size):
    from jigsawdata.shardset.shards import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_build_content_matches_a_build_made_before_records_became_columns(synthetic_source, small_cfg, tmp_path):
    """The records' storage changed (dicts -> numpy columns + a spill file); what is written
    did not: member order, every .cls and .json member and the index rows equal those of the
    same build made by the earlier code (tests/data, JPEG bytes aside: they depend on the
    encoder's version, not on this code). That build placed negatives by the rule now named
    ``negatives_avoid="gt"``."""
    from dataclasses import replace

    from jigsawdata.tests.build_digest import content_digest

    cfg = replace(small_cfg, sampling=SamplingConfig(negatives_avoid="gt"))
    build_shards(synthetic_source, tmp_path / "out", cfg)
    golden = json.loads((Path(__file__).parent / "data" / "build_digest_24_synthetic.json").read_text())
    assert content_digest(tmp_path / "out") == golden


@pytest.mark.parametrize("seed", range(5))
def test_split_shards_matches_the_greedy_rule(seed):
    from jigsawdata.build.records import split_shards

    def greedy(sizes, max_bytes, max_samples):
        bounds, start, total = [], 0, 0
        for i, n in enumerate(sizes):
            if i > start and (i - start >= max_samples or total + n > max_bytes):
                bounds.append((start, i))
                start, total = i, 0
            total += n
        return bounds + ([(start, len(sizes))] if len(sizes) else [])

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5000, size=int(rng.integers(0, 400)))
    for max_bytes, max_samples in ((10_000, 7), (3000, 1000), (1, 3), (10**9, 50)):
        assert split_shards(sizes, max_bytes, max_samples) == greedy(sizes, max_bytes, max_samples)


def test_verify_and_the_training_check_decode_each_jpeg_and_check_it_against_its_json_and_the_index(
    built_synthetic, tmp_path
):
    """A set whose sha256s are all consistent (re-written by someone) can still be wrong inside."""
    import shutil

    from jigsawdata.files import sha256_file
    from jigsawdata.shardset.shards import index_path, iter_samples, write_shard

    out = tmp_path / "set"
    shutil.copytree(built_synthetic, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["groups"]["S"]["shards"][0]
    samples = [(key, dict(parts)) for key, parts in iter_samples(out / shard["name"])]
    (k0, p0), (k1, p1), (k2, p2), (k3, p3) = samples[:4]
    p0["jpg"] = p0["jpg"][: len(p0["jpg"]) // 2]  # truncated
    p2["jpg"] = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"  # starts and ends as a JPEG, decodes to nothing
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    p3["jpg"] = png.getvalue()
    other = (int(p1["cls"]) + 1) % len(manifest["classes"])
    meta = json.loads(p1["json"])
    meta["label"] = other
    p1["cls"], p1["json"] = str(other).encode(), json.dumps(meta).encode()  # consistent, but not the index's
    n, nbytes, digest = write_shard(
        out / shard["name"], [(k, [(e, p[e]) for e in ("jpg", "cls", "json")]) for k, p in samples]
    )
    shard.update(bytes=nbytes, sha256=digest, idx_sha256=sha256_file(index_path(out / shard["name"])))
    manifest["groups"]["S"]["bytes"] = sum(s["bytes"] for s in manifest["groups"]["S"]["shards"])
    write_json_atomic(out / "manifest.json", manifest)
    problems = verify_shard_set(out)
    assert any(p.startswith(f"{shard['name']}: sample {k0}: its .jpg does not decode") for p in problems), problems
    assert any(p.startswith(f"{shard['name']}: sample {k2}: its .jpg does not decode") for p in problems), problems
    assert f"{shard['name']}: sample {k3}: its .jpg is PNG, not a JPEG" in problems
    from jigsawdata.shardset.check import check_shard_set

    with pytest.raises(
        InputError,
        match=rf"{shard['name']} of .* is damaged or unsafe \(sample {k0}: its .jpg does "
        "not decode",
    ):
        check_shard_set(out, cache_dir=tmp_path / "cache")
    assert any(p.startswith(f"{shard['name']}: sample {k1} has label {other}, the index says") for p in problems)


def _shards_digest(manifest: Manifest) -> str:
    digest = hashlib.sha256()
    for _, info in sorted(manifest.groups.items()):
        for shard in info.shards:
            digest.update(shard.name.encode())
            digest.update(shard.sha256.encode())
    digest.update(manifest.index_sha256.encode())
    return digest.hexdigest()


# The JPEG encoder the byte digest below was recorded with: another libjpeg-turbo writes other
# (equally valid) JPEG bytes from the same pixels, so only the encoder-free content is compared there.
RECORDED_JPEG_ENCODER = "3.2.0"


@pytest.mark.slow
def test_negatives_avoid_gt_writes_the_bytes_of_the_previous_release(tmp_path):
    """This small build as the code from before negatives avoided the enlarged crops wrote it:
    its content (member order, every .cls and .json, the index rows) everywhere, and the sha256
    of every shard and of the index where the JPEG encoder is the one it was recorded with."""
    from PIL import features

    from jigsawdata.tests.build_digest import content_digest

    make_synthetic_coco(tmp_path / "coco", images=12, seed=5)
    source = load_coco(tmp_path / "coco" / "annotations" / "instances_train.json", tmp_path / "coco" / "train")
    gt = build_shards(
        source, tmp_path / "gt", BuildConfig(seed=4, shard_samples=16, sampling=SamplingConfig(negatives_avoid="gt"))
    )
    content = json.dumps(content_digest(tmp_path / "gt"), sort_keys=True).encode()
    assert hashlib.sha256(content).hexdigest() == "669afaabcd73b9493d92584ab8a0d318c2895d70088c40c374ed30ba2e077e8d"
    if features.version("libjpeg_turbo") == RECORDED_JPEG_ENCODER:
        assert _shards_digest(gt) == "f12af3f9d123fc612e3c5b9b0cfe8a332d036cf340eeb4a5ae1ad556ee2fcb2a"
    crops = build_shards(source, tmp_path / "crops", BuildConfig(seed=4, shard_samples=16))
    assert _shards_digest(crops) != _shards_digest(gt)
    assert crops.params["sampling"]["negatives_avoid"] == "crops"
    assert {"negatives_wanted", "negatives"} <= set(crops.counts)


@pytest.mark.parametrize("part", ["first", "last"])
def test_more_parts_than_images_are_refused_before_anything_is_written(tmp_path, synthetic_source, small_cfg, part):
    n = len(synthetic_source.images)
    with pytest.raises(
        InputError,
        match=rf"{n + 1} parts of {n} images would leave parts without images: "
        rf"use at most {n} parts",
    ):
        build_shards(synthetic_source, tmp_path / "out", small_cfg, part=0 if part == "first" else n, parts=n + 1)
    assert not (tmp_path / "out").exists()


def _tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_resume_after_the_missing_images_arrive_extracts_them(tmp_path, synthetic_root, small_cfg, monkeypatch):
    """Chunks staged while images were missing are extracted again once the files are there,
    and shards written from the old records are not reused: the result is the build that
    had every image from the start, byte for byte."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(synthetic_root / "train", images)
    held = tmp_path / "held"
    held.mkdir()
    for name in sorted(p.name for p in images.iterdir())[3:5]:
        (images / name).rename(held / name)
    source = load_coco(synthetic_root / "annotations" / "instances_train.json", images)
    out = tmp_path / "out"
    _interrupted_in_write(source, out, small_cfg, monkeypatch)
    for path in held.iterdir():
        path.rename(images / path.name)
    resumed = build_shards(source, out, small_cfg)
    assert "image_missing" not in resumed.counts and not resumed.skipped_images
    build_shards(source, tmp_path / "fresh", small_cfg)
    assert _tree_digest(out) == _tree_digest(tmp_path / "fresh")


def _interrupted_in_write(source, out, cfg, monkeypatch) -> None:
    import jigsawdata.build.run

    real_write, written = jigsawdata.build.run.write_shard, []

    def write_then_crash(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("killed during the write phase")
        written.append(args[0])
        return real_write(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(jigsawdata.build.run, "write_shard", write_then_crash)
        with pytest.raises(KeyboardInterrupt):
            build_shards(source, out, cfg)


@pytest.mark.slow
def test_a_resume_from_another_image_folder_with_other_pixels_uses_only_the_new_pixels(
    tmp_path, synthetic_root, small_cfg, monkeypatch, built_synthetic
):
    """Same names, same sizes, same modification times, other pixels: the staged crops are not
    kept, and the result is the build of the new folder, byte for byte."""
    import shutil

    ann = synthetic_root / "annotations" / "instances_train.json"
    out = tmp_path / "out"
    _interrupted_in_write(load_coco(ann, synthetic_root / "train"), out, small_cfg, monkeypatch)
    other = tmp_path / "other"
    shutil.copytree(synthetic_root / "train", other)
    for path in sorted(other.iterdir()):
        st, data = path.stat(), bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    resumed = build_shards(load_coco(ann, other), out, small_cfg)
    assert resumed.counts.get("images_used")
    build_shards(load_coco(ann, other), tmp_path / "fresh", small_cfg)
    assert _tree_digest(out) == _tree_digest(tmp_path / "fresh")
    assert _tree_digest(out) != _tree_digest(built_synthetic), "the new pixels should give other crops"


def test_a_resume_from_a_moved_image_folder_keeps_the_staged_chunks(
    tmp_path, synthetic_root, small_cfg, monkeypatch, built_synthetic
):
    """The same files elsewhere are proved the same by their sha256: nothing is extracted again."""
    import shutil

    ann = synthetic_root / "annotations" / "instances_train.json"
    images = tmp_path / "images"
    shutil.copytree(synthetic_root / "train", images)
    out = tmp_path / "out"
    _interrupted_in_write(load_coco(ann, images), out, small_cfg, monkeypatch)
    moved = images.rename(tmp_path / "moved")
    events = []
    build_shards(load_coco(ann, moved), out, small_cfg, progress=lambda s, i, c: events.append((s, i, c)))
    assert [e for e in events if e[0] == "extract"] == [("extract", 24, 0)], "every chunk should be kept"
    assert _tree_digest(out) == _tree_digest(built_synthetic)


def _edited_manifest(root: Path, tmp_path: Path, edit) -> Path:
    import shutil

    out = shutil.copytree(root, tmp_path / "edited")
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    write_json_atomic(out / "manifest.json", manifest)
    return out


def _swap_names(m):
    a, b = m["classes"][0], m["classes"][1]
    a["name"], b["name"] = b["name"], a["name"]


def _recategorise(m):
    m["classes"][0]["category_id"] += 100


def _move_counts(m):
    m["counts"]["positives"] -= 3
    m["counts"]["negatives"] += 3


@pytest.mark.parametrize(
    "edit,expected",
    [
        (_swap_names, "README.md: does not say '| 0 | "),
        (_recategorise, "has category_id"),
        (_move_counts, "counts: the manifest gives"),
    ],
)
def test_verify_catches_manifest_edits_that_keep_every_sha256(built_synthetic, tmp_path, edit, expected):
    """Class names, category ids and the positive/negative split are not hashed anywhere:
    they are checked against the card, every sample's .json and the shards' labels."""
    assert verify_shard_set(built_synthetic) == []
    problems = verify_shard_set(_edited_manifest(built_synthetic, tmp_path, edit))
    assert any(expected in p for p in problems), problems


def test_the_cards_rebuild_command_rebuilds_a_non_default_set_byte_for_byte(synthetic_root, tmp_path):
    """Every setting recorded, non-default ones included, is in the card's command: running it
    gives the same shards, index and card."""
    import re
    import shlex

    first = tmp_path / "first"
    args = [
        "build-shards",
        str(synthetic_root),
        "--split",
        "train",
        "--out",
        str(first),
        "--seed",
        "5",
        "--negatives-avoid",
        "gt",
        "--negative-tries",
        "7",
        "--negative-shrink",
        "0.75",
        "--pos-per-neg",
        "3.5",
        "--jpeg-quality",
        "77",
        "--shard-samples",
        "20",
        "--chunk-images",
        "6",
        "--max-enlarge",
        "1.5",
        "--license",
        "CC0 (it's ours)",
        "-q",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    card = (first / "README.md").read_text()
    command = re.search(r"```bash\n(jigsawdata build-shards .*?)\n```", card, re.S)[1]
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["jigsawdata", "build-shards"]
    again = tmp_path / "again"
    words = [str(synthetic_root) if w == "COCO_ROOT" else str(again) if w == "SHARDS" else w for w in words[2:]]
    result = CliRunner().invoke(main, ["build-shards", *words, "-q"])
    assert result.exit_code == 0, result.output
    assert _tree_digest(again) == _tree_digest(first)


def test_a_damaged_sample_index_is_one_problem_and_every_shard_is_still_checked(built_synthetic, tmp_path):
    import shutil

    out = shutil.copytree(built_synthetic, tmp_path / "set")
    (out / "index.parquet").write_bytes(b"PAR1 not really")
    problems = verify_shard_set(out)
    assert problems[0].startswith(f"index index.parquet: {out / 'index.parquet'} is not a readable sample index ("), (
        problems
    )
    assert len(problems) == 1, problems
    victim = _shards(out)[0]
    victim.write_bytes(victim.read_bytes()[:-1024])
    assert any(p.startswith(str(victim.relative_to(out))) for p in verify_shard_set(out))
    result = CliRunner().invoke(main, ["info", str(out)])
    assert (
        result.exit_code == 1 and result.output.count("\n") == 1 and "is not a readable sample index" in result.output
    )


@pytest.mark.parametrize(
    "edit,said",
    [
        (lambda m: m["params"].update(seed=5), "- `seed`: 5"),
        (lambda m: m["params"]["sampling"].update(negatives_avoid="gt"), "- `sampling.negatives_avoid`: gt"),
        (lambda m: m["source"].update(license="CC0"), "CC0"),
        (lambda m: m["source"].update(images=m["source"]["images"] + 1), "- Images listed: "),
    ],
)
def test_verify_catches_edits_of_the_settings_and_source_the_card_states(built_synthetic, tmp_path, edit, said):
    problems = verify_shard_set(_edited_manifest(built_synthetic, tmp_path, edit))
    assert any(p.startswith(f"README.md: does not say '{said}") for p in problems), problems

"""The typed manifest reads the JSON written before it existed and writes it back unchanged;
the file rules (atomic writes, shard locations, ranks) each have one home."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from jigsawdata.errors import InputError
from jigsawdata.files import atomic_path, json_text, write_json_atomic
from jigsawdata.shardset.location import ShardLocation
from jigsawdata.shardset.manifest import GroupInfo, Manifest, ManifestError, ShardInfo, read_manifest

DATA = Path(__file__).parent / "data"
WRITTEN = ["manifest_24_synthetic.json", "manifest_24_synthetic_part_0_of_2.json"]
"""Manifests as build-shards wrote them before they had a type: a whole set, and part 0 of 2."""


@pytest.mark.parametrize("name", WRITTEN)
def test_a_manifest_written_before_reads_and_writes_back_byte_for_byte(name):
    raw = (DATA / name).read_bytes()
    data = json.loads(raw)
    manifest = Manifest.from_json(copy.deepcopy(data))
    assert manifest.to_json() == data
    assert json_text(manifest.to_json()).encode() == raw


def test_the_typed_fields_are_those_of_the_json():
    data = json.loads((DATA / WRITTEN[0]).read_text())
    manifest = Manifest.from_json(data)
    assert list(manifest.groups) == ["S", "T", "W"]
    s = manifest.groups["S"]
    assert (s.samples, s.bytes) == (data["groups"]["S"]["samples"], data["groups"]["S"]["bytes"])
    assert s.shards[0] == ShardInfo(**data["groups"]["S"]["shards"][0])
    assert s.shards[0].idx_name == "S/S-000000.idx"
    assert manifest.class_names == ("disc", "pole", "bus", "kite", "tower", "boat", "background")
    assert manifest.num_labels == 7 and manifest.label_names[6] == "background"
    assert manifest.source.annotation_file == "instances_train.json" and manifest.source.license_given is False
    assert manifest.params["seed"] == 11 and manifest.tool.version == data["tool"]["version"]
    assert manifest.part is None and manifest.parts == 1 and manifest.index_name == "index.parquet"
    files = manifest.files()
    assert len(files) == 2 * len(manifest.shards) + 1 and files[-1].name == "index.parquet"
    assert [f.size for f in files[:2]] == [s.shards[0].bytes, None]


def test_fields_this_version_does_not_know_ride_along(tmp_path):
    data = json.loads((DATA / WRITTEN[0]).read_text())
    data["provenance"] = {"signed_by": "someone"}
    data["groups"]["T"]["note"] = "hand-picked"
    data["groups"]["T"]["shards"][0]["md5"] = "0" * 32
    data["source"]["url"] = "https://example.org/coco"
    data["tool"]["commit"] = "abc"
    data["classes"][0]["synonyms"] = ["puck"]
    manifest = Manifest.from_json(copy.deepcopy(data))
    assert manifest.classes[0].extra == {"synonyms": ["puck"]} and manifest.classes[1].extra == {}
    assert manifest.extra == {"provenance": {"signed_by": "someone"}}
    assert manifest.groups["T"].shards[0].extra == {"md5": "0" * 32}
    assert manifest.to_json() == data
    manifest.write(tmp_path / "manifest.json")
    assert read_manifest(tmp_path) == manifest


def test_optional_fields_stay_absent():
    """A minimal set (as pipelines' crafted test sets are): no source, no counts, no part."""
    shard = {"name": "S/S-000000.tar", "samples": 2, "bytes": 10240, "sha256": "a" * 64}
    data = {
        "format_version": "1.0",
        "groups": {"S": {"shards": [shard], "samples": 2, "bytes": 10240}},
        "classes": [{"label": 0, "category_id": 1, "name": "thing"}],
        "background": {"label": 1, "category_id": 0, "name": "background"},
    }
    manifest = Manifest.from_json(copy.deepcopy(data))
    assert manifest.source is None and manifest.counts is None and manifest.groups["S"].shards[0].idx_sha256 is None
    assert manifest.to_json() == data
    assert [f.name for f in manifest.files()] == ["S/S-000000.tar"]


def test_a_group_is_its_shards_totals():
    shards = [ShardInfo("S/a.tar", 3, 100, "a" * 64, "b" * 64), ShardInfo("S/b.tar", 4, 50, "c" * 64, "d" * 64)]
    group = GroupInfo.of(shards)
    assert (group.samples, group.bytes) == (7, 150)
    assert group.to_json()["shards"][1] == {
        "name": "S/b.tar",
        "samples": 4,
        "bytes": 50,
        "sha256": "c" * 64,
        "idx_sha256": "d" * 64,
    }


@pytest.mark.parametrize(
    "edit,error,message",
    [
        (lambda m: m.update(format_version="3.0"), InputError, "format version 3.0"),
        (lambda m: m.update(format_version="x"), InputError, "format version 'x': not a jigsawdata manifest"),
        (lambda m: m.pop("groups"), ManifestError, "no 'groups' object"),
        (lambda m: m["groups"]["S"].pop("samples"), ManifestError, "no sample count for 'group S'"),
        (lambda m: m["groups"]["S"]["shards"][0].update(samples=True), ManifestError, "no sample count"),
        (lambda m: m.update(card_sha256="nope"), ManifestError, "no valid sha256 for 'README.md'"),
        (lambda m: m["classes"][2].pop("name"), ManifestError, r"no valid classes\[2\].name"),
        (lambda m: m.update(background=None), ManifestError, "no valid background"),
        (lambda m: m["source"].update(images="24"), ManifestError, "no valid source.images"),
        (lambda m: m.update(index="../index.parquet"), ManifestError, "unsafe path"),
        (lambda m: m["classes"][1].update(label=0), ManifestError, "class labels are .* they must be 0..C-1"),
        (lambda m: m["classes"][0].update(label=99), ManifestError, "class labels are"),
        (lambda m: m["background"].update(label=0), ManifestError, "with background 0"),
        (
            lambda m: m["groups"].update(S=m["groups"]["W"], W=m["groups"]["S"]),
            ManifestError,
            "lists 'W/.*' in group S",
        ),
        (lambda m: m["groups"].update(X=m["groups"].pop("T")), ManifestError, "groups 'X'; a shard set has only S"),
    ],
)
def test_malformed_manifests_are_refused(edit, error, message):
    data = json.loads((DATA / WRITTEN[0]).read_text())
    edit(data)
    with pytest.raises(error, match=message):
        Manifest.from_json(data)


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(InputError, match="is not a JSON object"):
        read_manifest(tmp_path)


def test_atomic_path_renames_when_done_and_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert not target.exists() and tmp.name == "out.bin.tmp"
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_path(target, shared=True) as tmp:
        assert tmp.name != "out.bin.tmp" and tmp.parent == tmp_path
        tmp.write_bytes(b"shared")
    assert target.read_bytes() == b"shared" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_shard_locations(tmp_path):
    local = ShardLocation.of(f"file://{tmp_path}")
    assert not local.remote and local.root == tmp_path and local.local_copy("/cache") == tmp_path
    assert local.file("S/S-000000.tar") == str(tmp_path / "S" / "S-000000.tar")
    url = ShardLocation.of("https://example.org/sets/coco/")
    assert url.remote and url.file("S/S-000000.tar") == "https://example.org/sets/coco/S/S-000000.tar"
    copy_dir = url.local_copy(tmp_path / "cache")
    assert copy_dir.parent == tmp_path / "cache" and copy_dir == url.local_copy(tmp_path / "cache")
    assert copy_dir != ShardLocation.of("https://example.org/sets/other").local_copy(tmp_path / "cache")


def test_rank_and_world_come_from_torchrun_variables(monkeypatch):
    from jigsawdata.pipelines.ranks import process_info

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = process_info()
    assert (info.rank, info.world, info.local_rank, info.main) == (3, 4, 1, False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert process_info().main and process_info().world == 1


def test_a_set_without_shards_is_refused():
    data = {
        "format_version": "1.0",
        "groups": {"S": {"shards": [], "samples": 0, "bytes": 0}},
        "classes": [{"label": 0, "category_id": 1, "name": "thing"}],
        "background": {"label": 1, "category_id": 0, "name": "background"},
    }
    with pytest.raises(ManifestError, match="lists no shards"):
        Manifest.from_json(copy.deepcopy(data))
    data["groups"] = {}
    with pytest.raises(ManifestError, match="lists no shards"):
        Manifest.from_json(data)

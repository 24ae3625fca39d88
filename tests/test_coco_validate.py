"""Checking a COCO-format set (``jigsawdata.coco.validate``): annotation and image input that
could give wrong data or a traceback is an error naming the record and field, or a counted,
named skip."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jigsawdata.build.run import BuildConfig, build_shards
from jigsawdata.cli import main
from jigsawdata.coco.reader import decode_image, load_coco
from jigsawdata.errors import InputError
from jigsawdata.shardset.check import summarize
from jigsawdata.shardset.manifest import read_manifest
from jigsawdata.synthetic.shapes import make_synthetic_coco


@pytest.fixture
def coco(tmp_path):
    """A fresh 6-image synthetic set: (root, annotation dict, annotation path)."""
    make_synthetic_coco(tmp_path / "src", images=6, seed=1)
    ann = tmp_path / "src" / "annotations" / "instances_train.json"
    return tmp_path / "src", json.loads(ann.read_text()), ann


def _save(ann: Path, data: dict) -> None:
    ann.write_text(json.dumps(data))


def _samples(out: Path) -> list[dict]:
    metas = []
    for shard in sorted(out.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return metas


def _crops(out: Path) -> dict[int, list[np.ndarray]]:
    """Decoded crops by image id."""
    found: dict[int, list[np.ndarray]] = {}
    for shard in sorted(out.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar}
            for name, m in members.items():
                if name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    jpg = tar.extractfile(members[name[:-5] + ".jpg"]).read()
                    found.setdefault(meta["image_id"], []).append(np.asarray(Image.open(io.BytesIO(jpg))))
    return found


def _cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# ---------------------------------------------------------------- structural defects: errors naming the record


def test_duplicate_image_ids_are_an_error_naming_both(coco):
    root, data, ann = coco
    data["images"][3]["id"] = data["images"][1]["id"]
    _save(ann, data)
    with pytest.raises(InputError, match=r"images\[3\] \(id 2\): image id 2 is used twice \(images\[1\] too\)"):
        load_coco(ann, root / "train")


def test_duplicate_category_ids_are_an_error_naming_both_names(coco):
    root, data, ann = coco
    data["categories"].append({"id": 3, "name": "impostor"})
    _save(ann, data)
    with pytest.raises(InputError, match=r"category id 3 is used twice \('pole' and 'impostor'\)"):
        load_coco(ann, root / "train")


def test_categories_sharing_a_name_keep_their_labels_with_a_warning(coco, caplog, tmp_path):
    root, data, ann = coco
    data["categories"].append({"id": 99, "name": "pole"})
    _save(ann, data)
    data["categories"][0]["name"] = "background"  # the shards' own background class is named so
    _save(ann, data)
    source = load_coco(ann, root / "train")
    assert [c.name for c in source.classes].count("pole") == 2 and len(source.classes) == len(data["categories"])
    assert "categories share a name: 'pole' (ids 3, 99)" in caplog.text
    assert f"category {data['categories'][0]['id']} is named 'background'" in caplog.text
    out = tmp_path / "out"
    build_shards(source, out, BuildConfig())
    classes = summarize(out)["classes"]  # counted per label, whatever the names
    assert sum(classes.values()) == sum(g.samples for g in read_manifest(out).groups.values())
    assert "background (category 0)" in classes


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["images"][0].update(width="abc"), r"images\[0\] \(id 1\): 'width' must be an integer, got 'abc'"),
        (lambda d: d["images"][0].update(height=0), r"images\[0\] \(id 1\): 'height' must be >= 1, got 0"),
        (lambda d: d["images"][2].update(id="3"), r"images\[2\] \(id '3'\): 'id' must be an integer, got '3'"),
        (
            lambda d: d["images"][1].pop("file_name"),
            r"images\[1\] \(id 2\): 'file_name' must be a non-empty string, got None",
        ),
        (
            lambda d: d["images"][1].update(file_name=None),
            r"images\[1\] \(id 2\): 'file_name' must be a non-empty string",
        ),
        (lambda d: d.update(images={"1": d["images"][0]}), r"'images' must be a list, got dict"),
        (lambda d: d["categories"][2].pop("name"), r"categories\[2\] \(id 7\): 'name' must be a non-empty string"),
        (lambda d: d["categories"][0].pop("id"), r"categories\[0\]: 'id' must be an integer, got None"),
        (
            lambda d: d["annotations"][4].update(image_id="1"),
            r"annotations\[4\] \(id 5\): 'image_id' must be an integer",
        ),
        (lambda d: d["annotations"][4].update(id=1), r"annotations\[4\] \(id 1\): annotation id 1 is used twice"),
        (lambda d: d["annotations"][4].update(iscrowd="yes"), r"annotations\[4\] \(id 5\): 'iscrowd' must be 0 or 1"),
        (lambda d: d["annotations"].append(7), r"annotations\[\d+\] must be an object, got int"),
        # ids seed the per-image generator, and a negative annotation id marks background in the index
        (lambda d: d["images"][1].update(id=-2), r"images\[1\] \(id -2\): 'id' must be >= 0, got -2"),
        (lambda d: d["annotations"][4].update(id=-5), r"annotations\[4\] \(id -5\): 'id' must be >= 0, got -5"),
        (
            lambda d: d["categories"][1].update(name="\ud800"),
            r"categories\[1\] \(id 3\): 'name' must be printable text",
        ),
        (lambda d: d["categories"][1].update(name="two\nlines"), r"categories\[1\] \(id 3\): 'name' must be printable"),
        (lambda d: d["categories"][1].update(name="tab\tbed"), r"categories\[1\] \(id 3\): 'name' must be printable"),
    ],
)
def test_structural_defects_are_one_line_errors_naming_record_and_field(coco, tmp_path, mutate, message):
    root, data, ann = coco
    mutate(data)
    _save(ann, data)
    with pytest.raises(InputError, match=message):
        load_coco(ann, root / "train")
    line = _cli_error(["build-shards", str(root), "--out", str(tmp_path / "out")])
    assert line.startswith("Error: ") and str(ann) in line
    assert not (tmp_path / "out").exists(), "nothing is written before the input is known to be usable"


# ---------------------------------------------------------------- bad boxes: counted skips


@pytest.mark.parametrize(
    "bbox,reason",
    [
        ([float("nan"), 10, 20, 20], "nonfinite_boxes"),
        ([10, 10, float("inf"), 20], "nonfinite_boxes"),
        ([10, 10, 20], "malformed_boxes"),
        (None, "malformed_boxes"),
        ("10,10,20,20", "malformed_boxes"),
        ([10, 10, True, 20], "malformed_boxes"),
        ("missing", "malformed_boxes"),
        ([10, 10, -20, 20], "degenerate_boxes"),
    ],
)
def test_a_bad_box_is_a_counted_skip_never_a_positive(coco, tmp_path, bbox, reason):
    root, data, ann = coco
    victim = data["annotations"][0]
    if bbox == "missing":
        victim.pop("bbox")
    else:
        victim["bbox"] = bbox
    _save(ann, data)
    manifest = build_shards(load_coco(ann, root / "train"), tmp_path / "out", BuildConfig(seed=1))
    assert manifest.counts[reason] == 1
    assert victim["id"] not in {m["ann_id"] for m in _samples(tmp_path / "out")}
    if reason != "degenerate_boxes":
        with pytest.raises(InputError, match=rf"annotations\[0\] \(id {victim['id']}\): 'bbox' must be four finite"):
            load_coco(ann, root / "train", strict=True)


def test_nan_box_in_json_text_is_skipped_not_widened(coco, tmp_path):
    root, data, ann = coco
    text = json.dumps(data).replace(json.dumps(data["annotations"][0]["bbox"]), "[NaN, 5, 30, 30]", 1)
    ann.write_text(text)
    source = load_coco(ann, root / "train")
    assert source.images[0].dropped.get("nonfinite_boxes") == 1
    assert all(b.bbox[2] < source.images[0].width for im in source.images for b in im.boxes)


# ---------------------------------------------------------------- paths: never outside --image-dir


def test_file_names_outside_the_image_folder_are_named_skips(coco, tmp_path):
    root, data, ann = coco
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(root / "train" / data["images"][0]["file_name"], secret / "s.jpg")
    data["images"][0]["file_name"] = "../../secret/s.jpg"
    data["images"][1]["file_name"] = str(secret / "s.jpg")
    inside = data["images"][2]
    inside["file_name"] = str((root / "train" / inside["file_name"]).resolve())  # absolute, but inside
    _save(ann, data)
    manifest = build_shards(load_coco(ann, root / "train"), tmp_path / "out", BuildConfig())
    assert {s["image_id"]: s["reason"] for s in manifest.skipped_images} == {
        1: "path_outside_images",
        2: "path_outside_images",
    }
    samples = _samples(tmp_path / "out")
    assert {m["image_id"] for m in samples} == {3, 4, 5, 6}
    assert all(not m["source"].startswith("/") and ".." not in m["source"] for m in samples)
    assert {m["source"] for m in samples if m["image_id"] == 3} == {"000000000003.jpg"}
    with pytest.raises(InputError, match=r"images\[0\] \(id 1\): 'file_name' '../../secret/s.jpg' is outside"):
        load_coco(ann, root / "train", strict=True)
    line = _cli_error(["build-shards", str(root), "--out", str(tmp_path / "o2"), "--strict"])
    assert "is outside the image folder" in line


def test_symlinks_inside_the_image_folder_are_followed(coco, tmp_path):
    root, data, ann = coco
    storage = tmp_path / "storage"
    shutil.move(root / "train", storage)
    (root / "train").symlink_to(storage)  # the image folder itself links to other storage
    manifest = build_shards(load_coco(ann, root / "train"), tmp_path / "out", BuildConfig())
    assert manifest.skipped_images == [] and manifest.counts["images_used"] == 6


# ---------------------------------------------------------------- images: 16-bit, bombs, EXIF


def _single_image_set(root: Path, pixels_saver, width: int, height: int) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    pixels_saver(root / "train" / "a.png")
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0}],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    return ann


def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    gradient = (np.linspace(0, 65535, 120)[None, :] * np.ones((90, 1))).astype(np.uint16)
    ann = _single_image_set(tmp_path / "src", lambda p: Image.fromarray(gradient).save(p), 120, 90)
    assert Image.open(tmp_path / "src" / "train" / "a.png").mode == "I;16"
    decoded = decode_image(tmp_path / "src" / "train" / "a.png", 120, 90)
    row = np.asarray(decoded.image)[0, :, 0].astype(int)
    assert abs(row[0] - 0) <= 1 and abs(row[-1] - 255) <= 1 and abs(row[60] - 129) <= 2
    build_shards(load_coco(ann, tmp_path / "src" / "train"), tmp_path / "out", BuildConfig())
    crops = _crops(tmp_path / "out")[1]
    assert all(c.min() < 200 for c in crops), "a 16-bit crop must not come out pure white"


def test_float_image_is_scaled(tmp_path):
    values = np.linspace(0.0, 1.0, 50, dtype=np.float32)[None, :].repeat(20, 0)
    path = tmp_path / "f.tif"
    Image.fromarray(values, "F").save(path)
    row = np.asarray(decode_image(path, 50, 20).image)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255


def _bomb_png(path: Path, side: int = 65535) -> None:
    """A 69-byte PNG whose header claims side x side pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.slow
def test_decompression_bomb_is_a_counted_named_skip(coco, tmp_path, workers):
    root, data, ann = coco
    data["images"].append({"id": 99, "file_name": "bomb.png", "width": 65535, "height": 65535})
    _save(ann, data)
    _bomb_png(root / "train" / "bomb.png")
    manifest = build_shards(load_coco(ann, root / "train"), tmp_path / "out", BuildConfig(), workers=workers)
    assert manifest.skipped_images == [{"image_id": 99, "file_name": "bomb.png", "reason": "image_too_large"}]
    assert manifest.counts["image_too_large"] == 1 and manifest.counts["images_used"] == 6


def test_max_pixels_limits_each_image(coco, tmp_path):
    root, data, ann = coco
    limit = sorted(im["width"] * im["height"] for im in data["images"])[3]
    result = CliRunner().invoke(
        main, ["build-shards", str(root), "--out", str(tmp_path / "out"), "--max-pixels", str(limit)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    too_large = {im["id"] for im in data["images"] if im["width"] * im["height"] > limit}
    assert too_large and {s["image_id"] for s in manifest["skipped_images"]} == too_large
    assert manifest["params"]["max_pixels"] == limit


def test_exif_orientation_is_recorded_when_both_views_fit(tmp_path):
    def save(path):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 CW: a square image has the annotated size both ways
        Image.new("RGB", (80, 80), (200, 10, 10)).save(path.with_suffix(".jpg"), exif=exif)
        path.with_suffix(".jpg").rename(path)

    ann = _single_image_set(tmp_path / "src", save, 80, 80)
    manifest = build_shards(load_coco(ann, tmp_path / "src" / "train"), tmp_path / "out", BuildConfig())
    assert manifest.exif_orientation == [{"image_id": 1, "file_name": "a.png", "exif_orientation": 6}]


# ---------------------------------------------------------------- COCO-format variants, no flags


def _lvis(data: dict) -> dict:
    for im in data["images"]:
        im["coco_url"] = f"http://images.cocodataset.org/train2017/{im.pop('file_name')}"
        im["neg_category_ids"], im["not_exhaustive_category_ids"] = [], []
    for a in data["annotations"]:
        a.pop("iscrowd")
    used = {c["id"]: c for c in data["categories"]}
    data["categories"] = [
        {
            "id": i,
            "name": used[i]["name"] if i in used else f"cat_{i}",
            "synonyms": [],
            "frequency": "frc"[i % 3],
            "synset": f"s.{i}",
        }
        for i in range(1, 1204)
    ]
    return data


@pytest.mark.parametrize("images_arg", ["train2017", "."])
def test_lvis_v1_builds_without_flags(coco, tmp_path, images_arg):
    root, data, _ = coco
    lvis = tmp_path / "lvis"
    shutil.copytree(root / "train", lvis / "train2017")
    (lvis / "lvis_v1_train.json").write_text(json.dumps(_lvis(data)))
    images = lvis / images_arg
    result = CliRunner().invoke(
        main,
        [
            "build-shards",
            "--ann",
            str(lvis / "lvis_v1_train.json"),
            "--image-dir",
            str(images),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["classes"]) == 1203 and manifest["skipped_images"] == []
    assert manifest["counts"]["images_used"] == 6 and manifest["counts"]["positives"] > 10
    sources = {m["source"] for m in _samples(tmp_path / "out")}
    prefix = "train2017/" if images_arg == "." else ""
    assert f"{prefix}000000000001.jpg" in sources


@pytest.mark.parametrize("layout", ["objects365", "custom"])
def test_file_names_with_sub_folders_build_without_flags(coco, tmp_path, layout):
    root, data, _ = coco
    base = tmp_path / layout
    for i, im in enumerate(data["images"]):
        sub = f"images/v2/patch{i % 3}" if layout == "objects365" else f"site{i % 2}/day1"
        (base / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "train" / im["file_name"], base / sub / im["file_name"])
        im["file_name"] = f"{sub}/{im['file_name']}"
    if layout == "objects365":
        for a in data["annotations"]:
            a["isfake"], a["isreflected"] = 0, 0
    (base / "zhiyuan_objv2_train.json").write_text(json.dumps(data))
    manifest = build_shards(load_coco(base / "zhiyuan_objv2_train.json", base), tmp_path / "out", BuildConfig())
    assert manifest.skipped_images == [] and manifest.counts["images_used"] == 6
    sources = {m["source"] for m in _samples(tmp_path / "out")}
    assert sources == {im["file_name"] for im in data["images"]}


def test_category_id_zero_is_refused_because_it_marks_background(tmp_path):
    from jigsawdata.coco.validate import check_coco

    raw = {"images": [], "annotations": [], "categories": [{"id": 0, "name": "disc"}]}
    with pytest.raises(InputError, match=r"categories\[0\].*'id' must be >= 1, got 0"):
        check_coco(raw, tmp_path)


def test_class_names_in_any_script_are_accepted(coco):
    """Joiners (Persian, Hindi, emoji sequences), no-break and ideographic spaces are text."""
    root, data, ann = coco
    names = [
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
        "\u0915\u094d\u200d\u0937",
        "a\u00a0b",
        "\u6771\u3000\u4eac",
        "\U0001f469\u200d\U0001f4bb",
    ]
    for cat, name in zip(data["categories"], names):
        cat["name"] = name
    _save(ann, data)
    assert [c.name for c in load_coco(ann, root / "train").classes][: len(names)] == names

"""Bad and unusual input: a clear error or a counted skip, never a crash or a silent loss."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jigsawdata.build.run import BuildConfig, build_shards
from jigsawdata.cli import main
from jigsawdata.coco.reader import load_coco, load_rgb
from jigsawdata.errors import InputError
from jigsawdata.synthetic.shapes import make_synthetic_coco


@pytest.fixture
def coco(tmp_path):
    """A fresh, writable 6-image synthetic set: (root, annotation dict, annotation path)."""
    make_synthetic_coco(tmp_path, images=6, seed=1)
    ann = tmp_path / "annotations" / "instances_train.json"
    return tmp_path, json.loads(ann.read_text()), ann


def _save(ann_path, data):
    ann_path.write_text(json.dumps(data))


def test_missing_annotation_file_and_image_folder(tmp_path, coco):
    root, _, ann = coco
    with pytest.raises(InputError, match="annotation file not found"):
        load_coco(tmp_path / "nope.json", root / "train")
    with pytest.raises(InputError, match="image folder not found"):
        load_coco(ann, root / "nope")


def test_invalid_json_and_non_coco_json(coco):
    root, _, ann = coco
    ann.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_coco(ann, root / "train")
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="no 'annotations' list"):
        load_coco(ann, root / "train")


def test_unknown_category_ids_are_named(coco):
    root, data, ann = coco
    data["annotations"][0]["category_id"] = 999
    data["annotations"][1]["category_id"] = 555
    _save(ann, data)
    first = data["annotations"][0]["id"]
    with pytest.raises(
        InputError,
        match=rf"instances_train.json: .*\[555, 999\] \(first: the annotation with id "
        rf"{first}\)",
    ):
        load_coco(ann, root / "train")


def test_empty_dataset_is_an_error(coco):
    root, data, ann = coco
    images = data["images"]
    data["images"], data["annotations"] = [], []
    _save(ann, data)
    with pytest.raises(InputError, match="lists no images"):
        load_coco(ann, root / "train")
    data["images"], data["categories"] = images, []
    _save(ann, data)
    with pytest.raises(InputError, match="lists no categories: there is nothing to pre-train on"):
        load_coco(ann, root / "train")


def test_bad_boxes_are_clipped_or_dropped_and_counted(coco):
    root, data, ann = coco
    img = data["images"][0]
    extra = [
        [10, 10, 0, 20],  # zero width: degenerate
        [10, 10, 20, -5],  # negative height: degenerate
        [img["width"] + 5, 10, 20, 20],  # wholly outside: dropped
        [img["width"] - 30, 10, 60, 40],  # partly outside: clipped
    ]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for i, bbox in enumerate(extra):
        data["annotations"].append(
            {
                "id": next_id + i,
                "image_id": img["id"],
                "category_id": 1,
                "bbox": bbox,
                "area": 1.0,
                "iscrowd": 0,
                "segmentation": [],
            }
        )
    _save(ann, data)
    source = load_coco(ann, root / "train")
    record = source.images[0]
    assert record.dropped == {"degenerate_boxes": 2, "outside_boxes": 1, "clipped_boxes": 1}
    clipped = next(b for b in record.boxes if b.ann_id == next_id + 3)
    assert clipped.bbox == (img["width"] - 30, 10, 30, 40)


def test_missing_and_corrupt_images_are_skipped_counted_and_named(tmp_path, coco):
    root, data, ann = coco
    names = [im["file_name"] for im in data["images"]]
    (root / "train" / names[0]).unlink()
    (root / "train" / names[1]).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data["images"][2]["width"] += 7  # annotation disagrees with the pixels
    data["images"][3]["file_name"] = "x" * 300 + ".jpg"  # longer than a file name can be: no such file
    _save(ann, data)
    manifest = build_shards(load_coco(ann, root / "train"), tmp_path / "out", BuildConfig())
    reasons = {s["file_name"]: s["reason"] for s in manifest.skipped_images}
    assert reasons == {
        names[0]: "image_missing",
        names[1]: "image_corrupt",
        names[2]: "image_size_mismatch",
        "x" * 300 + ".jpg": "image_missing",
    }
    assert manifest.counts["images_used"] == 2 and manifest.counts["image_missing"] == 2


def test_no_usable_image_is_an_error(tmp_path, coco):
    root, _, ann = coco
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    with pytest.raises(InputError, match="no crops could be extracted"):
        build_shards(load_coco(ann, root / "train"), tmp_path / "out", BuildConfig())


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = img.convert("I").convert("I;16")
    path = tmp_path / "x.png" if mode in ("P", "RGBA", "I;16") else tmp_path / "x.jpg"
    img.save(path)
    out, reason = load_rgb(path, 40, 30)
    assert reason is None and out.mode == "RGB" and out.size == (40, 30)


def _exif_rotated(tmp_path, stored=(60, 40)):
    """A JPEG stored 60x40 whose EXIF says 'rotate 90 CW' (orientation 6): shown 40x60."""
    img = Image.new("RGB", stored, (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, 10, 10))  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    return path


def test_exif_rotated_image_uses_the_orientation_matching_the_annotation(tmp_path):
    path = _exif_rotated(tmp_path)
    shown, _ = load_rgb(path, 40, 60)  # annotated on the rotated view
    stored, _ = load_rgb(path, 60, 40)  # annotated on the stored pixels
    assert shown.size == (40, 60) and stored.size == (60, 40)
    assert stored.getpixel((2, 2))[2] > 150  # marker stays top-left when stored
    assert shown.getpixel((37, 2))[2] > 150  # and moves top-right once rotated 90 CW
    assert load_rgb(path, 50, 50) == (None, "image_size_mismatch")


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = CliRunner().invoke(main, ["build-shards", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "cannot pick a split" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        main,
        ["build-shards", "--ann", str(tmp_path / "a.json"), "--image-dir", str(tmp_path), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 1 and "annotation file not found" in result.output


def test_cli_refuses_bad_part_and_size(tmp_path, coco):
    root, _, _ = coco
    result = CliRunner().invoke(main, ["build-shards", str(root), "--out", str(tmp_path / "o"), "--part", "2/2"])
    assert result.exit_code == 2 and "0 <= K < N" in result.output
    result = CliRunner().invoke(main, ["build-shards", str(root), "--out", str(tmp_path / "o"), "--shard-size", "lots"])
    assert result.exit_code == 2 and "not a size" in result.output

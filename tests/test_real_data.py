"""build-shards on the real COCO 2017 subset (../shared/data/coco-train288)."""

import json

import numpy as np
import pytest

from jigsawdata.shardset.check import verify_shard_set
from jigsawdata.shardset.index import read_index
from jigsawdata.shardset.manifest import read_manifest


@pytest.mark.slow
def test_real_subset_builds_completely(built_real, real_coco):
    raw = json.loads((real_coco / "annotations" / "instances_train2017.json").read_text())
    manifest = read_manifest(built_real)
    counts = manifest.counts
    # Every non-crowd box of at least 4 px a side becomes exactly one positive.
    expected_pos = sum(1 for a in raw["annotations"] if not a["iscrowd"] and min(a["bbox"][2:]) >= 4)
    assert counts["positives"] == expected_pos
    assert counts["images"] == counts["images_used"] == len(raw["images"]) == 288
    assert manifest.skipped_images == []
    assert 9.0 <= counts["positives"] / counts["negatives"] <= 11.0
    assert len(manifest.classes) == 80 and manifest.background.label == 80
    rows = read_index(built_real / "index.parquet").to_pylist()
    assert len({r["category_id"] for r in rows if r["category_id"]}) == 80
    for r in rows:
        w, h = r["width"], r["height"]
        assert r["group"] == ("T" if 2 * w < h else "W" if 2 * w > 3 * h else "S")
    assert verify_shard_set(built_real) == []


def test_real_negatives_touch_no_object(built_real, real_source):
    boxes = {
        im.image_id: np.array(
            [[b.bbox[0], b.bbox[1], b.bbox[0] + b.bbox[2], b.bbox[1] + b.bbox[3]] for b in im.boxes]
        ).reshape(-1, 4)
        for im in real_source.images
    }
    negatives = [r for r in read_index(built_real / "index.parquet").to_pylist() if r["ann_id"] is None]
    assert len(negatives) > 100
    for r in negatives:
        x0, y0, x1, y1 = r["crop_box"]
        objs = boxes[r["image_id"]]
        ix = np.minimum(x1, objs[:, 2]) - np.maximum(x0, objs[:, 0])
        iy = np.minimum(y1, objs[:, 3]) - np.maximum(y0, objs[:, 1])
        assert not np.any((ix > 0) & (iy > 0)), r

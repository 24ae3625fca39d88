from collections import Counter

import numpy as np
import pytest

from jigsawdata import geometry
from jigsawdata.coco import GtBox, ImageRecord
from jigsawdata.sampling import SamplingConfig, image_rng, plan_image

CFG = SamplingConfig()


def _plan_all(source, cfg=CFG, seed=0):
    plans, counts = {}, Counter()
    for image in source.images:
        crops, c = plan_image(image, cfg, source.background_label, image_rng(seed, image.image_id))
        plans[image.image_id] = crops
        counts.update(c)
    return plans, counts


def _check_plans(source, plans):
    for image in source.images:
        objects = np.array([geometry.xywh_to_xyxy(b.bbox) for b in image.boxes]).reshape(-1, 4)
        by_ann = {b.ann_id: b for b in image.boxes}
        for crop in plans[image.image_id]:
            x0, y0, x1, y1 = crop.crop_box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            if crop.ann_id is None:
                assert crop.label == source.background_label and crop.category_id == 0
                # IoU = 0 against every GT box, crowd boxes included, on the float boxes.
                assert np.all(geometry.iou(crop.crop_box, objects) == 0)
            else:
                gt = by_ann[crop.ann_id]
                assert not gt.iscrowd and crop.label == gt.label
                hull = geometry.clip_box(geometry.pixel_hull(geometry.xywh_to_xyxy(gt.bbox)), image.width, image.height)
                assert x0 <= hull[0] and y0 <= hull[1] and x1 >= hull[2] and y1 >= hull[3]
                hw, hh = geometry.box_size(hull)
                assert crop.width <= 2 * hw and crop.height <= 2 * hh


def test_synthetic_plans_obey_geometry(synthetic_source):
    plans, counts = _plan_all(synthetic_source)
    _check_plans(synthetic_source, plans)
    crowd = sum(b.iscrowd for im in synthetic_source.images for b in im.boxes)
    assert crowd > 0 and counts["crowd_boxes"] == crowd


def test_real_plans_obey_geometry_and_ratio(real_source):
    plans, counts = _plan_all(real_source)
    _check_plans(real_source, plans)
    ratio = counts["positives"] / counts["negatives"]
    assert 9.0 <= ratio <= 11.0, counts
    assert counts["crowd_boxes"] == 24


def test_ratio_follows_the_setting(real_source):
    _, counts = _plan_all(real_source, SamplingConfig(pos_per_neg=4.0))
    assert 3.6 <= counts["positives"] / counts["negatives"] <= 4.4, counts


def test_same_seed_same_plan_other_seed_other_plan(synthetic_source):
    a, _ = _plan_all(synthetic_source, seed=5)
    b, _ = _plan_all(synthetic_source, seed=5)
    c, _ = _plan_all(synthetic_source, seed=6)
    assert a == b and a != c


def _image(boxes, width=200, height=100):
    return ImageRecord(1, "x.jpg", width, height, tuple(boxes))


def test_crowd_and_tiny_boxes_give_no_positive():
    boxes = [GtBox(1, 5, 0, (10, 10, 30, 30), False), GtBox(2, 5, 0, (60, 10, 3.5, 30), False),
             GtBox(3, 5, 0, (100, 10, 50, 50), True)]
    crops, counts = plan_image(_image(boxes), CFG, 1, np.random.default_rng(0))
    assert [c.ann_id for c in crops if c.ann_id is not None] == [1]
    assert counts["tiny_boxes"] == 1 and counts["crowd_boxes"] == 1 and counts["positives"] == 1


def test_image_without_free_background_yields_no_negative_and_is_counted():
    boxes = [GtBox(i, 5, 0, (0, 0, 200, 100), False) for i in range(1, 11)]
    crops, counts = plan_image(_image(boxes), CFG, 1, np.random.default_rng(0))
    assert all(c.ann_id is not None for c in crops)
    assert counts["negatives"] == 0 and counts["negatives_not_placed"] == 1
    assert counts["images_without_background"] == 1


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="max_enlarge"):
        SamplingConfig(max_enlarge=0.5)
    with pytest.raises(ValueError, match="pos_per_neg"):
        SamplingConfig(pos_per_neg=0)


@pytest.mark.parametrize("field, value", [("max_enlarge", float("nan")), ("max_enlarge", float("inf")),
                                          ("pos_per_neg", float("nan")), ("pos_per_neg", float("inf"))])
def test_non_finite_sampling_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingConfig(**{field: value})

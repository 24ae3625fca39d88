import hashlib
from collections import Counter

import numpy as np
import pytest

from jigsawdata.build import geometry
from jigsawdata.build.sampling import SamplingConfig, image_rng, negative_topups, plan_image, topup_rng
from jigsawdata.coco.reader import GtBox, ImageRecord

CFG = SamplingConfig()


def _plan_all(source, cfg=CFG, seed=0):
    """Plans as the build makes them: each image's own, plus the seeded negative top-up."""
    plans, counts = {}, Counter()
    topups = negative_topups(source.images, cfg, source.background_label, seed)
    for image, extra in zip(source.images, topups.tolist(), strict=True):
        crops, c = plan_image(
            image, cfg, source.background_label, image_rng(seed, image.image_id), extra, topup_rng(seed, image.image_id)
        )
        plans[image.image_id] = crops
        counts.update(c)
    return plans, counts


def _check_plans(source, plans, avoid="crops"):
    for image in source.images:
        objects = np.array([geometry.xywh_to_xyxy(b.bbox) for b in image.boxes]).reshape(-1, 4)
        by_ann = {b.ann_id: b for b in image.boxes}
        positives = np.array([c.crop_box for c in plans[image.image_id] if c.ann_id is not None]).reshape(-1, 4)
        for crop in plans[image.image_id]:
            x0, y0, x1, y1 = crop.crop_box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            if crop.ann_id is None:
                assert crop.label == source.background_label and crop.category_id == 0
                # IoU = 0 against every GT box, crowd boxes included, on the float boxes.
                assert np.all(geometry.iou(crop.crop_box, objects) == 0)
                if avoid == "crops":  # docs/method.md 1: and against every enlarged positive crop
                    assert np.all(geometry.intersection_area(crop.crop_box, positives) == 0)
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


@pytest.mark.slow
def test_real_plans_obey_geometry_and_ratio(real_source):
    plans, counts = _plan_all(real_source)
    _check_plans(real_source, plans)
    ratio = counts["positives"] / counts["negatives"]
    assert 9.0 <= ratio <= 11.0, counts
    assert counts["crowd_boxes"] == 24


def _touching_negatives(plans) -> int:
    touching = 0
    for crops in plans.values():
        positives = np.array([c.crop_box for c in crops if c.ann_id is not None]).reshape(-1, 4)
        touching += sum(
            bool(geometry.intersection_area(c.crop_box, positives).any()) for c in crops if c.ann_id is None
        )
    return touching


@pytest.mark.slow
def test_gt_rule_keeps_the_old_behaviour_and_shares_pixels_with_crops(real_source):
    cfg = SamplingConfig(negatives_avoid="gt")
    plans, counts = _plan_all(real_source, cfg)
    _check_plans(real_source, plans, avoid="gt")
    assert counts["negatives_topped_up"] == 0, "the old rule has no top-up"
    negatives = sum(c.ann_id is None for crops in plans.values() for c in crops)
    assert _touching_negatives(plans) > 0.3 * negatives  # the reason the paper's rule is the default
    assert _touching_negatives(_plan_all(real_source)[0]) == 0


def test_gt_rule_plans_are_those_of_the_previous_release(synthetic_root):
    """sha256 of every (key, label, crop box) of the synthetic set, computed with the code
    from before negatives avoided the enlarged crops: --negatives-avoid gt reproduces it."""
    from jigsawdata.coco.reader import load_coco

    source = load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    digest = hashlib.sha256()
    for crops in _plan_all(source, SamplingConfig(negatives_avoid="gt"))[0].values():
        for c in crops:
            digest.update(f"{c.key} {c.label} {c.crop_box}\n".encode())
    assert digest.hexdigest() == "2459c015e71141aaa45c2dc598bbc05e00c52b40975c25425102663695d47497"


@pytest.mark.slow
def test_topup_restores_the_ratio_when_crops_crowd_images_out(real_source):
    plans, counts = _plan_all(real_source)
    assert counts["negatives_not_placed"] > 20, counts  # crowded COCO images cannot place theirs
    assert counts["negatives_topped_up"] == counts["negatives_not_placed"]
    assert counts["negatives"] == counts["negatives_wanted"]
    assert 9.5 <= counts["positives"] / counts["negatives"] <= 10.5


def test_topup_is_empty_when_no_image_has_room():
    boxes = [GtBox(i, 5, 0, (0, 0, 200, 100), False) for i in range(1, 11)]
    assert negative_topups([_image(boxes)], CFG, 1, seed=0).tolist() == [1]
    crops, counts = plan_image(_image(boxes), CFG, 1, image_rng(0, 1), 1, topup_rng(0, 1))
    assert counts["negatives"] == 0 and counts["negatives_topped_up"] == 0


def test_negative_beside_a_box_avoids_its_enlarged_crop():
    """One 40x40 box in a 200x100 image: under the paper's rule no negative touches its crop."""
    boxes = [GtBox(1, 5, 0, (80, 30, 40, 40), False)]
    cfg = SamplingConfig(pos_per_neg=0.1)  # ten negatives for the one positive
    for seed in range(20):
        crops, counts = plan_image(_image(boxes), cfg, 1, image_rng(seed, 1))
        crop = crops[0].crop_box
        assert counts["negatives"] == 10
        for neg in crops[1:]:
            assert geometry.intersection_area(neg.crop_box, np.array([crop], float))[0] == 0


@pytest.mark.slow
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
    boxes = [
        GtBox(1, 5, 0, (10, 10, 30, 30), False),
        GtBox(2, 5, 0, (60, 10, 3.5, 30), False),
        GtBox(3, 5, 0, (100, 10, 50, 50), True),
    ]
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
    with pytest.raises(ValueError, match="--max-enlarge must be >= 1, got 0.5"):
        SamplingConfig(max_enlarge=0.5)
    with pytest.raises(ValueError, match="--pos-per-neg must be > 0, got 0"):
        SamplingConfig(pos_per_neg=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max-enlarge", float("nan")),
        ("max-enlarge", float("inf")),
        ("pos-per-neg", float("nan")),
        ("pos-per-neg", float("inf")),
    ],
)
def test_non_finite_sampling_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"--{field} must be a finite number"):
        SamplingConfig(**{field.replace("-", "_"): value})

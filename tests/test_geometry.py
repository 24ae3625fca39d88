import numpy as np
import pytest

from jigsawdata.build import geometry
from jigsawdata.shardset.grouping import group_of


@pytest.mark.parametrize("seed", range(20))
def test_enlarged_box_contains_hull_and_at_most_doubles(seed):
    rng = np.random.default_rng(seed)
    x0, y0 = (int(v) for v in rng.integers(0, 300, 2))
    w, h = (int(v) for v in rng.integers(1, 200, 2))
    hull = (x0, y0, x0 + w, y0 + h)
    for _ in range(50):
        big = geometry.enlarge_box(hull, rng, 2.0)
        assert big[0] <= hull[0] and big[1] <= hull[1] and big[2] >= hull[2] and big[3] >= hull[3]
        bw, bh = geometry.box_size(big)
        assert w <= bw <= 2 * w and h <= bh <= 2 * h
        clipped = geometry.clip_box(big, 320, 240)
        assert 0 <= clipped[0] and 0 <= clipped[1] and clipped[2] <= 320 and clipped[3] <= 240


def test_enlargement_factors_spread_over_one_to_two():
    rng = np.random.default_rng(0)
    hull = (1000, 1000, 1200, 1100)
    factors = np.array([geometry.box_size(geometry.enlarge_box(hull, rng)) for _ in range(4000)]) / (200, 100)
    assert factors.min() >= 1.0 and factors.max() <= 2.0
    # The sum of two U[0, 1/2] side moves: mean 1.5, and both ends reached.
    assert abs(factors.mean() - 1.5) < 0.02
    assert (factors < 1.1).mean() > 0.01 and (factors > 1.9).mean() > 0.01


def test_enlarge_with_factor_one_is_identity():
    rng = np.random.default_rng(0)
    assert geometry.enlarge_box((3, 4, 50, 60), rng, 1.0) == (3, 4, 50, 60)


def test_pixel_hull_floors_start_and_ceils_end():
    assert geometry.pixel_hull((1.2, 2.9, 10.1, 11.0)) == (1, 2, 11, 11)


def test_iou_known_values():
    others = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10]], dtype=float)
    np.testing.assert_allclose(geometry.iou((0, 0, 10, 10), others), [1.0, 50 / 150, 0.0])


def test_background_box_never_touches_objects():
    rng = np.random.default_rng(1)
    objects = np.array([[10.5, 10.5, 60.2, 70.9], [100, 0, 140, 240]], dtype=float)
    for _ in range(300):
        box = geometry.sample_background_box((30, 20), 320, 240, objects, rng, 100)
        assert box is not None and geometry.box_size(box) == (30, 20)
        assert np.all(geometry.iou(box, objects) == 0)


def test_background_box_gives_up_on_a_covered_image():
    rng = np.random.default_rng(1)
    objects = np.array([[0, 0, 320, 240]], dtype=float)
    assert geometry.sample_background_box((8, 8), 320, 240, objects, rng, 50) is None


@pytest.mark.parametrize(
    "w,h,group",
    [
        (50, 100, "S"),
        (49, 100, "T"),
        (1, 3, "T"),
        (1, 2, "S"),
        (150, 100, "S"),
        (151, 100, "W"),
        (3, 2, "S"),
        (31, 20, "W"),
        (100, 100, "S"),
    ],
)
def test_group_boundaries(w, h, group):
    assert group_of(w, h) == group


def test_group_rejects_empty_crop():
    with pytest.raises(ValueError, match="positive size"):
        group_of(0, 10)

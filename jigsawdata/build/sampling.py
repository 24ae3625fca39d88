"""Which crops one image yields: enlarged positives and object-free negatives.

A plan depends only on the annotations and a seeded generator, never on pixels, so it can
be tested exactly and reproduced anywhere. Generators are derived from ``(seed, image_id)``,
which makes a build independent of how images are spread over workers or machines.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jigsawdata.coco.reader import ImageRecord
from jigsawdata.settings import check, setting
from jigsawdata.shardset.grouping import group_of

from . import geometry

NEGATIVES_AVOID = ("crops", "gt")
_IMAGE_STREAM = 1  # keeps per-image generators apart from the shuffle's (see shuffle_rng)
_SHUFFLE_STREAM = 2
_TOPUP_STREAM = 3


@dataclass(frozen=True)
class SamplingConfig:
    max_enlarge: float = setting(
        2.0, "Largest context growth per axis of a positive crop (docs/method.md 1: up to 2x).", min=1.0
    )
    pos_per_neg: float = setting(
        10.0, "Positives per negative crop, overall (docs/method.md 1: 10:1).", min=0.0, min_open=True
    )
    min_box_size: int = setting(4, "Smallest GT box side (px) kept as a positive.", min=1)
    negative_tries: int = setting(
        40, "Sizes tried per negative before giving up on it (each with a few placements).", min=1
    )
    negative_shrink: float = setting(
        0.9,
        "Each failed negative size is followed by one this much smaller, so "
        "crowded images still yield background crops (never below --min-box-size).",
        min=0.0,
        max=1.0,
        min_open=True,
    )
    negatives_avoid: str = setting(
        "crops",
        "What negatives must not touch: the enlarged positive crops and every GT "
        "box (docs/method.md 1: negatives exclusive with the positive samples), or only the GT "
        "boxes.",
        choices=NEGATIVES_AVOID,
    )

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class CropSpec:
    key: str
    image_id: int
    ann_id: int | None
    category_id: int
    """COCO category id; 0 for background."""
    label: int
    gt_box: tuple[float, float, float, float] | None
    crop_box: geometry.Box

    @property
    def width(self) -> int:
        return self.crop_box[2] - self.crop_box[0]

    @property
    def height(self) -> int:
        return self.crop_box[3] - self.crop_box[1]

    @property
    def group(self) -> str:
        return group_of(self.width, self.height)


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, _IMAGE_STREAM, image_id])


def shuffle_rng(seed: int, part: int, group_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SHUFFLE_STREAM, part, group_index])


def sample_key(image_id: int, index: int) -> str:
    """Tar member stem of a crop: sortable, unique, and free of dots (webdataset splits there)."""
    return f"{image_id:012d}_{index:04d}"


def plan_image(
    image: ImageRecord,
    cfg: SamplingConfig,
    background_label: int,
    rng: np.random.Generator,
    extra_negatives: int = 0,
    extra_rng: np.random.Generator | None = None,
) -> tuple[list[CropSpec], Counter]:
    """Crops of one image and the counts of what was left out, by reason.

    ``extra_negatives`` more placements are tried with ``extra_rng`` after the image's own
    negatives: the top-up :func:`negative_topups` assigns to images with room.
    """
    counts: Counter = Counter(image.dropped)
    crops: list[CropSpec] = []
    for box in image.boxes:
        if box.iscrowd:
            counts["crowd_boxes"] += 1
            continue
        if min(box.bbox[2], box.bbox[3]) < cfg.min_box_size:
            counts["tiny_boxes"] += 1
            continue
        hull = geometry.clip_box(geometry.pixel_hull(geometry.xywh_to_xyxy(box.bbox)), image.width, image.height)
        crop = geometry.clip_box(geometry.enlarge_box(hull, rng, cfg.max_enlarge), image.width, image.height)
        crops.append(
            CropSpec(
                sample_key(image.image_id, len(crops)),
                image.image_id,
                box.ann_id,
                box.category_id,
                box.label,
                box.bbox,
                crop,
            )
        )
    counts["positives"] += len(crops)
    if not crops:
        counts["images_without_positives"] += 1
        return crops, counts

    # Stochastic rounding keeps the overall ratio at pos_per_neg while every image decides alone.
    wanted = len(crops) / cfg.pos_per_neg
    n_neg = math.floor(wanted) + int(rng.random() < wanted - math.floor(wanted))
    counts["negatives_wanted"] += n_neg
    obstacles, sizes = _negative_context(image, crops, cfg)
    negatives = _place_negatives(image, obstacles, sizes, cfg, rng, n_neg)
    placed = len(negatives)
    if extra_negatives:
        extra = _place_negatives(image, obstacles, sizes, cfg, extra_rng, extra_negatives)
        counts["negatives_topped_up"] += len(extra)
        negatives += extra
    for box in negatives:
        crops.append(
            CropSpec(sample_key(image.image_id, len(crops)), image.image_id, None, 0, background_label, None, box)
        )
    counts["negatives"] += len(negatives)
    if placed < n_neg:
        counts["negatives_not_placed"] += n_neg - placed
        if placed == 0:
            counts["images_without_background"] += 1
    return crops, counts


def negative_topups(images: Sequence[ImageRecord], cfg: SamplingConfig, background_label: int, seed: int) -> np.ndarray:
    """Extra negative placements of each image of ``images`` (in its order) that keep the
    overall ratio at ``pos_per_neg``.

    Under ``negatives_avoid="crops"`` an image whose enlarged crops cover it places fewer
    negatives than it wants; this makes up that deficit, one placement per image per round,
    from images that still have room, visited in a seeded order. It reads annotations only,
    and each image's extra placements come from its own generator (:func:`topup_rng`), so
    the extraction of one image reproduces them alone. ``gt`` is left as it was (no top-up).

    Memory is a few bytes per image: an image's obstacles are planned again when it is
    visited, and its generator is kept between rounds as its state's numbers.
    """
    tries = np.zeros(len(images), dtype=np.int32)
    if cfg.negatives_avoid == "gt":
        return tries
    deficit, image_ids, with_positives = 0, np.empty(len(images), dtype=np.int64), np.zeros(len(images), dtype=bool)
    for pos, image in enumerate(images):
        crops, counts = plan_image(image, cfg, background_label, image_rng(seed, image.image_id))
        deficit += counts["negatives_not_placed"]
        image_ids[pos], with_positives[pos] = image.image_id, any(c.ann_id is not None for c in crops)
    if deficit == 0:
        return tries
    candidates = np.flatnonzero(with_positives)
    candidates = candidates[np.argsort(image_ids[candidates], kind="stable")]
    visit_ids = np.random.default_rng([seed, _TOPUP_STREAM]).permutation(image_ids[candidates])
    order = candidates[np.searchsorted(image_ids[candidates], visit_ids)]
    states = _GeneratorStates(len(images))
    while deficit > 0 and len(order):
        room = np.zeros(len(order), dtype=bool)
        for k in range(len(order)):
            if deficit == 0:
                break
            pos = int(order[k])
            image = images[pos]
            crops, _ = plan_image(image, cfg, background_label, image_rng(seed, image.image_id))
            obstacles, sizes = _negative_context(image, [c for c in crops if c.ann_id is not None], cfg)
            rng = topup_rng(seed, image.image_id)
            if tries[pos]:
                states.restore(pos, rng)
            tries[pos] += 1
            if _place_negatives(image, obstacles, sizes, cfg, rng, 1):
                deficit -= 1
                room[k] = True
                states.save(pos, rng)
        order = order[room]
    return tries


class _GeneratorStates:
    """The PCG64 state of each image's top-up generator between rounds, as numbers: a live
    generator per image would cost a kilobyte each."""

    def __init__(self, n: int) -> None:
        self._high, self._low = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
        self._has_uint32, self._uinteger = np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.uint32)

    def save(self, pos: int, rng: np.random.Generator) -> None:
        state = rng.bit_generator.state
        self._high[pos], self._low[pos] = divmod(state["state"]["state"], 1 << 64)
        self._has_uint32[pos], self._uinteger[pos] = state["has_uint32"], state["uinteger"]

    def restore(self, pos: int, rng: np.random.Generator) -> None:
        """``rng`` is the image's fresh generator: its stream (``inc``) is kept, its state set."""
        state = rng.bit_generator.state
        state["state"]["state"] = (int(self._high[pos]) << 64) | int(self._low[pos])
        state["has_uint32"], state["uinteger"] = int(self._has_uint32[pos]), int(self._uinteger[pos])
        rng.bit_generator.state = state


def topup_rng(seed: int, image_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TOPUP_STREAM, image_id])


def _negative_context(
    image: ImageRecord, positives: Sequence[CropSpec], cfg: SamplingConfig
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """What a negative must not touch (every GT box, crowd and tiny ones included, plus the
    enlarged positive crops unless ``negatives_avoid`` is ``gt``) and the object sizes a
    negative's size is drawn from (each positive's GT box, as whole pixels)."""
    boxes = [geometry.xywh_to_xyxy(b.bbox) for b in image.boxes]
    if cfg.negatives_avoid == "crops":
        boxes += [c.crop_box for c in positives]
    obstacles = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    sizes = [
        geometry.box_size(
            geometry.clip_box(geometry.pixel_hull(geometry.xywh_to_xyxy(c.gt_box)), image.width, image.height)
        )
        for c in positives
    ]
    return obstacles, sizes


def _place_negatives(
    image: ImageRecord,
    obstacles: np.ndarray,
    sizes: list[tuple[int, int]],
    cfg: SamplingConfig,
    rng: np.random.Generator,
    n: int,
) -> list[geometry.Box]:
    boxes = (_place_negative(image, obstacles, sizes, cfg, rng) for _ in range(n))
    return [box for box in boxes if box is not None]


_PLACEMENTS_PER_SIZE = 4


def _place_negative(
    image: ImageRecord,
    obstacles: np.ndarray,
    sizes: list[tuple[int, int]],
    cfg: SamplingConfig,
    rng: np.random.Generator,
) -> geometry.Box | None:
    """A background box sized like a random object of the image (grown like a positive),
    shrinking after each size that finds no free place; ``obstacles`` are what it must not
    touch (GT boxes, and the positive crops unless ``negatives_avoid`` is ``gt``)."""
    for attempt in range(cfg.negative_tries):
        w, h = sizes[int(rng.integers(len(sizes)))]
        scale = rng.uniform(1.0, cfg.max_enlarge, size=2) * cfg.negative_shrink**attempt
        size = (max(cfg.min_box_size, math.floor(w * scale[0])), max(cfg.min_box_size, math.floor(h * scale[1])))
        box = geometry.sample_background_box(size, image.width, image.height, obstacles, rng, _PLACEMENTS_PER_SIZE)
        if box is not None:
            return box
    return None

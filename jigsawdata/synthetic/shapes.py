"""A small, deterministic, synthetic COCO-format detection set: the embedded default data.

Real COCO images cannot ship with the project, yet the demo and the tests need a detection
set with the properties that matter here: textured backgrounds with free space for
negatives, objects of several categories whose boxes are square, tall and wide, a few crowd
regions, and non-contiguous category ids. The same ``seed`` always gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jigsawdata.build.geometry import intersection_area
from jigsawdata.layout import annotation_name


@dataclass(frozen=True)
class _Kind:
    category_id: int
    name: str
    shape: str
    aspect: tuple[float, float]
    """Range of box width / height."""


# Non-contiguous ids, as in COCO, so the label mapping is exercised.
KINDS: tuple[_Kind, ...] = (
    _Kind(1, "disc", "ellipse", (0.8, 1.25)),
    _Kind(3, "pole", "rectangle", (0.2, 0.45)),
    _Kind(7, "bus", "rectangle", (1.7, 3.5)),
    _Kind(12, "kite", "diamond", (0.7, 1.4)),
    _Kind(18, "tower", "triangle", (0.3, 0.48)),
    _Kind(40, "boat", "ellipse", (1.6, 3.0)),
)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6.3)
        img[..., c] = 110 + 50 * np.sin(fx * xx + phase) * np.cos(fy * yy) + rng.normal(0, 12, (height, width))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, kind: _Kind, box: tuple[float, float, float, float], color) -> list[float]:
    """Draw one object filling ``box`` (xyxy); return its polygon for the annotation."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind.shape == "ellipse":
        draw.ellipse(box, fill=color)
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        pts = np.stack([cx + (x1 - x0) / 2 * np.cos(t), cy + (y1 - y0) / 2 * np.sin(t)], 1)
        return [round(float(v), 2) for v in pts.reshape(-1)]
    if kind.shape == "diamond":
        poly = [cx, y0, x1, cy, cx, y1, x0, cy]
    elif kind.shape == "triangle":
        poly = [cx, y0, x1, y1, x0, y1]
    else:
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
    draw.polygon(poly, fill=color)
    return [round(float(v), 2) for v in poly]


def make_synthetic_coco(root: Path, images: int = 48, seed: int = 0, split: str = "train") -> Path:
    """Write ``root/annotations/instances_<split>.json`` and ``root/<split>/*.jpg``.

    Returns the annotation file's path.
    """
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coco_images, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = int(rng.integers(20, 31)) * 16, int(rng.integers(15, 24)) * 16
        canvas = Image.fromarray(_background(rng, width, height))
        draw = ImageDraw.Draw(canvas)
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(3, 9))):
            kind = KINDS[int(rng.integers(len(KINDS)))]
            box = place_box(
                rng, width, height, kind.aspect, side=(24, 110), max_frac=0.6, placed=placed, max_overlap=0.3
            )
            if box is None:
                continue
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            poly = _draw(draw, kind, box, color)
            annotations.append(_annotation(len(annotations) + 1, image_id, kind.category_id, box, poly, crowd=False))
        if image_id % 8 == 0:  # a crowd region: many small blobs under one box
            kind = KINDS[0]
            x0, y0 = rng.uniform(0, width - 80), rng.uniform(0, height - 50)
            box = (round(x0, 2), round(y0, 2), round(x0 + 80, 2), round(y0 + 50, 2))
            for _ in range(12):
                bx, by = rng.uniform(box[0], box[2] - 8), rng.uniform(box[1], box[3] - 8)
                draw.ellipse((bx, by, bx + 8, by + 8), fill=(240, 240, 40))
            poly = [box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]
            annotations.append(_annotation(len(annotations) + 1, image_id, kind.category_id, box, poly, crowd=True))
        file_name = f"{image_id:012d}.jpg"
        canvas.save(image_dir / file_name, quality=92)
        coco_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    dataset = {
        "info": {"description": f"jigsawdata synthetic detection set (seed {seed})"},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": k.category_id, "name": k.name, "supercategory": "shape"} for k in KINDS],
    }
    ann_file = root / "annotations" / annotation_name(split)
    ann_file.write_text(json.dumps(dataset))
    return ann_file


def place_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    aspect: tuple[float, float],
    *,
    side: tuple[float, float],
    max_frac: float,
    placed: list,
    max_overlap: float,
) -> tuple | None:
    """A box of random aspect (width / height in ``aspect``) and area (side in ``side`` px,
    each side at most ``max_frac`` of the image's), anywhere in the image; added to ``placed``
    and returned, or None when it covers more than ``max_overlap`` of its area with a box
    already placed. It always draws the same four numbers, so a generator's sequence does
    not depend on which boxes were kept."""
    ratio = rng.uniform(*aspect)
    area = rng.uniform(*side) ** 2
    w, h = min(np.sqrt(area * ratio), width * max_frac), min(np.sqrt(area / ratio), height * max_frac)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    box = (round(x0, 2), round(y0, 2), round(x0 + w, 2), round(y0 + h, 2))
    if placed and intersection_area(tuple(map(int, box)), np.array(placed)).max() > max_overlap * w * h:
        return None
    placed.append(box)
    return box


def _annotation(ann_id: int, image_id: int, category_id: int, box, polygon, crowd: bool) -> dict:
    x0, y0, x1, y1 = box
    w, h = round(x1 - x0, 2), round(y1 - y0, 2)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x0, y0, w, h],
        "area": round(w * h, 2),
        "iscrowd": int(crowd),
        "segmentation": [polygon],
    }

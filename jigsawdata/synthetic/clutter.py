"""A harder synthetic detection set, for the ``experiment`` tiny preset.

The demo set (:mod:`jigsawdata.synthetic.shapes`) is easy: six shapes, each its own class, on a
smooth background. Here a class is a shape *and* a texture (solid or striped, colours drawn
at random, so colour says nothing), objects are small and many, and the background carries
clutter (lines, specks) that belongs to no class: telling classes apart takes features that
pre-training can teach. Several hundred images of a few hundred pixels keep a CPU grid
short. The same ``seed`` always gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jigsawdata.layout import annotation_name

from .shapes import _annotation, _background, _draw, place_box


@dataclass(frozen=True)
class _Shape:
    name: str
    shape: str
    aspect: tuple[float, float]
    """Range of box width / height: square, tall and wide shapes give S, T and W crops."""


SHAPES: tuple[_Shape, ...] = (
    _Shape("disc", "ellipse", (0.8, 1.25)),
    _Shape("pole", "rectangle", (0.25, 0.45)),
    _Shape("bus", "rectangle", (1.8, 3.2)),
    _Shape("kite", "diamond", (0.7, 1.4)),
    _Shape("tower", "triangle", (0.3, 0.48)),
    _Shape("boat", "ellipse", (1.7, 3.0)),
)
TEXTURES: tuple[str, ...] = ("solid", "striped")


def categories() -> list[dict]:
    """12 classes (shape x texture) with non-contiguous ids, as COCO has."""
    return [
        {"id": 2 * (i * len(TEXTURES) + t) + 1, "name": f"{s.name}-{texture}", "supercategory": s.name}
        for i, s in enumerate(SHAPES)
        for t, texture in enumerate(TEXTURES)
    ]


def _texture(rng: np.random.Generator, width: int, height: int, striped: bool) -> Image.Image:
    first = rng.integers(0, 256, 3)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = first
    if striped:
        period = int(rng.integers(4, 8))
        second = (first + rng.integers(80, 176, 3)) % 256  # far from the first colour
        axis = np.arange(width if rng.random() < 0.5 else height)
        band = (axis // (period // 2)) % 2 == 1
        if len(axis) == width:
            pixels[:, band] = second
        else:
            pixels[band, :] = second
    return Image.fromarray(pixels)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """Lines and specks that belong to no class."""
    for _ in range(int(rng.integers(6, 15))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            x1, y1 = x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(2, 5)
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)


def make_clutter_coco(root: Path, images: int = 400, seed: int = 0, split: str = "train") -> Path:
    """Write ``root/annotations/instances_<split>.json`` and ``root/<split>/*.jpg``; returns
    the annotation file. Use another seed for a held-out split."""
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    cats = categories()
    coco_images, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = int(rng.integers(10, 17)) * 16, int(rng.integers(8, 14)) * 16
        canvas = Image.fromarray(_background(rng, width, height))
        _clutter(ImageDraw.Draw(canvas), rng, width, height)
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(3, 10))):
            k = int(rng.integers(len(cats)))
            shape = SHAPES[k // len(TEXTURES)]
            box = place_box(
                rng, width, height, shape.aspect, side=(16, 56), max_frac=0.7, placed=placed, max_overlap=0.2
            )
            if box is None:
                continue
            mask = Image.new("L", (width, height), 0)
            poly = _draw(ImageDraw.Draw(mask), shape, box, 255)
            canvas.paste(_texture(rng, width, height, TEXTURES[k % len(TEXTURES)] == "striped"), mask=mask)
            annotations.append(_annotation(len(annotations) + 1, image_id, cats[k]["id"], box, poly, crowd=False))
        file_name = f"{image_id:012d}.jpg"
        canvas.save(image_dir / file_name, quality=92)
        coco_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    dataset = {
        "info": {"description": f"jigsawdata cluttered synthetic detection set (seed {seed})"},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": cats,
    }
    ann_file = root / "annotations" / annotation_name(split)
    ann_file.write_text(json.dumps(dataset))
    return ann_file

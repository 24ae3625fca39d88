"""Draw assembled jigsaw images as a grid, with region borders and class names, so a person
can see at a glance that crops land in the right regions with the right labels."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .config import IMAGENET_MEAN, IMAGENET_STD
from .template import Template


def denormalize(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) normalised -> (N, H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    px = (images.detach().float().cpu() * std + mean) * 255
    return px.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def render_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    template: Template,
    columns: int = 4,
    gap: int = 4,
) -> Image.Image:
    tiles = denormalize(images)
    n, size = len(tiles), template.canvas
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * (size + gap) + gap, rows * (size + gap) + gap), (255, 255, 255))
    font = ImageFont.load_default(size=11)
    for i, tile in enumerate(tiles):
        img = Image.fromarray(tile)
        draw = ImageDraw.Draw(img)
        for r, (x0, y0, x1, y1) in enumerate(template.boxes):
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255), width=1)
            text = class_names[int(labels[i, r])]
            box = draw.textbbox((x0 + 2, y0 + 2), text, font=font)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((x0 + 2, y0 + 2), text, fill=(255, 255, 0), font=font)
        grid.paste(img, (gap + (i % columns) * (size + gap), gap + (i // columns) * (size + gap)))
    return grid

"""Draw effective receptive fields over the jigsaw template, as in the paper's Fig. 6."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from jigsawdata.pipelines.template import REGION_NAMES, Template


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB, black through red and yellow to white."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return (
        np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1) * 255
    ).astype(np.uint8)


def render_erf(erf: torch.Tensor, weights: torch.Tensor, template: Template, region: int = 0) -> Image.Image:
    """Left: the summed ERF of ``region``'s feature cells on the canvas (sqrt-scaled), region
    borders drawn. Right: each region's label weight at those cells, as bars."""
    cells = torch.from_numpy(template.feature_region_map().reshape(-1) == region)
    heat = erf[cells].sum(0).cpu().numpy()
    heat = np.sqrt(heat / max(heat.max(), 1e-12))
    canvas = Image.fromarray(_heat(heat)).resize((2 * template.canvas,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in template.boxes:
        draw.rectangle((2 * x0, 2 * y0, 2 * x1 - 1, 2 * y1 - 1), outline=(80, 160, 255), width=2)
    panel = Image.new("RGB", (220, canvas.height), (255, 255, 255))
    pd = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=13)
    mean_w = weights.reshape(4, -1)[:, cells].mean(1).cpu().numpy()
    pd.text((10, 10), f"label weights at {REGION_NAMES[region]} cells", fill=(0, 0, 0), font=font)
    for i, w in enumerate(mean_w):
        y = 40 + 30 * i
        pd.rectangle((60, y, 60 + int(140 * w), y + 18), fill=(200, 60, 40))
        pd.text((10, y + 2), f"{REGION_NAMES[i]} {w:.2f}", fill=(0, 0, 0), font=font)
    out = Image.new("RGB", (canvas.width + panel.width, canvas.height), (255, 255, 255))
    out.paste(canvas, (0, 0))
    out.paste(panel, (canvas.width, 0))
    return out

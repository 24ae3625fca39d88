"""Effective receptive fields (Luo et al., 2016) and the ERF-adaptive label weights (docs/method.md 4).

Because the jigsaw template is fixed, the weights form one ``(4, g, g)`` tensor shared by
every image: ``weights[i, j, k]`` is how much of region ``i``'s label the prediction at
feature cell ``(j, k)`` should carry.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from jigsawdata.pipelines.template import Template


def effective_receptive_fields(model: nn.Module, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """``(g * g, H, W)`` ERF of every cell of the feature map X, averaged over ``images``.

    X is ``model.features(images)``, the backbone's output before the 1x1 head (docs/method.md 4).
    For each cell, the gradient of X at that cell summed over X's channels with respect to
    the input, its magnitude summed over input channels, normalised to sum 1 per image,
    then averaged. Not the logits: under softmax cross-entropy the class-summed logit
    direction gets no gradient, so an ERF taken through it would measure a random,
    decaying projection of X. Computed in eval mode (BatchNorm frozen, so images do not
    interact), all cells in one batched backward per chunk of images.
    """
    return _receptive_fields(model, images, lambda x: {"X": model.features(x)}, {"X": None}, chunk)["X"]


def _receptive_fields(
    model: nn.Module,
    images: torch.Tensor,
    levels: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    cells: Mapping[str, torch.Tensor | None],
    chunk: int,
) -> dict[str, torch.Tensor]:
    """``{level: (cells, H, W)}`` ERFs of the chosen cells (flat indices; None: every cell)
    of each level of ``levels(x)``, as :func:`effective_receptive_fields` defines them."""
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    try:
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk].detach().float().requires_grad_(True)
            maps = levels(x)
            for i, name in enumerate(cells):
                summed = maps[name].sum(dim=1)  # (n, g, g): the level summed over its channels
                n, gh, gw = summed.shape
                # grad_outputs[p] selects cell p of every image.
                selector = torch.eye(gh * gw, device=x.device, dtype=summed.dtype)
                if cells[name] is not None:
                    selector = selector[cells[name].to(x.device)]
                count = len(selector)
                selector = selector.view(count, 1, gh, gw).expand(count, n, gh, gw)
                (grads,) = torch.autograd.grad(
                    summed, x, grad_outputs=selector, is_grads_batched=True, retain_graph=i < len(cells) - 1
                )
                fields = grads.abs().sum(dim=2)  # (cells, n, H, W)
                fields = fields / fields.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
                part = fields.sum(dim=1)
                totals[name] = part if name not in totals else totals[name] + part
    finally:
        model.train(was_training)
    return {name: total / len(images) for name, total in totals.items()}


def level_region_maps(
    template: Template, strides: Mapping[str, int], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """``{level: (g, g)}`` region id of each cell of every level's grid."""
    return {
        name: torch.from_numpy(replace(template, stride=stride).feature_region_map()).to(device)
        for name, stride in strides.items()
    }


def lattice_cells(grid: int, step: int) -> torch.Tensor:
    """Flat indices of the cell at the middle of each ``step`` x ``step`` block of a
    ``grid`` x ``grid`` map: one cell per stride-32 cell of the template."""
    middle = torch.arange(grid // step) * step + step // 2
    return (middle[:, None] * grid + middle[None, :]).reshape(-1)


def level_receptive_fields(
    model: nn.Module, images: torch.Tensor, template: Template, chunk: int = 8, only: str | None = None
) -> dict[str, torch.Tensor]:
    """``{level: (cells, H, W)}`` ERFs of every level ``model.levels`` gives (or of ``only``).

    A level as coarse as the template's stride gets every cell's ERF: for the backbone-only
    model this is exactly :func:`effective_receptive_fields`. A finer level (FPN's P2..P4)
    gets its :func:`lattice_cells` only, one per template stride; :func:`level_weights`
    moves each of them to the cells of its block. P2 has 64 times P5's cells, and one ERF
    per cell would cost 85 times the backbone's refresh; this costs one per level.
    """
    cells = {
        name: (
            None if stride == template.stride else lattice_cells(template.canvas // stride, template.stride // stride)
        )
        for name, stride in model.strides.items()
        if only in (None, name)
    }
    return _receptive_fields(model, images, model.levels, cells, chunk)


def level_weights(
    maps: Mapping[str, torch.Tensor], template: Template, strides: Mapping[str, int], tau: float = 0.7
) -> "OrderedDict[str, torch.Tensor]":
    """``{level: (4, g, g)}`` Eq. 2 weights from :func:`level_receptive_fields`' maps."""
    out = OrderedDict()
    for name in maps:
        stride = strides[name]
        level = replace(template, stride=stride)
        step = template.stride // stride
        if step == 1:
            out[name] = erf_weights(maps[name], level, tau)
        else:
            share = translated_shares(maps[name], torch.from_numpy(template.masks()).to(maps[name]), stride, step)
            out[name] = _eq2(share, share.sum(dim=1), level, tau)
    return out


def translated_shares(maps: torch.Tensor, masks: torch.Tensor, stride: int, step: int) -> torch.Tensor:
    """``(g * g, 4)`` ``sum(G M_i)`` of every cell of a level, from the ERFs ``maps``
    ``(L * L, H, W)`` of its lattice cells (:func:`lattice_cells`, row-major).

    A cell's ERF is taken as its lattice cell's, translated by the cells' offset in pixels
    (a convolutional network's is, up to the canvas border); mass moved off the canvas is
    dropped, so the shares sum to the ERF's mass left on it. The masks are translated the
    other way instead of the maps, so no per-cell map is ever made.
    """
    _, height, width = masks.shape
    lattice = round(len(maps) ** 0.5)
    pad = stride * step
    padded = torch.nn.functional.pad(masks, (pad, pad, pad, pad))
    middle = step // 2
    moved = torch.stack(
        [
            padded[
                :,
                pad + (oy - middle) * stride : pad + (oy - middle) * stride + height,
                pad + (ox - middle) * stride : pad + (ox - middle) * stride + width,
            ]
            for oy in range(step)
            for ox in range(step)
        ]
    )  # (step * step, 4, H, W)
    share = torch.einsum("khw,orhw->kor", maps, moved)  # (lattice cell, offset, region)
    grid = lattice * step
    return share.view(lattice, lattice, step, step, 4).permute(0, 2, 1, 3, 4).reshape(grid * grid, 4)


def erf_weights(erf: torch.Tensor, template: Template, tau: float = 0.7) -> torch.Tensor:
    """docs/method.md Eq. 2: the ``(4, g, g)`` label weights from ``(g * g, H, W)`` ERF maps.

    For a cell in region r: ``w_r = max(tau, sum(G M_r) / sum(G))`` and, for i != r,
    ``w_i = (1 - w_r) sum(G M_i) / sum(G (1 - M_r))``. The weights of a cell sum to 1
    (unless its ERF lies wholly inside r, when w_r = 1 and the rest are 0).
    """
    share = torch.einsum("phw,rhw->pr", erf, torch.from_numpy(template.masks()).to(erf))  # (cells, 4): sum(G * M_i)
    return _eq2(share, erf.sum(dim=(1, 2)), template, tau)


def _eq2(share: torch.Tensor, total: torch.Tensor, template: Template, tau: float) -> torch.Tensor:
    """Eq. 2 from each cell's ``(cells, 4)`` region shares ``sum(G M_i)`` and ``sum(G)``."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    g = template.grid
    total = total.clamp_min(1e-12)
    own = torch.from_numpy(template.feature_region_map().reshape(-1)).to(share.device)
    cells = torch.arange(g * g, device=share.device)
    fraction = share / total[:, None]
    w_own = fraction[cells, own].clamp_min(tau)
    others = share.clone()
    others[cells, own] = 0.0
    rest = others.sum(dim=1, keepdim=True)
    weights = torch.where(rest > 0, (1.0 - w_own)[:, None] * others / rest.clamp_min(1e-12), torch.zeros_like(others))
    weights[cells, own] = w_own
    return weights.T.reshape(4, g, g).contiguous()


def blockwise_weights(template: Template) -> torch.Tensor:
    """One-hot weights: each cell carries only its own region's label (tau = 1)."""
    fmap = torch.from_numpy(template.feature_region_map())
    return torch.stack([(fmap == r).float() for r in range(4)])


def region_fractions(template: Template) -> np.ndarray:
    """Area share of each region on the canvas (the mixing weights of a global label)."""
    return template.masks().sum(axis=(1, 2)) / template.canvas**2

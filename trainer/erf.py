"""Effective receptive fields (Luo et al., 2016) and the ERF-adaptive label weights (PAPER.md 4).

Because the jigsaw template is fixed, the weights form one ``(4, g, g)`` tensor shared by
every image: ``weights[i, j, k]`` is how much of region ``i``'s label the prediction at
feature cell ``(j, k)`` should carry.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from jigsawdata.pipelines.template import Template


def effective_receptive_fields(model: nn.Module, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """``(g * g, H, W)`` ERF of every cell of the feature map X, averaged over ``images``.

    X is ``model.features(images)``, the backbone's output before the 1x1 head (PAPER.md 4).
    For each cell, the gradient of X at that cell summed over X's channels with respect to
    the input, its magnitude summed over input channels, normalised to sum 1 per image,
    then averaged. Not the logits: under softmax cross-entropy the class-summed logit
    direction gets no gradient, so an ERF taken through it would measure a random,
    decaying projection of X. Computed in eval mode (BatchNorm frozen, so images do not
    interact), all cells in one batched backward per chunk of images.
    """
    was_training = model.training
    model.eval()
    total = None
    try:
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk].detach().float().requires_grad_(True)
            summed = model.features(x).sum(dim=1)  # (n, g, g): X summed over its channels
            n, gh, gw = summed.shape
            cells = gh * gw
            # grad_outputs[p] selects cell p of every image.
            selector = torch.eye(cells, device=x.device, dtype=summed.dtype).view(cells, 1, gh, gw)
            selector = selector.expand(cells, n, gh, gw)
            (grads,) = torch.autograd.grad(summed, x, grad_outputs=selector, is_grads_batched=True)
            maps = grads.abs().sum(dim=2)  # (cells, n, H, W)
            maps = maps / maps.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
            part = maps.sum(dim=1)
            total = part if total is None else total + part
    finally:
        model.train(was_training)
    return total / len(images)


def erf_weights(erf: torch.Tensor, template: Template, tau: float = 0.7) -> torch.Tensor:
    """PAPER.md Eq. 2: the ``(4, g, g)`` label weights from ``(g * g, H, W)`` ERF maps.

    For a cell in region r: ``w_r = max(tau, sum(G M_r) / sum(G))`` and, for i != r,
    ``w_i = (1 - w_r) sum(G M_i) / sum(G (1 - M_r))``. The weights of a cell sum to 1
    (unless its ERF lies wholly inside r, when w_r = 1 and the rest are 0).
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    g = template.grid
    masks = torch.from_numpy(template.masks()).to(erf)  # (4, H, W)
    share = torch.einsum("phw,rhw->pr", erf, masks)  # (cells, 4): sum(G * M_i)
    total = erf.sum(dim=(1, 2)).clamp_min(1e-12)
    own = torch.from_numpy(template.feature_region_map().reshape(-1)).to(erf.device)
    cells = torch.arange(g * g, device=erf.device)
    fraction = share / total[:, None]
    w_own = fraction[cells, own].clamp_min(tau)
    others = share.clone()
    others[cells, own] = 0.0
    rest = others.sum(dim=1, keepdim=True)
    weights = torch.where(rest > 0, (1.0 - w_own)[:, None] * others / rest.clamp_min(1e-12),
                          torch.zeros_like(others))
    weights[cells, own] = w_own
    return weights.T.reshape(4, g, g).contiguous()


def blockwise_weights(template: Template) -> torch.Tensor:
    """One-hot weights: each cell carries only its own region's label (tau = 1)."""
    fmap = torch.from_numpy(template.feature_region_map())
    return torch.stack([(fmap == r).float() for r in range(4)])


def region_fractions(template: Template) -> np.ndarray:
    """Area share of each region on the canvas (the mixing weights of a global label)."""
    return template.masks().sum(axis=(1, 2)) / template.canvas ** 2

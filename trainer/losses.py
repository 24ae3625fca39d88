"""The three pre-training losses of docs/method.md Table 2, on ``(N, K, g, g)`` logit maps and
``(N, 4)`` region labels (region order TL, TR, BL, BR).

None materialises a soft-label map: with soft label ``y = sum_i w_i y_i`` the cross-entropy
at a cell is ``-sum_i w_i log p(label_i)``, so gathering the four labels' log-probabilities
is enough.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_mean(values: torch.Tensor, region_map: torch.Tensor) -> torch.Tensor:
    """``(..., g, g)`` cell values -> ``(..., 4)`` means over each region's cells."""
    onehot = F.one_hot(region_map.reshape(-1).to(values.device), 4).to(values.dtype)  # (g*g, 4)
    return values.flatten(-2) @ onehot / onehot.sum(0)


def erf_dense_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, region_map: torch.Tensor
) -> torch.Tensor:
    """Soft-label cross-entropy at every cell, averaged per region, then over regions and images."""
    n, _, gh, gw = logits.shape
    log_p = F.log_softmax(logits.float(), dim=1)
    picked = log_p.gather(1, labels[:, :, None, None].expand(n, 4, gh, gw))  # (N, 4, g, g)
    loss_map = -(picked * weights.to(picked)[None]).sum(dim=1)
    return region_mean(loss_map, region_map).mean()


def blockwise_loss(logits: torch.Tensor, labels: torch.Tensor, region_map: torch.Tensor) -> torch.Tensor:
    """Pool the logits over each region, hard label per region."""
    pooled = region_mean(logits.float(), region_map)  # (N, K, 4)
    return F.cross_entropy(pooled, labels)


def global_loss(logits: torch.Tensor, labels: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Global average pool, label mixed by region area (as CutMix does)."""
    log_p = F.log_softmax(logits.float().mean(dim=(2, 3)), dim=1)  # (N, K)
    return -(log_p.gather(1, labels) * area.to(log_p)[None]).sum(dim=1).mean()


def mean_over_levels(losses: list[torch.Tensor]) -> torch.Tensor:
    """The loss of a pyramid: its levels' losses averaged, each level counted once whatever
    its number of cells (one level: its own loss, untouched)."""
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

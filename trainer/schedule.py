"""The pre-training learning-rate schedule (docs/method.md 5) and its batch-size scaling."""

from __future__ import annotations

import math

REFERENCE_BATCH = 512


def scaled(lr: float, batch: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """Linear scaling rule (Goyal et al., 2017): the paper's rates are for batch 512."""
    return lr * batch / reference_batch


def learning_rate(iteration: int, *, total: int, warmup: int, lr_start: float, lr_peak: float) -> float:
    """Linear warm-up from ``lr_start`` to ``lr_peak`` over ``warmup`` iterations, then
    cosine decay from ``lr_peak`` to 0 at ``total``."""
    if iteration < warmup:
        return lr_start + (lr_peak - lr_start) * iteration / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (iteration - warmup) / span)
    return 0.5 * lr_peak * (1.0 + math.cos(math.pi * progress))

"""Pre-training quality without fine-tuning: k-nearest-neighbour top-1 on held-out crops.

Region top-1 (:mod:`.validate`) asks the pre-training head itself, on jigsaw images like
the ones it was trained on. The kNN probe asks only the backbone, on single crops, as a
detector's heads will: each crop (a shard sample, warped to a square) becomes the backbone's
global-average-pooled feature, L2-normalised; a held-out crop is labelled by a vote of its
``k`` most similar training crops, each weighted by ``exp(similarity / temperature)``
(Wu et al. 2018, as DINO evaluates). Nothing is trained, so the figure is the same for the
same weights and shards, and a randomly initialised backbone gives the floor to compare with.

The crops are the first ones of each group's shards, in proportion to the groups' sizes:
shards are shuffled when written, so that is a seeded random sample of the set.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from jigsawdata.errors import InputError
from jigsawdata.pipelines.reference import normalize, read_samples
from jigsawdata.shardset.open import ShardSet, as_shard_set

K = 20
TEMPERATURE = 0.07


@dataclass(frozen=True)
class Crops:
    images: torch.Tensor
    """``(N, 3, size, size)`` normalised crops."""
    labels: torch.Tensor
    """``(N,)`` shard labels (background included)."""


def load_crops(shards: ShardSet | Path | str, count: int, size: int) -> Crops:
    """The first ``count`` crops of a shard set (split over S / T / W by their sizes),
    each resized to ``size`` x ``size``."""
    if count < 1 or size < 1:
        raise InputError("the kNN probe needs >= 1 crop of >= 1 pixel")
    shard_set = as_shard_set(shards)
    total = sum(g.samples for g in shard_set.groups.values())
    images, labels = [], []
    for group in shard_set.groups.values():
        wanted = max(1, round(count * group.samples / total))
        for sample in itertools.islice(read_samples(group.tars), wanted):
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            images.append(normalize(np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))))
            labels.append(int(sample["cls"]))
    if not images:
        raise InputError(f"{shards} has no crops for the kNN probe")
    return Crops(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


@torch.no_grad()
def pooled_features(backbone: nn.Module, images: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """``(N, C)`` L2-normalised global-average-pooled ``layer4`` features of a torchvision
    ResNet, in eval mode and fp32 (the training mode is restored)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    b = backbone
    out = []
    try:
        for i in range(0, len(images), chunk):
            x = images[i : i + chunk].to(device)
            x = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
            out.append(F.normalize(x.float().mean(dim=(2, 3)), dim=1).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    k: int = K,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """The class each row of ``features`` gets from its ``k`` nearest training features
    (cosine similarity), by votes weighted ``exp(similarity / temperature)``."""
    k = min(k, len(train_features))
    similarity, index = (features @ train_features.T).topk(k, dim=1)
    votes = torch.zeros(len(features), int(train_labels.max()) + 1)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return votes.argmax(dim=1)


def knn_probe(backbone: nn.Module, train: Crops, val: Crops) -> dict[str, float]:
    """kNN top-1 on ``val`` with ``train`` as the memory, beside the majority-class rate."""
    predictions = knn_predict(
        pooled_features(backbone, train.images), train.labels, pooled_features(backbone, val.images)
    )
    majority = float(torch.bincount(val.labels).max()) / len(val.labels)
    return {
        "knn_top1": float((predictions == val.labels).float().mean()),
        "knn_majority": majority,
        "knn_k": K,
        "knn_train_crops": len(train.labels),
        "knn_val_crops": len(val.labels),
    }

"""The kNN probe: votes of the nearest training crops, and the crops it reads from shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jigsawdata.shardset.open import read_shard_set
from jigsawdata.trainer.model import build_backbone
from jigsawdata.trainer.probe import knn_predict, knn_probe, load_crops, pooled_features


def test_nearest_neighbours_vote_with_their_similarity():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]]), dim=1)
    assert knn_predict(train, labels, queries, k=2).tolist() == [0, 1, 0]
    # k=5: every training crop votes; the three class-1 crops outvote the two closer class-0
    # crops only when the temperature flattens the weights.
    assert knn_predict(train, labels, queries[2:], k=5, temperature=0.07).tolist() == [0]
    assert knn_predict(train, labels, queries[2:], k=5, temperature=100.0).tolist() == [1]


def test_crops_come_from_every_group_in_proportion_and_in_the_same_order(built_synthetic):
    crops = load_crops(built_synthetic, 12, 32)
    again = load_crops(built_synthetic, 12, 32)
    assert crops.images.shape == (len(crops.labels), 3, 32, 32) and 10 <= len(crops.labels) <= 14
    assert torch.equal(crops.images, again.images) and torch.equal(crops.labels, again.labels)
    classes = len(read_shard_set(built_synthetic).class_names)
    assert int(crops.labels.min()) >= 0 and int(crops.labels.max()) < classes


@pytest.mark.slow
def test_probe_of_a_backbone_reports_top1_beside_the_majority_rate(built_synthetic):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    crops = load_crops(built_synthetic, 24, 32)
    features = pooled_features(backbone, crops.images)
    assert features.shape == (len(crops.labels), 512)
    assert torch.allclose(features.norm(dim=1), torch.ones(len(features)))
    assert backbone.training  # the mode is restored
    result = knn_probe(backbone, crops, crops)
    assert 0.0 <= result["knn_top1"] <= 1.0 and result["knn_val_crops"] == len(crops.labels)
    majority = torch.bincount(crops.labels).max().item() / len(crops.labels)
    assert result["knn_majority"] == majority

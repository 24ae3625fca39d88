"""ResNet backbones with a dense classification head: a logit map instead of a logit vector.

The backbone is torchvision's own ResNet module, so its ``state_dict`` keys are exactly
torchvision's and the exported weights load into ``torchvision.models.resnet50`` (or a
detector built on it) without renaming. Average pooling and the FC layer are replaced by a
1x1 convolution to C + 1 classes (background included), applied at every position.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .config import ARCHS


def build_backbone(arch: str) -> ResNet:
    """A randomly initialised torchvision ResNet (no weights are ever downloaded)."""
    if arch == "resnext101_32x4d":  # torchvision ships 32x8d and 64x4d; the paper uses 32x4d
        return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return getattr(torchvision.models, arch)(weights=None)


class DenseClassifier(nn.Module):
    """``(N, 3, H, W)`` -> ``(N, num_classes, H / 32, W / 32)`` logits."""

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = build_backbone(arch)
        channels = self.backbone.fc.in_features
        self.backbone.avgpool = nn.Identity()
        self.backbone.fc = nn.Identity()
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

"""ResNet backbones with a dense classification head: a logit map instead of a logit vector.

The backbone is torchvision's own ResNet module, so its ``state_dict`` keys are exactly
torchvision's and the exported weights load into ``torchvision.models.resnet50`` (or a
detector built on it) without renaming. Average pooling and the FC layer are replaced by a
1x1 convolution to C + 1 classes (background included), applied at every position.

:class:`PyramidDenseClassifier` (``--neck fpn``) puts torchvision's
``FeaturePyramidNetwork`` (the module its FPN detectors use) between the backbone and the
head, and classifies densely on every pyramid level, so the neck is pre-trained too.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from .checkpoint import load
from .config import ARCHS, PretrainConfig, config_from, saved_config

PYRAMID_LEVELS: "OrderedDict[str, int]" = OrderedDict([("P2", 4), ("P3", 8), ("P4", 16), ("P5", 32)])
"""The pyramid levels classified densely, with their strides: every level the FPN
detectors' box heads pool from and every level with FPN weights of its own. The detectors'
extra "pool" level (P6, a max-pool of P5) has no weights and is left out."""
BACKBONE_LEVEL = "C5"
"""The one level of the backbone-only model: layer4's output, stride 32."""


def build_backbone(arch: str) -> ResNet:
    """A randomly initialised torchvision ResNet (no weights are ever downloaded)."""
    if arch == "resnext101_32x4d":  # torchvision ships 32x8d and 64x4d; the paper uses 32x4d
        return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return getattr(torchvision.models, arch)(weights=None)


def stage_channels(resnet: ResNet) -> list[int]:
    """Output channels of layer1..layer4 (torchvision's own rule in its FPN builder)."""
    stage2 = resnet.inplanes // 8
    return [stage2 * 2**k for k in range(4)]


class DenseClassifier(nn.Module):
    """``(N, 3, H, W)`` -> ``(N, num_classes, H / 32, W / 32)`` logits."""

    strides = OrderedDict([(BACKBONE_LEVEL, 32)])

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

    def levels(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """The feature maps classified, by level name (one here: X of docs/method.md 4)."""
        return OrderedDict([(BACKBONE_LEVEL, self.features(x))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PyramidDenseClassifier(nn.Module):
    """``(N, 3, H, W)`` -> ``{"P2": (N, K, H / 4, W / 4), ..., "P5": (N, K, H / 32, W / 32)}``.

    The pyramid is torchvision's ``FeaturePyramidNetwork`` on layer1..layer4 with no
    normalisation, as its Faster / Mask R-CNN FPN detectors build it, so ``fpn.*`` here is
    ``backbone.fpn.*`` there key for key. One 1x1 head is shared by every level, as the
    detectors' RPN and box heads are, so each level's features must answer the same question.
    """

    strides = PYRAMID_LEVELS

    def __init__(self, arch: str, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = build_backbone(arch)
        self.backbone.avgpool = nn.Identity()
        self.backbone.fc = nn.Identity()
        self.fpn = FeaturePyramidNetwork(stage_channels(self.backbone), channels)
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """layer4's output, as :class:`DenseClassifier`'s (what the kNN probe pools)."""
        return self._stages(x)[-1]

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        out = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            out.append(x)
        return out

    def levels(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        pyramid = self.fpn(OrderedDict(zip(PYRAMID_LEVELS, self._stages(x))))
        return OrderedDict(pyramid.items())

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((name, self.head(level)) for name, level in self.levels(x).items())


def build_model(arch: str, num_classes: int, neck: str = "none", fpn_channels: int = 256) -> nn.Module:
    """The pre-training model of ``--neck``: the backbone alone, or backbone + FPN."""
    if neck == "fpn":
        return PyramidDenseClassifier(arch, num_classes, fpn_channels)
    return DenseClassifier(arch, num_classes)


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """The model a pre-training checkpoint's weights belong to, with them loaded (on the CPU)."""
    cfg = ckpt.get("config", {})
    model = build_model(ckpt["arch"], len(ckpt["class_names"]), cfg.get("neck", "none"), cfg.get("fpn_channels", 256))
    model.load_state_dict(ckpt["model"])
    return model


def load_pretrained(run: Path | str) -> tuple[dict, PretrainConfig, nn.Module]:
    """A pre-training run (its folder or a checkpoint file) as ``(checkpoint, its settings,
    the model with its weights on the CPU)``: the one way a command reads a trained backbone."""
    ckpt = load(Path(run))
    return ckpt, config_from(PretrainConfig, saved_config(ckpt["config"])), model_from_checkpoint(ckpt)


def level_logits(output: "torch.Tensor | OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Either model's output as ``{level: logits}``."""
    if isinstance(output, torch.Tensor):
        return OrderedDict([(BACKBONE_LEVEL, output)])
    return output

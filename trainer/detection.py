"""Detectors assembled from torchvision's building blocks around a (jigsaw-)pretrained ResNet.

- ``fpn``: Faster R-CNN with FPN; ``mask``: Mask R-CNN with FPN (torchvision's own heads).
- ``c4``: the paper's original Faster R-CNN "C4": the ResNet up to ``layer3`` (stride 16)
  as the backbone with the RPN on it, RoIAlign 14x14, and ``layer4`` + average pooling as the
  box head, built from torchvision's ``FasterRCNN``, ``AnchorGenerator``,
  ``MultiScaleRoIAlign`` and ``FastRCNNPredictor``.

Transferred weights go with frozen BatchNorm (``FrozenBatchNorm2d``). ``norm="gn"`` is the
from-scratch baseline of the paper's Table 5 as He et al. 2019 ran it: GroupNorm in the
backbone, in the FPN and in a 4conv1fc box head (and the 4conv mask head), all trainable.
``box_head="2fc"`` with ``norm="gn"`` keeps GroupNorm in the backbone only, with the
detector and heads the transferred backbones get: the experiment grid's random-init control.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from jigsawdata.errors import InputError

from .checkpoint import FORMAT as PRETRAIN_FORMAT
from .checkpoint import checkpoint_file, load_tensors
from .config import ARCHS, DETECTORS, NORMS
from .model import build_backbone
from .tensorfile import SUFFIX, read_safetensors

log = logging.getLogger(__name__)


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    return nn.BatchNorm2d


def resnet_with_norm(arch: str, norm: str) -> nn.Module:
    """A randomly initialised torchvision ResNet with ``norm``: frozen_bn, bn or gn."""
    backbone = build_backbone(arch)
    if norm == "bn":
        return backbone
    # Rebuild with the requested normalisation: torchvision's ResNet takes a norm_layer.
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    layers = [len(backbone.layer1), len(backbone.layer2), len(backbone.layer3), len(backbone.layer4)]
    block = Bottleneck if isinstance(backbone.layer1[0], Bottleneck) else BasicBlock
    conv2 = backbone.layer1[0].conv2 if block is Bottleneck else None
    groups = conv2.groups if conv2 is not None else 1
    width = conv2.out_channels // groups if conv2 is not None and groups > 1 else 64
    return ResNet(block, layers, groups=groups, width_per_group=width, norm_layer=_norm_layer(norm))


def default_norm(init: str) -> str:
    """Frozen BatchNorm when weights are transferred, trainable BatchNorm from scratch."""
    return "bn" if init == "scratch" else "frozen_bn"


@dataclass(frozen=True)
class InitWeights:
    """What ``--init`` holds: ResNet weights named as torchvision's ResNet, and the FPN's
    (named as torchvision's ``FeaturePyramidNetwork``) when it was pre-trained too."""

    backbone: "OrderedDict[str, torch.Tensor]"
    fpn: "OrderedDict[str, torch.Tensor] | None" = None


def _split(state: dict, backbone: str, neck: str) -> InitWeights:
    """The tensors under the ``backbone`` and ``neck`` key prefixes, without them."""

    def part(prefix: str) -> OrderedDict:
        return OrderedDict((k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))

    return InitWeights(part(backbone), part(neck) or None)


_MMDET_NECK = re.compile(r"^neck\.(lateral|fpn)_convs\.(\d+)\.conv\.")


def _exported(state: dict) -> InitWeights:
    """A state dict as :mod:`.export` writes one: a ResNet's keys, or with an FPN torchvision's
    detector keys (``backbone.body.*``, ``backbone.fpn.*``) or MMDetection's (``backbone.*``,
    ``neck.lateral_convs.{i}.conv.*``, ``neck.fpn_convs.{i}.conv.*``)."""
    if any(k.startswith("backbone.body.") for k in state):
        _refuse_others(state, ("backbone.body.", "backbone.fpn."))
        return _split(state, "backbone.body.", "backbone.fpn.")
    if any(_MMDET_NECK.match(k) for k in state):
        _refuse_others(state, ("backbone.", "neck.lateral_convs.", "neck.fpn_convs."))
        neck = {
            _MMDET_NECK.sub(lambda m: f"{'inner' if m[1] == 'lateral' else 'layer'}_blocks.{m[2]}.0.", k): v
            for k, v in state.items()
            if k.startswith("neck.")
        }
        return InitWeights(_split(state, "backbone.", "-").backbone, OrderedDict(neck))
    return InitWeights(OrderedDict(state))


def _refuse_others(state: dict, prefixes: tuple[str, ...]) -> None:
    """A backbone + FPN file holds nothing else: a tensor under another name would be
    dropped, and the part it belonged to left random, without a word."""
    others = sorted(k for k in state if not k.startswith(prefixes))
    if others:
        raise InputError(
            f"--init holds tensors that are neither a backbone's nor an FPN's (e.g. {others[0]}, "
            f"{len(others)} in all): export writes {' and '.join(p + '*' for p in prefixes)} only"
        )


def read_init(init: str, arch: str) -> InitWeights | None:
    """The weights of ``scratch`` (None), ``imagenet:FILE`` (a torchvision ResNet state dict),
    a jigsaw run directory / checkpoint, or an exported file (:func:`_exported`)."""
    if init == "scratch":
        return None
    path = checkpoint_file(init.removeprefix("imagenet:"))
    if not path.is_file():
        raise InputError(f"--init {init}: no such file")
    obj = (
        read_safetensors(path)
        if path.suffix == SUFFIX
        else load_tensors(path, what=f"--init {init}: not a loadable weights file")
    )
    if isinstance(obj, dict) and obj.get("format") == PRETRAIN_FORMAT:
        if obj["arch"] != arch:
            raise InputError(f"--init {init} holds a {obj['arch']} backbone, not {arch} (use --arch {obj['arch']})")
        weights = _split(obj["model"], "backbone.", "fpn.")
    else:
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InputError(f"--init {init}: not a ResNet state dict")
        weights = _exported(obj)
    if init.startswith("imagenet:") and weights.fpn is not None:
        raise InputError(f"--init {init} holds a detector's FPN: imagenet:FILE is a ResNet state dict")
    return InitWeights(OrderedDict((k, v) for k, v in weights.backbone.items() if not k.startswith("fc.")), weights.fpn)


def _normalised(fpn_keys) -> bool:
    """Whether an FPN's tensors include normalisation layers (``inner_blocks.{i}.1.*``)."""
    return any(re.search(r"_blocks\.\d+\.1\.", k) for k in fpn_keys)


def _at_width(shape: torch.Size, key: str, width: int) -> tuple[int, ...]:
    """An FPN tensor's shape in a ``width``-channel pyramid on the same backbone."""
    dims = list(shape)
    dims[0] = width
    if key.startswith("layer_blocks.") and key.endswith(".weight"):
        dims[1] = width
    return tuple(dims)


def load_fpn_weights(fpn: nn.Module, weights: "OrderedDict[str, torch.Tensor]", init: str) -> None:
    """Every pre-trained FPN tensor into the detector's FPN, or a one-line refusal."""
    own = fpn.state_dict()
    if set(own) != set(weights):
        if _normalised(own) and not _normalised(weights):
            raise InputError(
                f"--init {init} holds an FPN without normalisation layers; this detector's FPN has them "
                "(--norm gn or --box-head 4conv1fc put GroupNorm in it): fine-tune with --box-head 2fc"
            )
        odd = sorted(set(own) ^ set(weights))
        raise InputError(
            f"--init {init} holds an FPN with other tensors than this detector's (e.g. {odd[0]}): it "
            "is not torchvision's FeaturePyramidNetwork on layer1..layer4"
        )
    wrong = [k for k, v in weights.items() if own[k].shape != v.shape]
    if wrong:
        width = int(weights["layer_blocks.0.0.weight"].shape[0])
        if width % 32 == 0 and all(tuple(weights[k].shape) == _at_width(own[k].shape, k, width) for k in own):
            raise InputError(
                f"--init {init} holds a {width}-channel FPN, not {own[wrong[0]].shape[0]}: fine-tune "
                f"with --fpn-channels {width}"
            )
        raise InputError(
            f"--init {init} holds an FPN whose {wrong[0]} is {tuple(weights[wrong[0]].shape)}, not "
            f"{tuple(own[wrong[0]].shape)}: not an FPN on this --arch"
        )
    fpn.load_state_dict(weights)


def load_backbone_weights(resnet: nn.Module, weights: "OrderedDict[str, torch.Tensor]", init: str) -> None:
    own = resnet.state_dict()
    if not set(own) & set(weights):
        raise InputError(
            f"--init {init}: none of its tensors is named as a ResNet's (e.g. {next(iter(weights), '-')}):"
            " not a file jigsawdata export writes, or a torchvision ResNet state dict"
        )
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked") and not k.startswith("fc.")]
    unused = [k for k in weights if k not in own and not k.endswith("num_batches_tracked")]
    if unused and all(k.endswith(("running_mean", "running_var")) for k in unused):
        raise InputError(
            f"--init {init} holds BatchNorm statistics that a GroupNorm backbone (--norm gn) would drop, "
            "and its BatchNorm scales would act as GroupNorm's: fine-tune with --norm frozen_bn or bn"
        )
    if unused:
        raise InputError(
            f"--init {init} holds tensors this backbone has no place for (e.g. {unused[0]}): wrong "
            "--arch, or not a ResNet state dict"
        )
    if wrong or missing:
        detail = f"shape mismatch in {wrong[:3]}" if wrong else f"missing {missing[:3]}"
        raise InputError(f"--init {init} does not fit this backbone ({detail}): wrong --arch?")
    resnet.load_state_dict(weights, strict=False)


class _Res5Head(nn.Module):
    """``layer4`` + global average pooling: the C4 box head, on 14x14 RoI features."""

    def __init__(self, layer4: nn.Module) -> None:
        super().__init__()
        self.layer4 = layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(x), 1), 1)


_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


def _freeze(resnet: nn.Module, trainable: int) -> None:
    """Train only the last ``trainable`` stages (torchvision's ``trainable_backbone_layers``
    rule, which its FPN builder applies too; 3 freezes the stem and layer1, as Detectron2's
    FREEZE_AT=2). For C4, whose layer4 is the box head, the same stages count."""
    train = _STAGES[:trainable] + (("bn1",) if trainable == 5 else ())
    for name, p in resnet.named_parameters():
        if not name.startswith(train):
            p.requires_grad_(False)


def _fpn_backbone(resnet: nn.Module, trainable: int, channels: int, norm_layer) -> BackboneWithFPN:
    """torchvision's ResNet-FPN (its layer freezing, its ``FeaturePyramidNetwork``) with
    ``channels`` in the pyramid instead of its fixed 256. torchvision's own builder does the
    freezing (rather than a copy of its rules here); its 256-channel pyramid is then replaced,
    a few milliseconds of construction."""
    backbone = _resnet_fpn_extractor(resnet, trainable, norm_layer=norm_layer)
    if channels == backbone.out_channels:
        return backbone
    stage2 = resnet.inplanes // 8
    return BackboneWithFPN(
        resnet,
        {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
        [stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)],
        channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm_layer,
    )


def build_detector(
    detector: str,
    arch: str,
    num_classes: int,
    *,
    init: str = "scratch",
    norm: str | None = None,
    box_head: str | None = None,
    fpn_channels: int = 256,
    trainable_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    rois_per_image: int = 512,
    load_init: bool = True,
) -> nn.Module:
    """``num_classes`` counts foreground classes; torchvision's heads add background.
    ``box_head`` (fpn, mask): ``2fc``, or ``4conv1fc`` with GroupNorm in it and in the FPN;
    by default 4conv1fc with GroupNorm, 2fc otherwise. ``load_init=False`` builds the network
    ``init`` gives without reading it (a resumed run's checkpoint holds the weights)."""
    if detector not in DETECTORS:
        raise InputError(f"--detector must be one of {DETECTORS}")
    if arch not in ARCHS:
        raise InputError(f"--arch must be one of {ARCHS}")
    weights = read_init(init, arch) if load_init else None
    norm = norm or default_norm(init)
    if norm not in NORMS:
        raise InputError(f"--norm must be one of {NORMS}")
    resnet = resnet_with_norm(arch, norm)
    if weights is not None:
        load_backbone_weights(resnet, weights.backbone, init)
    neck = weights.fpn if weights is not None else None
    if neck is not None and detector == "c4":
        log.warning("--init %s holds a pre-trained FPN; the c4 detector has none, so only its backbone is used", init)
    trainable = trainable_layers if trainable_layers is not None else 3 if init != "scratch" else 5
    _freeze(resnet, trainable)
    sizes = dict(min_size=min_size, max_size=max_size, box_batch_size_per_image=rois_per_image)
    if detector in ("fpn", "mask"):
        if (box_head or ("4conv1fc" if norm == "gn" else "2fc")) == "4conv1fc":
            model = _gn_fpn_detector(detector, resnet, trainable, fpn_channels, num_classes, sizes)
        else:
            cls = MaskRCNN if detector == "mask" else FasterRCNN
            model = cls(
                _fpn_backbone(resnet, trainable, fpn_channels, norm_layer=None), num_classes=num_classes + 1, **sizes
            )
        if neck is not None:
            load_fpn_weights(model.backbone.fpn, neck, init)
        return model
    body = nn.Sequential(
        OrderedDict(
            (name, getattr(resnet, name)) for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
        )
    )
    last = resnet.layer3[-1]
    body.out_channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
    head_channels = resnet.fc.in_features
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    return FasterRCNN(
        body,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0),
        box_head=_Res5Head(resnet.layer4),
        box_predictor=FastRCNNPredictor(head_channels, num_classes + 1),
        **sizes,
    )


def _gn_fpn_detector(
    detector: str, resnet: nn.Module, trainable: int, channels: int, num_classes: int, sizes: dict
) -> nn.Module:
    """He et al. 2019's scratch setting: GN in the FPN and a 4conv1fc GN box head (4conv GN
    mask head for Mask R-CNN), as torchvision's ``fasterrcnn_resnet50_fpn_v2`` builds them;
    the head's convolutions as wide as the pyramid (256 there)."""
    gn = _norm_layer("gn")
    backbone = _fpn_backbone(resnet, trainable, channels, norm_layer=gn)
    heads = {
        "box_head": FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [1024], norm_layer=gn),
        "box_predictor": FastRCNNPredictor(1024, num_classes + 1),
    }
    if detector == "mask":
        heads["mask_head"] = MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=gn)
        heads["mask_predictor"] = MaskRCNNPredictor(channels, 256, num_classes + 1)
        return MaskRCNN(backbone, num_classes=None, **heads, **sizes)
    return FasterRCNN(backbone, num_classes=None, **heads, **sizes)

"""FPN-aware pre-training (``--neck fpn``): the pyramid model, each level's ERF and Eq. 2
weights, the trainer on every level, export and fine-tuning with the pre-trained FPN."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.experiments.config import FORMAT, ExperimentConfig, arms, preset
from jigsawdata.experiments.grid import claim_experiment_dir, pretrain_config
from jigsawdata.pipelines.template import Template
from jigsawdata.trainer import checkpoint as ckpt_io
from jigsawdata.trainer.checkpoint import load
from jigsawdata.trainer.config import PretrainConfig
from jigsawdata.trainer.detection import build_detector
from jigsawdata.trainer.erf import (
    _receptive_fields,
    erf_weights,
    lattice_cells,
    level_receptive_fields,
    level_weights,
    translated_shares,
)
from jigsawdata.trainer.export import detectron2_config, export
from jigsawdata.trainer.model import PyramidDenseClassifier
from jigsawdata.trainer.pretrain import Trainer

SMALL = Template(canvas=64, split=32)


def _pyramid(channels: int = 32) -> PyramidDenseClassifier:
    torch.manual_seed(0)
    return PyramidDenseClassifier("resnet18", 5, channels)


def test_every_level_gives_a_logit_map_at_its_stride():
    out = _pyramid()(torch.randn(2, 3, 128, 128))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "P2": (2, 5, 32, 32),
        "P3": (2, 5, 16, 16),
        "P4": (2, 5, 8, 8),
        "P5": (2, 5, 4, 4),
    }


@pytest.mark.slow
def test_the_neck_has_the_keys_and_shapes_of_torchvisions_fpn_detector():
    model = _pyramid(64)
    detector = build_detector("fpn", "resnet18", 3, fpn_channels=64)
    ours = {k.removeprefix("fpn."): tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("fpn.")}
    theirs = {k: tuple(v.shape) for k, v in detector.backbone.fpn.state_dict().items()}
    assert ours == theirs and len(ours) == 16  # 4 lateral + 4 output convolutions, weight and bias


def test_lattice_cells_are_the_middle_of_each_block():
    assert lattice_cells(8, 4).tolist() == [2 * 8 + 2, 2 * 8 + 6, 6 * 8 + 2, 6 * 8 + 6]
    assert lattice_cells(4, 1).tolist() == list(range(16))


def test_translated_shares_equal_shifting_each_map_by_hand():
    """Each cell's shares are those of its lattice cell's ERF moved by the cells' offset in
    pixels, with what leaves the canvas dropped: built here map by map."""
    torch.manual_seed(1)
    canvas, stride, step = 32, 4, 4  # P2 of a 32-pixel canvas: an 8 x 8 grid, a 2 x 2 lattice
    template = Template(canvas=canvas, split=12, stride=16)
    masks = torch.from_numpy(template.masks())
    maps = torch.rand(4, canvas, canvas)
    got = translated_shares(maps, masks, stride, step)
    grid = canvas // stride
    for a in range(grid):
        for b in range(grid):
            rep = (a // step) * 2 + b // step
            dy, dx = (a % step - step // 2) * stride, (b % step - step // 2) * stride
            moved = torch.zeros(canvas, canvas)
            src = maps[rep]
            ys, xs = slice(max(0, dy), canvas + min(0, dy)), slice(max(0, dx), canvas + min(0, dx))
            moved[ys, xs] = src[max(0, -dy) : canvas - max(0, dy), max(0, -dx) : canvas - max(0, dx)]
            expected = torch.einsum("hw,rhw->r", moved, masks)
            assert torch.allclose(got[a * grid + b], expected, atol=1e-4), (a, b)


@pytest.mark.slow
def test_each_levels_weights_are_eq2_and_sum_to_one_per_cell():
    model = _pyramid()
    images = torch.randn(2, 3, 64, 64)
    maps = level_receptive_fields(model, images, SMALL)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "P2": (4, 64, 64),
        "P3": (4, 64, 64),
        "P4": (4, 64, 64),
        "P5": (4, 64, 64),
    }  # one per 32 px cell
    weights = level_weights(maps, SMALL, model.strides, tau=0.7)
    for name, stride in model.strides.items():
        level = replace(SMALL, stride=stride)
        w = weights[name]
        assert w.shape == (4, level.grid, level.grid) and (w >= 0).all()
        assert torch.allclose(w.sum(dim=0), torch.ones(level.grid, level.grid), atol=1e-5), name
        own = torch.from_numpy(level.feature_region_map())
        assert (w.gather(0, own[None]) >= 0.7 - 1e-6).all(), name  # the tau floor of the cell's own region


@pytest.mark.slow
def test_the_stride_32_level_is_exact_and_finer_levels_stay_close_to_it():
    """P5 gets every cell's own ERF; P4, P3 and P2 translate their lattice cells'. Against
    one ERF per cell on a 64-pixel canvas, where every cell is near the border that
    translation cannot know, it moves a weight by about 0.02 on average and 0.072 to 0.086
    at most (random weights, three seeds); the bounds leave room for other seeds only."""
    model = _pyramid()
    images = torch.randn(2, 3, 64, 64)
    weights = level_weights(level_receptive_fields(model, images, SMALL), SMALL, model.strides, tau=0.7)
    exact = _receptive_fields(model, images, model.levels, {"P5": None, "P4": None, "P3": None, "P2": None}, chunk=8)
    assert torch.equal(weights["P5"], erf_weights(exact["P5"], replace(SMALL, stride=32), 0.7))
    for name, stride in (("P4", 16), ("P3", 8), ("P2", 4)):
        error = (weights[name] - erf_weights(exact[name], replace(SMALL, stride=stride), 0.7)).abs()
        assert error.mean() < 0.03 and error.max() < 0.12, (name, float(error.mean()), float(error.max()))


# ------------------------------------------------------------------ training


def _cfg(shards, out, **kw) -> PretrainConfig:
    values = dict(
        shards=str(shards),
        out=str(out),
        arch="resnet18",
        neck="fpn",
        fpn_channels=32,
        iterations=12,
        batch=4,
        warmup=2,
        canvas=128,
        template_split=32,
        checkpoint_every=4,
        erf_every=6,
        erf_images=2,
        workers=2,
        log_every=2,
        device="cpu",
    )  # exact resume is asserted bit for bit: CPU kernels
    return PretrainConfig(**{**values, **kw})


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(built_real, tmp_path):
    """DALI (CPU) pipeline, ERF weights on every level refreshed twice: a run stopped after
    iteration 6 and resumed from its iteration-4 checkpoint ends bit-identical."""
    Trainer(_cfg(built_real, tmp_path / "straight")).train()

    def stop(m: dict) -> None:
        if m["iteration"] == 6:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(_cfg(built_real, tmp_path / "cut"), on_log=stop).train()
    assert load(tmp_path / "cut")["iteration"] == 4
    Trainer(_cfg(built_real, tmp_path / "cut"), resume=True).train()
    a, b = load(tmp_path / "straight"), load(tmp_path / "cut")
    assert a["iteration"] == b["iteration"] == 12
    assert any(k.startswith("fpn.inner_blocks.") for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert list(a["erf_weights"]) == ["P2", "P3", "P4", "P5"]
    assert {k: tuple(v.shape) for k, v in a["erf_weights"].items()} == {
        "P2": (4, 32, 32),
        "P3": (4, 16, 16),
        "P4": (4, 8, 8),
        "P5": (4, 4, 4),
    }
    assert all(torch.equal(a["erf_weights"][k], b["erf_weights"][k]) for k in a["erf_weights"])
    with pytest.raises(InputError, match="settings differ from the saved run in fpn_channels, neck"):
        Trainer(_cfg(built_real, tmp_path / "cut", neck="none", fpn_channels=256), resume=True)


@pytest.mark.parametrize("loss", ["erf", "blockwise", "global"])
@pytest.mark.slow
def test_every_loss_trains_the_neck_with_validation_per_level(built_real, tmp_path, loss):
    seen = []
    trainer = Trainer(
        _cfg(
            built_real,
            tmp_path / loss,
            loss=loss,
            iterations=2,
            pipeline="reference",
            workers=0,
            val_shards=str(built_real),
            val_every=2,
            val_images=4,
        ),
        on_validate=seen.append,
    )
    before = trainer.model.fpn.layer_blocks[0][0].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.fpn.layer_blocks[0][0].weight)  # P2's own conv learned
    assert {"val_accuracy", "val_accuracy_P2", "val_accuracy_P3", "val_accuracy_P4", "val_accuracy_P5"} <= set(seen[-1])
    assert set(trainer.weights) == {"P2", "P3", "P4", "P5"}
    if loss != "erf":  # no ERF: each cell carries its own region's label only
        assert all(
            torch.equal(w.sum(0), torch.ones_like(w[0])) and set(w.unique().tolist()) == {0.0, 1.0}
            for w in trainer.weights.values()
        )


def test_pyramid_settings_are_checked():
    with pytest.raises(InputError, match="--fpn-channels is for --neck fpn"):
        PretrainConfig(shards="s", out="o", fpn_channels=64)
    with pytest.raises(InputError, match="--neck"):
        PretrainConfig(shards="s", out="o", neck="bifpn")
    with pytest.raises(InputError, match="--fpn-channels 48 is not a multiple of 32: fine-tuning's"):
        PretrainConfig(shards="s", out="o", neck="fpn", fpn_channels=48)


@pytest.mark.slow
def test_a_run_saved_before_the_neck_existed_resumes_as_backbone_only(built_real, tmp_path):
    """Its config has no neck and its ERF weights are one tensor: resumed as the backbone-only
    run it was, and refused in one line as an FPN run."""
    run = tmp_path / "old"
    Trainer(_cfg(built_real, run, neck="none", fpn_channels=256, iterations=1, pipeline="reference", workers=0)).train()
    ckpt = load(run)
    for key in ("neck", "fpn_channels"):
        del ckpt["config"][key]
    ckpt["erf_weights"] = ckpt["erf_weights"]["C5"]
    ckpt_io.save_atomic(ckpt, run / "checkpoint.pt")
    old = Trainer(
        _cfg(built_real, run, neck="none", fpn_channels=256, iterations=1, pipeline="reference", workers=0), resume=True
    )
    assert list(old.weights) == ["C5"] and torch.equal(old.weights["C5"], ckpt["erf_weights"])
    with pytest.raises(InputError, match="settings differ from the saved run in fpn_channels, neck"):
        Trainer(_cfg(built_real, run, iterations=1, pipeline="reference", workers=0), resume=True)


# ------------------------------------------------------------------ export and fine-tuning


def _pyramid_checkpoint(tmp_path, channels: int = 64):
    model = _pyramid(channels)
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    ckpt_io.save_atomic(
        {
            "format": ckpt_io.FORMAT,
            "arch": "resnet18",
            "iteration": 3,
            "class_names": ["a"] * 4,
            "config": {"neck": "fpn", "fpn_channels": channels},
            "model": model.state_dict(),
        },
        path,
    )
    return path, model


def _assert_loaded(detector, model) -> None:
    fpn = detector.backbone.fpn.state_dict()
    for key, value in model.fpn.state_dict().items():
        assert torch.equal(fpn[key], value), key  # every FPN tensor loaded: none left random
    assert torch.equal(detector.backbone.body.layer3[1].conv2.weight, model.backbone.layer3[1].conv2.weight)


@pytest.mark.parametrize("detector", ["fpn", "mask"])
@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_backbone_and_fpn(tmp_path, detector):
    path, model = _pyramid_checkpoint(tmp_path)
    _assert_loaded(build_detector(detector, "resnet18", 3, init=str(path.parent), fpn_channels=64), model)
    for fmt in ("torchvision", "mmdet"):
        export(path, fmt, tmp_path / f"{fmt}.pth")
        _assert_loaded(
            build_detector(detector, "resnet18", 3, init=str(tmp_path / f"{fmt}.pth"), fpn_channels=64), model
        )


@pytest.mark.slow
def test_a_neck_that_does_not_fit_is_refused_in_one_line(tmp_path):
    path, _ = _pyramid_checkpoint(tmp_path)
    with pytest.raises(InputError, match="holds a 64-channel FPN, not 256: fine-tune with --fpn-channels 64"):
        build_detector("fpn", "resnet18", 3, init=str(path))
    with pytest.raises(InputError, match="FPN without normalisation layers.*--box-head 2fc"):
        build_detector("fpn", "resnet18", 3, init=str(path), fpn_channels=64, box_head="4conv1fc")
    export(path, "torchvision", tmp_path / "tv.pth")
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    state["backbone.fpn.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(InputError, match="an FPN with other tensors than this detector's \\(e.g. extra.weight\\)"):
        build_detector("fpn", "resnet18", 3, init=str(tmp_path / "odd.pth"), fpn_channels=64)
    with pytest.raises(InputError, match="holds a detector's FPN: imagenet:FILE is a ResNet state dict"):
        build_detector("fpn", "resnet18", 3, init=f"imagenet:{tmp_path / 'tv.pth'}", fpn_channels=64)
    # Renamed FPN tensors would be dropped and the FPN left random: refused.
    renamed = {k.replace("backbone.fpn.", "neck."): v for k, v in state.items() if k != "backbone.fpn.extra.weight"}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(InputError, match="neither a backbone's nor an FPN's \\(e.g. neck.inner_blocks.0.0.bias, 16"):
        build_detector("fpn", "resnet18", 3, init=str(tmp_path / "renamed.pth"), fpn_channels=64)
    # A tensor of the wrong shape is named, not taken for another width.
    bent = {k: v for k, v in state.items() if k != "backbone.fpn.extra.weight"}
    bent["backbone.fpn.layer_blocks.1.0.bias"] = torch.zeros(33)
    torch.save(bent, tmp_path / "bent.pth")
    with pytest.raises(InputError, match="FPN whose layer_blocks.1.0.bias is \\(33,\\), not \\(64,\\)"):
        build_detector("fpn", "resnet18", 3, init=str(tmp_path / "bent.pth"), fpn_channels=64)
    # BatchNorm weights do not go into a GroupNorm backbone.
    with pytest.raises(InputError, match="BatchNorm statistics that a GroupNorm backbone \\(--norm gn\\) would drop"):
        build_detector("fpn", "resnet18", 3, init=str(path), fpn_channels=64, norm="gn", box_head="2fc")


@pytest.mark.slow
def test_exports_name_the_fpn_as_each_framework_does(tmp_path):
    path, model = _pyramid_checkpoint(tmp_path)
    done = export(path, "torchvision", tmp_path / "tv.pth")
    assert done.neck
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    theirs = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None), num_classes=3)
    theirs.backbone.fpn = torchvision.ops.FeaturePyramidNetwork(
        [64, 128, 256, 512], 64, extra_blocks=theirs.backbone.fpn.extra_blocks
    )
    result = theirs.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if not k.startswith(("rpn.", "roi_heads."))]
    export(path, "detectron2", tmp_path / "d2.pkl")
    d2 = pickle.loads((tmp_path / "d2.pkl").read_bytes())["model"]
    assert (d2["fpn_lateral2.weight"] == model.fpn.inner_blocks[0][0].weight.detach().numpy()).all()
    assert (d2["fpn_output5.bias"] == model.fpn.layer_blocks[3][0].bias.detach().numpy()).all()
    assert "stem.conv1.weight" in d2 and not any(k.startswith("stem.fpn") for k in d2)
    assert detectron2_config("resnet18", tmp_path / "d2.pkl", 64)["MODEL"]["FPN"] == {"OUT_CHANNELS": 64}
    assert "FPN" not in detectron2_config("resnet18", tmp_path / "d2.pkl")["MODEL"]
    alone = export(path, "torchvision", tmp_path / "alone.pth", backbone_only=True)
    assert not alone.neck
    result = torchvision.models.resnet18().load_state_dict(
        torch.load(tmp_path / "alone.pth", weights_only=True), strict=False
    )
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    export(path, "mmdet", tmp_path / "mm.pth")
    mm = torch.load(tmp_path / "mm.pth", weights_only=True)
    assert mm["meta"]["neck"] == "fpn" and "backbone.layer1.0.conv1.weight" in mm["state_dict"]
    assert torch.equal(mm["state_dict"]["neck.fpn_convs.1.conv.weight"], model.fpn.layer_blocks[1][0].weight)
    assert torch.equal(mm["state_dict"]["neck.lateral_convs.3.conv.bias"], model.fpn.inner_blocks[3][0].bias)


@pytest.mark.slow
def test_the_erf_command_draws_a_pyramid_runs_p5(built_real, tmp_path):
    Trainer(_cfg(built_real, tmp_path / "run", iterations=1, pipeline="reference", workers=0)).train()
    result = CliRunner().invoke(
        main, ["erf", str(tmp_path / "run"), "--out", str(tmp_path / "erf.png"), "--images", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "erf.png").stat().st_size > 0


# ------------------------------------------------------------------ the experiment arm


def test_the_fpn_neck_arm_pretrains_the_detectors_pyramid(tmp_path):
    cfg = ExperimentConfig(
        out=str(tmp_path), detector="fpn", arch="resnet18", fpn_neck=True, finetune={"fpn_channels": 64}
    )
    arm = {a.name: a for a in arms(cfg)}["fpn-neck"]
    run = pretrain_config(cfg, arm, 0, "shards", "val", tmp_path / "run")
    assert (run.neck, run.fpn_channels, run.loss) == ("fpn", 64, "erf")
    assert pretrain_config(cfg, {a.name: a for a in arms(cfg)}["erf"], 0, "s", "v", tmp_path).neck == "none"
    with pytest.raises(InputError, match="--fpn-neck pre-trains an FPN for the fpn and mask detectors"):
        ExperimentConfig(out=str(tmp_path), detector="c4", fpn_neck=True)


def test_a_grid_is_continued_with_the_fpn_neck_arm_added(tmp_path):
    """A grid saved before the option existed (no ``fpn_neck`` in its config) is this grid's
    own, with the arm added or not: the arm changes no other arm's results."""
    grid = tmp_path / "grid"
    grid.mkdir()
    saved = json.loads(json.dumps(preset("tiny", str(grid)).__dict__, default=list))
    del saved["fpn_neck"]
    (grid / "config.json").write_text(json.dumps({"format": FORMAT, "config": saved}))
    assert claim_experiment_dir(grid, preset("tiny", str(grid))) is False
    assert claim_experiment_dir(grid, preset("tiny", str(grid), fpn_neck=True)) is False

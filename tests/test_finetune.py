"""Detection fine-tuning and COCO evaluation, on CPU with small images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.trainer import checkpoint as ckpt_io
from jigsawdata.trainer.coco_data import CocoDetection, collate
from jigsawdata.trainer.detection import build_detector
from jigsawdata.trainer.evaluate import METRICS, coco_eval
from jigsawdata.trainer.finetune import evaluate, lr_factor, schedule_epochs
from jigsawdata.trainer.model import DenseClassifier


@pytest.fixture(scope="module")
def jigsaw_ckpt(tmp_path_factory):
    torch.manual_seed(3)
    model = DenseClassifier("resnet18", 81)
    path = tmp_path_factory.mktemp("jig") / "checkpoint.pt"
    ckpt_io.save_atomic(
        {"format": ckpt_io.FORMAT, "arch": "resnet18", "iteration": 1, "model": model.state_dict()}, path
    )
    return path, model


@pytest.fixture(scope="module")
def train_set(real_coco):
    return CocoDetection(
        real_coco / "annotations" / "instances_train2017.json",
        real_coco / "train2017",
        train=True,
        masks=True,
        max_images=2,
    )


def _body(model, detector):
    return model.backbone if detector == "c4" else model.backbone.body


@pytest.mark.parametrize("detector", ["c4", "fpn", "mask"])
@pytest.mark.slow
def test_detector_takes_the_jigsaw_backbone_and_trains_a_step(detector, jigsaw_ckpt, train_set):
    path, source = jigsaw_ckpt
    model = build_detector(detector, "resnet18", 80, init=str(path), min_size=128, max_size=160, rois_per_image=32)
    body = _body(model, detector)
    assert torch.equal(body.layer2[0].conv1.weight, source.backbone.layer2[0].conv1.weight)
    assert torch.equal(body.layer3[1].bn2.running_var, source.backbone.layer3[1].bn2.running_var)
    assert isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    fresh = build_detector(detector, "resnet18", 80, min_size=128, max_size=160)
    assert not torch.equal(_body(fresh, detector).layer2[0].conv1.weight, source.backbone.layer2[0].conv1.weight)
    images, targets = collate([train_set[0], train_set[1]])
    if detector != "mask":
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    model.train()
    losses = model(list(images), list(targets))
    assert ("loss_mask" in losses) == (detector == "mask")
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.slow
def test_c4_is_stride_16_with_layer4_head(jigsaw_ckpt):
    model = build_detector("c4", "resnet18", 80, init=str(jigsaw_ckpt[0]))
    assert model.backbone(torch.zeros(1, 3, 64, 96)).shape[-2:] == (4, 6)
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    assert model.roi_heads.box_head.layer4 is not None


@pytest.mark.parametrize("detector", ["fpn", "mask"])
@pytest.mark.slow
def test_scratch_with_group_norm_everywhere(detector, train_set):
    """He et al. 2019: GN in the backbone, the FPN and a 4conv1fc box head, all trainable."""
    model = build_detector(detector, "resnet18", 80, norm="gn", min_size=96, max_size=128, rois_per_image=16)
    assert isinstance(model.backbone.body.layer1[0].bn1, nn.GroupNorm)
    fpn_norms = [m for m in model.backbone.fpn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(fpn_norms) == 8  # a GN after each of the 4 lateral and 4 output convolutions
    head = model.roi_heads.box_head
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 4 and len(linears) == 1
    assert sum(isinstance(m, nn.GroupNorm) for m in head.modules()) == 4
    if detector == "mask":
        assert sum(isinstance(m, nn.GroupNorm) for m in model.roi_heads.mask_head.modules()) == 4
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    images, targets = collate([train_set[0], train_set[1]])
    if detector != "mask":
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    model.train()
    losses = model(list(images), list(targets))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None


@pytest.mark.slow
def test_random_init_control_has_gn_in_the_backbone_only_and_the_2fc_head(train_set):
    """The experiment grid's control: the transferred arms' detector, with GroupNorm where
    there are no statistics to freeze."""
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    model = build_detector(
        "fpn", "resnet18", 80, norm="gn", box_head="2fc", fpn_channels=64, min_size=96, max_size=128, rois_per_image=16
    )
    assert isinstance(model.backbone.body.layer1[0].bn1, nn.GroupNorm)
    assert not any(isinstance(m, nn.GroupNorm) for m in model.backbone.fpn.modules())
    assert isinstance(model.roi_heads.box_head, TwoMLPHead) and model.backbone.out_channels == 64
    assert all(p.requires_grad for p in model.parameters())
    images, targets = collate([train_set[0], train_set[1]])
    model.train()
    losses = model(list(images), [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("box_head", ["2fc", "4conv1fc"])
@pytest.mark.slow
def test_fpn_channels_size_the_pyramid_and_its_heads(box_head):
    model = build_detector("fpn", "resnet18", 80, box_head=box_head, fpn_channels=96)
    out = model.backbone(torch.zeros(1, 3, 64, 64))
    assert {v.shape[1] for v in out.values()} == {96} and model.rpn.head.conv[0][0].in_channels == 96
    convs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.in_channels == c.out_channels == 96 for c in convs) and len(convs) == (
        4 if box_head == "4conv1fc" else 0
    )
    stock = build_detector("fpn", "resnet18", 80)
    assert {v.shape[1] for v in stock.backbone(torch.zeros(1, 3, 64, 64)).values()} == {256}


@pytest.mark.parametrize("detector", ["c4", "fpn"])
@pytest.mark.slow
def test_trainable_layers_choose_the_stages_that_learn(detector, jigsaw_ckpt):
    def learning(model) -> set[str]:
        body = _body(model, detector)
        stages = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
        if detector == "c4":
            stages |= {"layer4"} if any(p.requires_grad for p in model.roi_heads.box_head.parameters()) else set()
        return stages

    transferred = build_detector(detector, "resnet18", 80, init=str(jigsaw_ckpt[0]))
    assert learning(transferred) == {"layer2", "layer3", "layer4"}  # stem and layer1 frozen by default
    everything = build_detector(detector, "resnet18", 80, init=str(jigsaw_ckpt[0]), trainable_layers=5)
    assert learning(everything) == {"conv1", "layer1", "layer2", "layer3", "layer4"}  # frozen BN has no parameters
    assert learning(build_detector(detector, "resnet18", 80, init=str(jigsaw_ckpt[0]), trainable_layers=1)) == {
        "layer4"
    }


def test_box_head_and_fpn_channels_are_checked():
    from jigsawdata.trainer.config import FinetuneConfig

    with pytest.raises(InputError, match="--box-head is for the fpn and mask detectors"):
        FinetuneConfig(coco="c", out="o", detector="c4", box_head="2fc")
    with pytest.raises(InputError, match="--fpn-channels 48 is not a multiple of 32"):
        FinetuneConfig(coco="c", out="o", detector="fpn", fpn_channels=48)
    with pytest.raises(InputError, match="--fpn-channels is for the fpn and mask detectors"):
        FinetuneConfig(coco="c", out="o", detector="c4", fpn_channels=64)
    with pytest.raises(InputError, match="--trainable-layers 2 would freeze randomly initialised stages"):
        FinetuneConfig(coco="c", out="o", detector="fpn", init="scratch", trainable_layers=2)
    assert FinetuneConfig(coco="c", out="o", init="r.pth", trainable_layers=2).trainable_layers == 2


@pytest.mark.slow
def test_imagenet_weights_from_a_local_file(tmp_path):
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    model = build_detector("fpn", "resnet18", 80, init=f"imagenet:{tmp_path / 'r18.pth'}")
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


@pytest.mark.slow
def test_bad_init_is_a_clear_error(tmp_path, jigsaw_ckpt):
    with pytest.raises(InputError, match="no such file"):
        build_detector("fpn", "resnet18", 80, init=str(tmp_path / "missing.pth"))
    with pytest.raises(InputError, match="holds a resnet18 backbone, not resnet50"):
        build_detector("fpn", "resnet50", 80, init=str(jigsaw_ckpt[0]))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(InputError, match="does not fit this backbone .* wrong --arch"):
        build_detector("c4", "resnet50", 80, init=f"imagenet:{tmp_path / 'r18.pth'}")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a loadable weights file"):
        build_detector("c4", "resnet18", 80, init=str(tmp_path / "junk.pth"))


def test_schedule_lengths():
    assert schedule_epochs("2x") == (26, (18, 24))
    assert schedule_epochs("3x") == (39, (27, 36))
    assert schedule_epochs("1x", epochs=20) == (20, (14, 18))  # the drops at 9/13 and 12/13
    with pytest.raises(InputError, match="--schedule"):
        schedule_epochs("two")
    with pytest.raises(InputError, match="--epochs"):
        schedule_epochs("1x", epochs=0)


def test_schedule_factors():
    epochs, milestones = schedule_epochs("1x")
    assert (epochs, milestones) == (13, (9, 12))
    assert lr_factor(0, 0, 500, milestones) == pytest.approx(0.001)
    assert lr_factor(500, 0, 500, milestones) == 1.0
    assert lr_factor(10_000, 9, 500, milestones) == pytest.approx(0.1)
    assert lr_factor(10_000, 12, 500, milestones) == pytest.approx(0.01)


@pytest.mark.slow
def test_ground_truth_as_predictions_scores_ap_one(real_coco):
    ds = CocoDetection(real_coco / "annotations" / "instances_train2017.json", real_coco / "train2017", train=False)
    anns = [a for a in ds.coco.dataset["annotations"] if not a["iscrowd"]]
    boxes = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in anns
    ]
    metrics = coco_eval(ds.coco, boxes, "bbox")
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    segms = []
    for a in anns:
        rle = ds.coco.annToRLE(a)
        segms.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "score": 1.0,
                "segmentation": {
                    "size": rle["size"],
                    "counts": rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"],
                },
            }
        )
    assert coco_eval(ds.coco, segms, "segm")["AP"] == pytest.approx(1.0)
    shifted = [dict(b, bbox=[b["bbox"][0] + b["bbox"][2], *b["bbox"][1:]]) for b in boxes]
    assert coco_eval(ds.coco, shifted, "bbox")["AP"] < 0.2


def test_a_model_that_detects_nothing_scores_as_cocoeval_scores_a_useless_one():
    from pycocotools.coco import COCO

    from jigsawdata.trainer.evaluate import format_table

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 50, 50], "area": 2500, "iscrowd": 0},
        ],
    }
    gt.createIndex()
    useless = [{"image_id": 1, "category_id": 1, "bbox": [150, 150, 5, 5], "score": 0.5}]
    nothing = coco_eval(gt, [], "bbox")
    assert (
        nothing
        == coco_eval(gt, useless, "bbox")
        == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": -1.0}
    )  # no large object to find
    assert format_table({"bbox": nothing}).splitlines()[1].split() == ["bbox", "0.0", "0.0", "0.0", "0.0", "0.0", "-"]


@pytest.mark.slow
def test_evaluation_writes_a_cocoeval_table(real_coco, jigsaw_ckpt, tmp_path):
    ds = CocoDetection(
        real_coco / "annotations" / "instances_train2017.json",
        real_coco / "train2017",
        train=False,
        masks=True,
        max_images=3,
    )
    model = build_detector("mask", "resnet18", 80, init=str(jigsaw_ckpt[0]), min_size=128, max_size=160)
    model.roi_heads.score_thresh = 0.0  # an untrained head scores every class near 1/81
    seen = []
    metrics = evaluate(
        model, ds, torch.device("cpu"), tmp_path, workers=0, progress=lambda n, total: seen.append((n, total))
    )
    assert sum(n for n, _ in seen) == 3 and {total for _, total in seen} == {3}
    assert set(metrics) == {"bbox", "segm"} and all(set(m) == set(METRICS) for m in metrics.values())
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == {**metrics, "evaluated": {"images": 3}}
    preds = json.loads((tmp_path / "predictions_bbox.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score"} <= set(preds[0])
    assert {p["image_id"] for p in preds} <= set(ds.ids)
    assert "AP50" in (tmp_path / "eval.txt").read_text()


def _tiny_finetune(real_coco: Path, out: Path, init: Path, images: int) -> list[str]:
    """The command line of a fine-tune small enough for a test: a ResNet-18 FPN detector on the
    first ``images`` images at 96-128 px, on the CPU, logging every iteration."""
    return [
        "finetune",
        "--coco",
        str(real_coco),
        "--out",
        str(out),
        "--init",
        str(init),
        "--detector",
        "fpn",
        "--arch",
        "resnet18",
        "--batch",
        "2",
        "--min-size",
        "96",
        "--max-size",
        "128",
        "--max-images",
        str(images),
        "--workers",
        "0",
        "--log-every",
        "1",
        "--device",
        "cpu",
    ]


@pytest.mark.slow
def test_cli_finetune_resume_and_evaluate(real_coco, jigsaw_ckpt, tmp_path):
    out = tmp_path / "ft"
    args = _tiny_finetune(real_coco, out, jigsaw_ckpt[0], images=4)
    result = CliRunner().invoke(main, [*args, "--max-iters", "1"])
    assert result.exit_code == 0, result.output
    assert "AP50" in result.output and (out / "predictions_bbox.json").is_file() and (out / "metrics.png").is_file()
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert (resolved["device"], resolved["precision"], resolved["world_size"]) == ("cpu", "fp32", 1)
    ann = real_coco / "annotations" / "instances_train2017.json"
    assert resolved["provenance"]["annotations"] == {
        "location": str(ann),
        "sha256": hashlib.sha256(ann.read_bytes()).hexdigest(),
    }
    assert resolved["provenance"]["init"]["sha256"] == hashlib.sha256(Path(jigsaw_ckpt[0]).read_bytes()).hexdigest()
    assert resolved["versions"]["torch"] == torch.__version__ and resolved["versions"]["jigsawdata"]
    assert CliRunner().invoke(main, [*args, "--max-iters", "1"]).exit_code == 1  # run exists, no --resume
    first = torch.load(out / "checkpoint.pt", weights_only=True)["train_device_seconds"]
    changed = CliRunner().invoke(main, [*args, "--max-iters", "2", "--resume", "--lr", "0.05", "--seed", "3"])
    assert changed.exit_code == 1 and "settings differ from the saved run in lr, seed" in changed.output, changed.output
    result = CliRunner().invoke(main, [*args, "--max-iters", "2", "--resume"])
    assert result.exit_code == 0, result.output
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert resumed["iteration"] == 2 and resumed["train_device_seconds"] > first > 0  # the clock continues
    own = json.loads((out / "eval.json").read_text())
    assert own["evaluated"] == {
        "annotations": str((real_coco / "annotations" / "instances_train2017.json").resolve()),
        "image_dir": str((real_coco / "train2017").resolve()),
        "max_images": 4,
        "images": 4,
        "checkpoint": str((out / "checkpoint.pt").resolve()),
        "epoch": 1,  # two iterations of two images: the first epoch is complete
        "iteration": 2,
    }
    # a subset is its own file: the run's figures stay
    result = CliRunner().invoke(main, ["evaluate", str(out), "--max-images", "2"])
    assert result.exit_code == 0 and "bbox" in result.output
    subset = json.loads((out / "eval-train2017-first2.json").read_text())
    assert subset["evaluated"]["images"] == 2 and subset["evaluated"]["iteration"] == 2
    assert (out / "predictions_bbox-train2017-first2.json").is_file() and (out / "eval-train2017-first2.txt").is_file()
    assert json.loads((out / "eval.json").read_text()) == own


@pytest.mark.slow
def test_logged_losses_are_means_over_the_steps_since_the_last_record(real_coco, jigsaw_ckpt, tmp_path, monkeypatch):
    from jigsawdata.trainer.finetune import FinetuneConfig, Finetuner

    scripted = iter(
        [
            {"loss": 1.0, "loss_a": 0.5},
            {"loss": 3.0, "loss_a": 1.5},
            {"loss": 10.0, "loss_a": 2.0},
            {"loss": 20.0, "loss_a": 4.0},
            {"loss": 7.0, "loss_a": 1.0},
        ]
    )
    monkeypatch.setattr(Finetuner, "step", lambda self, images, targets, factor: next(scripted))
    cfg = FinetuneConfig(
        coco=str(real_coco),
        out=str(tmp_path / "ft"),
        init=str(jigsaw_ckpt[0]),
        detector="fpn",
        arch="resnet18",
        batch=2,
        min_size=96,
        max_size=128,
        max_images=16,
        workers=0,
        log_every=2,
        max_iters=5,
        device="cpu",
    )
    logs: list[dict] = []
    Finetuner(cfg, on_log=logs.append).train()
    assert [(m["iteration"], m["loss"], m["loss_a"]) for m in logs] == [(2, 2.0, 1.0), (4, 15.0, 3.0), (5, 7.0, 1.0)]


@pytest.mark.slow
def test_a_resume_keeps_one_metrics_record_per_iteration(real_coco, jigsaw_ckpt, tmp_path):
    """A run killed after its checkpoint has logged iterations the resumed run logs again."""
    out = tmp_path / "ft"
    args = _tiny_finetune(real_coco, out, jigsaw_ckpt[0], images=8)
    assert CliRunner().invoke(main, [*args, "--max-iters", "2"]).exit_code == 0
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:  # what the killed run logged after the checkpoint at iteration 2
        f.write(json.dumps({"iteration": 3, "loss": 9.0}) + "\n" + '{"iteration": 4, "lo')
    result = CliRunner().invoke(main, [*args, "--max-iters", "3", "--resume"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3] and records[-1]["loss"] != 9.0


@pytest.mark.slow
def test_training_time_leaves_out_checkpoint_writes(real_coco, jigsaw_ckpt, tmp_path, monkeypatch):
    """The experiment grid's cost: a slow checkpoint write costs the run nothing."""
    import time

    from jigsawdata.trainer.finetune import FinetuneConfig, Finetuner

    monkeypatch.setattr(Finetuner, "step", lambda self, images, targets, factor: {"loss": 1.0})
    save = Finetuner.save
    monkeypatch.setattr(Finetuner, "save", lambda self: (time.sleep(0.5), save(self)))
    cfg = FinetuneConfig(
        coco=str(real_coco),
        out=str(tmp_path / "ft"),
        init=str(jigsaw_ckpt[0]),
        detector="fpn",
        arch="resnet18",
        batch=2,
        min_size=96,
        max_size=128,
        max_images=4,
        workers=0,
        epochs=2,
        device="cpu",
    )
    trainer = Finetuner(cfg)
    start = time.perf_counter()
    trainer.train()
    assert trainer.iteration == 4 and trainer.clock.seconds < time.perf_counter() - start - 2 * 0.5
    assert torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["train_device_seconds"] > 0


@pytest.mark.slow
def test_split_then_finetune_on_any_coco_format_files(real_coco, tmp_path):
    """`split` cuts a seeded held-out part by image (annotations follow their images, every
    other key copied); finetune and evaluate take the two files with --ann/--image-dir."""
    source = real_coco / "annotations" / "instances_train2017.json"
    args = ["split", str(source), "--val-images", "4", "--seed", "3"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b")]).exit_code == 0
    for name in ("instances_train.json", "instances_val.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), "seeded: the same split"
    original = json.loads(source.read_text())
    train, val = (json.loads((tmp_path / "a" / f"instances_{n}.json").read_text()) for n in ("train", "val"))
    ids = [{im["id"] for im in part["images"]} for part in (train, val)]
    assert len(ids[1]) == 4 and not ids[0] & ids[1] and ids[0] | ids[1] == {im["id"] for im in original["images"]}
    for part, own in zip((train, val), ids):
        assert {a["image_id"] for a in part["annotations"]} <= own and part["categories"] == original["categories"]
    assert len(train["annotations"]) + len(val["annotations"]) == len(original["annotations"])
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert again.exit_code == 1 and "exists already" in again.output
    both = CliRunner().invoke(main, [*args, "--val-fraction", "0.5", "--out", str(tmp_path / "c")])
    assert both.exit_code == 1 and "give one of --val-fraction and --val-images" in both.output
    escape = CliRunner().invoke(main, [*args, "--names", "../x,val", "--out", str(tmp_path / "d")])
    assert escape.exit_code == 1 and "split name '../x'" in escape.output and not (tmp_path / "d").exists()

    out = tmp_path / "ft"
    result = CliRunner().invoke(
        main,
        [
            "finetune",
            "--ann",
            str(tmp_path / "a" / "instances_train.json"),
            "--image-dir",
            str(real_coco / "train2017"),
            "--val-ann",
            str(tmp_path / "a" / "instances_val.json"),
            "--out",
            str(out),
            "--detector",
            "fpn",
            "--arch",
            "resnet18",
            "--batch",
            "2",
            "--min-size",
            "96",
            "--max-size",
            "128",
            "--max-images",
            "8",
            "--workers",
            "0",
            "--max-iters",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    evaluated = json.loads((out / "eval.json").read_text())["evaluated"]
    assert (
        evaluated["annotations"] == str((tmp_path / "a" / "instances_val.json").resolve()) and evaluated["images"] == 4
    )
    result = CliRunner().invoke(
        main, ["evaluate", str(out), "--ann", str(tmp_path / "a" / "instances_train.json"), "--max-images", "2"]
    )
    assert result.exit_code == 0 and (out / "eval-train-first2.json").is_file(), result.output
    refused = CliRunner().invoke(
        main, ["finetune", "--coco", str(real_coco), "--ann", str(source), "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 1 and "one of the two" in refused.output


@pytest.mark.slow
@pytest.mark.parametrize("stop", [1, 2], ids=["mid-epoch", "at-the-epochs-end"])
def test_a_run_stopped_by_max_iters_resumes_to_the_weights_of_an_uninterrupted_one(
    real_coco, jigsaw_ckpt, tmp_path, stop
):
    """Two iterations an epoch: a stop at the epoch's end moves on to the next epoch (its lower
    rate), a stop inside it trains the epoch's remaining batches, as an uninterrupted run does."""

    def finetune(out: str, *extra: str) -> None:
        args = [*_tiny_finetune(real_coco, tmp_path / out, jigsaw_ckpt[0], images=4), "--epochs", "2", "--warmup", "1"]
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output

    finetune("whole", "--max-iters", "3")
    finetune("parts", "--max-iters", str(stop))
    result = CliRunner().invoke(main, ["finetune", "--out", str(tmp_path / "parts"), "--resume", "--max-iters", "3"])
    assert result.exit_code == 0, result.output
    whole, parts = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("whole", "parts"))
    assert (parts["epoch"], parts["iteration"]) == (whole["epoch"], whole["iteration"]) == (1, 3)
    assert all(torch.equal(whole["model"][k], parts["model"][k]) for k in whole["model"])
    last = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()][-1]
    assert (last["epoch"], last["lr"]) == (
        1,
        json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[-1])["lr"],
    )


@pytest.mark.slow
def test_a_resume_is_refused_before_any_work_and_needs_no_init_file(real_coco, jigsaw_ckpt, tmp_path):
    import shutil

    init = tmp_path / "init.pt"
    shutil.copy(jigsaw_ckpt[0], init)
    out = tmp_path / "ft"
    args = _tiny_finetune(real_coco, out, init, images=4)
    assert CliRunner().invoke(main, [*args, "--max-iters", "1"]).exit_code == 0
    recorded = json.loads((out / "config.json").read_text())["resolved"]["provenance"]["init"]
    changed = CliRunner().invoke(main, ["finetune", "--out", str(out), "--resume", "--arch", "resnet50"])
    assert changed.exit_code == 1 and "settings differ from the saved run in arch" in changed.output, changed.output
    init.unlink()  # the weights it started from are in its checkpoint
    result = CliRunner().invoke(main, ["finetune", "--out", str(out), "--resume", "--max-iters", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["resolved"]["provenance"]["init"] == recorded

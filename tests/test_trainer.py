"""Pre-training: ERF weights, losses against naive versions, model, schedule, export, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from jigsawdata.errors import InputError
from jigsawdata.pipelines.template import Template
from jigsawdata.tests.needs import require
from jigsawdata.trainer import checkpoint as ckpt_io
from jigsawdata.trainer.erf import blockwise_weights, effective_receptive_fields, erf_weights, region_fractions
from jigsawdata.trainer.export import backbone_state, detectron2_config, detectron2_name, export
from jigsawdata.trainer.losses import blockwise_loss, erf_dense_loss, global_loss
from jigsawdata.trainer.model import ARCHS, DenseClassifier, build_backbone
from jigsawdata.trainer.schedule import learning_rate, scaled

T = Template()
G = T.grid


def _cells_of(region: int) -> np.ndarray:
    return T.feature_region_map().reshape(-1) == region


# ------------------------------------------------------------------ Eq. 2 on hand-made G


def test_erf_inside_own_region_gives_weight_one():
    erf = torch.zeros(G * G, 224, 224)
    fmap = T.feature_region_map().reshape(-1)
    for p in range(G * G):  # every cell's ERF lies wholly inside its own region
        x0, y0, x1, y1 = T.boxes[fmap[p]]
        erf[p, y0:y1, x0:x1] = 1.0
    w = erf_weights(erf, T, tau=0.7)
    np.testing.assert_allclose(w.numpy(), blockwise_weights(T).numpy())


def test_erf_inside_another_region_gets_the_tau_floor():
    erf = torch.zeros(G * G, 224, 224)
    erf[:, 100:120, 100:120] = 1.0  # every ERF inside BR
    w = erf_weights(erf, T, tau=0.7).reshape(4, -1)
    tl = _cells_of(0)
    np.testing.assert_allclose(w[0, tl].numpy(), 0.7)
    np.testing.assert_allclose(w[3, tl].numpy(), 0.3, atol=1e-6)
    assert (w[1:3, tl] == 0).all()


@pytest.mark.parametrize("tau", [0.7, 0.5])
def test_uniform_erf_gives_area_weights_with_the_floor(tau):
    w = erf_weights(torch.ones(G * G, 224, 224), T, tau=tau).reshape(4, -1)
    area = region_fractions(T)
    for r in range(4):
        cells = _cells_of(r)
        own = max(tau, area[r])
        np.testing.assert_allclose(w[r, cells].numpy(), own, rtol=1e-5)
        for i in set(range(4)) - {r}:
            np.testing.assert_allclose(w[i, cells].numpy(), (1 - own) * area[i] / (1 - area[r]), rtol=1e-5)
    np.testing.assert_allclose(w.sum(0).numpy(), 1.0, rtol=1e-5)


def test_tau_one_is_blockwise():
    erf = torch.rand(G * G, 224, 224)
    np.testing.assert_allclose(erf_weights(erf, T, tau=1.0).numpy(), blockwise_weights(T).numpy())


@pytest.mark.slow
def test_erf_batched_equals_one_backward_per_cell():
    small = Template(canvas=64, split=32)
    torch.manual_seed(0)
    model = DenseClassifier("resnet18", 5)
    images = torch.randn(3, 3, 64, 64)
    fast = effective_receptive_fields(model, images, chunk=2)
    assert model.training, "the training mode is restored"
    model.eval()
    naive = torch.zeros_like(fast)
    for img in images:
        x = img[None].clone().requires_grad_(True)
        out = model.features(x)
        for p in range(small.grid**2):
            (g,) = torch.autograd.grad(out[0, :, p // small.grid, p % small.grid].sum(), x, retain_graph=True)
            m = g[0].abs().sum(0)
            naive[p] += m / m.sum()
    naive /= len(images)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fast.sum(dim=(1, 2)).numpy(), 1.0, rtol=1e-5)


class _Pooling(torch.nn.Module):
    """A feature map whose cells see exactly a known window: average pooling of the input."""

    def __init__(self, kernel: int, padding: int = 0) -> None:
        super().__init__()
        self.pool = torch.nn.AvgPool2d(kernel, stride=32, padding=padding)

    def features(self, x):
        return self.pool(x)


def test_erf_of_a_known_receptive_field_is_that_field():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    erf = effective_receptive_fields(_Pooling(32), images)  # each cell sees its own 32x32 block
    expected = torch.zeros(G * G, 224, 224)
    for p in range(G * G):
        y, x = divmod(p, G)
        expected[p, 32 * y : 32 * y + 32, 32 * x : 32 * x + 32] = 1 / 32**2
    torch.testing.assert_close(erf, expected)
    np.testing.assert_allclose(erf_weights(erf, T, tau=0.7).numpy(), blockwise_weights(T).numpy())
    # 64x64 windows centred on each cell, cut by the image border: uniform inside, zero outside.
    erf = effective_receptive_fields(_Pooling(64, padding=16), images)
    corner = torch.zeros(224, 224)
    corner[:48, :48] = 1 / 48**2
    torch.testing.assert_close(erf[0], corner)
    middle = torch.zeros(224, 224)
    middle[80:144, 80:144] = 1 / 64**2
    torch.testing.assert_close(erf[3 * G + 3], middle)


def test_erf_weights_do_not_depend_on_the_head():
    """The ERF is the feature map's: replacing the classifier changes nothing."""
    torch.manual_seed(0)
    small = Template(canvas=64, split=32)
    model = DenseClassifier("resnet18", 5)
    images = torch.randn(2, 3, 64, 64)
    before = erf_weights(effective_receptive_fields(model, images), small, 0.7)
    model.head = torch.nn.Conv2d(512, 9, 1)
    after = erf_weights(effective_receptive_fields(model, images), small, 0.7)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert not torch.allclose(before, blockwise_weights(small))


@pytest.mark.slow
def test_erf_is_centred_on_its_cell():
    torch.manual_seed(0)
    erf = effective_receptive_fields(DenseClassifier("resnet18", 5), torch.randn(2, 3, 224, 224))
    first, last = erf[0], erf[-1]  # top-left and bottom-right cells of the 7x7 grid
    assert first[:112, :112].sum() > 0.5 > first[112:, 112:].sum()
    assert last[112:, 112:].sum() > 0.5 > last[:112, :112].sum()


# ------------------------------------------------------------------ losses versus naive versions


@pytest.fixture
def batch():
    torch.manual_seed(1)
    n, k = 5, 11
    logits = torch.randn(n, k, G, G)
    labels = torch.randint(0, k, (n, 4))
    labels[0, 3] = labels[0, 0]  # two regions with the same class
    weights = torch.rand(4, G, G)
    weights = weights / weights.sum(0, keepdim=True)
    return logits, labels, weights, torch.from_numpy(T.feature_region_map())


def _region_means(values, region_map):
    return torch.stack([values[..., region_map == r].mean(-1) for r in range(4)], -1)


def test_erf_loss_matches_an_explicit_soft_label(batch):
    logits, labels, weights, rmap = batch
    n, k = logits.shape[:2]
    soft = torch.zeros(n, k, G, G)
    for i in range(n):
        for r in range(4):
            soft[i, labels[i, r]] += weights[r]
    ce = -(soft * F.log_softmax(logits, 1)).sum(1)
    expected = _region_means(ce, rmap).mean()
    torch.testing.assert_close(erf_dense_loss(logits, labels, weights, rmap), expected)


def test_blockwise_loss_matches_pool_then_cross_entropy(batch):
    logits, labels, _, rmap = batch
    expected = torch.stack([F.cross_entropy(logits[..., rmap == r].mean(-1), labels[:, r]) for r in range(4)]).mean()
    torch.testing.assert_close(blockwise_loss(logits, labels, rmap), expected)


def test_global_loss_matches_an_area_mixed_label(batch):
    logits, labels, _, _ = batch
    area = torch.from_numpy(region_fractions(T)).float()
    n, k = logits.shape[:2]
    mixed = torch.zeros(n, k)
    for i in range(n):
        for r in range(4):
            mixed[i, labels[i, r]] += area[r]
    expected = -(mixed * F.log_softmax(logits.mean((2, 3)), 1)).sum(1).mean()
    torch.testing.assert_close(global_loss(logits, labels, area), expected)


# ------------------------------------------------------------------ model and schedule


@pytest.mark.slow
def test_model_gives_a_logit_map_and_torchvision_keys():
    model = DenseClassifier("resnet18", 81)
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 81, 7, 7)
    r50 = DenseClassifier("resnet50", 81)
    tv = torchvision.models.resnet50()
    assert set(backbone_state({"model": r50.state_dict()})) == set(tv.state_dict()) - {"fc.weight", "fc.bias"}


@pytest.mark.slow
def test_resnext101_32x4d_is_built_locally():
    model = DenseClassifier("resnext101_32x4d", 3)
    assert model.backbone.layer1[0].conv2.groups == 32
    assert model.backbone.layer1[0].conv2.out_channels == 128  # 32 groups x 4 channels


def test_schedule():
    kw = dict(total=100, warmup=10, lr_start=0.2, lr_peak=0.8)
    assert learning_rate(0, **kw) == pytest.approx(0.2)
    assert learning_rate(5, **kw) == pytest.approx(0.5)
    assert learning_rate(10, **kw) == pytest.approx(0.8)
    assert learning_rate(55, **kw) == pytest.approx(0.4)
    assert learning_rate(100, **kw) == pytest.approx(0.0)
    lrs = [learning_rate(i, **kw) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert scaled(0.8, 256) == pytest.approx(0.4)


# ------------------------------------------------------------------ export


def _fake_checkpoint(tmp_path, arch="resnet50"):
    model = DenseClassifier(arch, 81)
    path = tmp_path / "checkpoint.pt"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "arch": arch, "iteration": 7, "model": model.state_dict()}, path)
    return path, model


def test_detectron2_names():
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_name("layer1.0.downsample.0.weight") == "res2.0.shortcut.weight"
    assert detectron2_name("layer1.0.downsample.1.running_mean") == "res2.0.shortcut.norm.running_mean"
    assert detectron2_name("layer4.2.bn3.bias") == "res5.2.conv3.norm.bias"


@pytest.mark.slow
def test_exports_load(tmp_path):
    path, model = _fake_checkpoint(tmp_path)
    export(path, "torchvision", tmp_path / "tv.pth")
    tv = torchvision.models.resnet50()
    result = tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    assert torch.equal(tv.layer3[2].conv2.weight, model.backbone.layer3[2].conv2.weight)
    d2 = torch.load(export(path, "detectron2", tmp_path / "d2.pth") and tmp_path / "d2.pth", weights_only=True)
    assert d2["matching_heuristics"] and torch.equal(
        d2["model"]["res4.2.conv2.weight"], model.backbone.layer3[2].conv2.weight
    )
    assert not any(k.startswith(("layer", "bn1", "conv1")) for k in d2["model"])
    mm = torch.load(export(path, "mmdet", tmp_path / "mm.pth") and tmp_path / "mm.pth", weights_only=True)
    assert set(mm["state_dict"]) == set(tv.state_dict()) - {"fc.weight", "fc.bias"}


def _detectron2_expected(backbone, blocks_per_stage) -> dict:
    """Detectron2's name for every tensor, walked module by module: the stem's conv and BN,
    then per stage (res2..res5) and block its convs, their BNs as ``convK.norm`` and the first
    block's projection as ``shortcut`` (the rules of Detectron2's convert-torchvision-to-d2.py)."""

    def norm(prefix, bn):
        return {f"{prefix}.{p}": getattr(bn, p) for p in ("weight", "bias", "running_mean", "running_var")}

    expected = {"stem.conv1.weight": backbone.conv1.weight, **norm("stem.conv1.norm", backbone.bn1)}
    for stage, n in enumerate(blocks_per_stage, start=2):
        for b in range(n):
            block = getattr(backbone, f"layer{stage - 1}")[b]
            for k in (1, 2, 3):
                expected[f"res{stage}.{b}.conv{k}.weight"] = getattr(block, f"conv{k}").weight
                expected.update(norm(f"res{stage}.{b}.conv{k}.norm", getattr(block, f"bn{k}")))
            if b == 0:
                expected[f"res{stage}.0.shortcut.weight"] = block.downsample[0].weight
                expected.update(norm(f"res{stage}.0.shortcut.norm", block.downsample[1]))
    return expected


@pytest.mark.slow
def test_detectron2_pkl_is_what_its_converter_writes(tmp_path):
    import pickle
    import subprocess
    import sys

    path, model = _fake_checkpoint(tmp_path)
    out = tmp_path / "r50.pkl"
    assert export(path, "detectron2", out).tensors == 265
    # Detectron2's checkpointer: pickle.load(f, encoding="latin1"), here where torch cannot be imported.
    probe = (
        "import json, pickle, sys; sys.modules['torch'] = None; import numpy as np\n"
        f"d = pickle.load(open({str(out)!r}, 'rb'), encoding='latin1')\n"
        "assert all(type(v) is np.ndarray for v in d['model'].values())\n"
        "print(json.dumps({'keys': sorted(k for k in d if k != 'model'), 'author': d['__author__'],"
        " 'heuristics': d['matching_heuristics'], 'shapes': {k: v.shape for k, v in d['model'].items()}}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["keys"] == ["__author__", "matching_heuristics"] and seen["heuristics"] is True and seen["author"]
    shapes = {k: tuple(v) for k, v in seen["shapes"].items()}
    assert shapes["stem.conv1.weight"] == (64, 3, 7, 7) and shapes["stem.conv1.norm.running_var"] == (64,)
    assert shapes["res2.0.conv1.weight"] == (64, 64, 1, 1) and shapes["res2.0.conv1.norm.weight"] == (64,)
    assert shapes["res2.0.shortcut.weight"] == (256, 64, 1, 1) and shapes["res2.0.shortcut.norm.bias"] == (256,)
    assert shapes["res3.0.conv2.weight"] == (128, 128, 3, 3) and shapes["res5.2.conv3.weight"] == (2048, 512, 1, 1)
    expected = _detectron2_expected(model.backbone, (3, 4, 6, 3))
    assert set(shapes) == set(expected)
    with open(out, "rb") as f:
        exported = pickle.load(f)["model"]
    for name, tensor in expected.items():
        assert shapes[name] == tuple(tensor.shape), name
        assert np.array_equal(exported[name], tensor.detach().numpy()), name


@pytest.mark.slow
def test_detectron2_config_builds_the_exported_network():
    """Detectron2 builds ResNets from DEPTH (blocks per stage), NUM_GROUPS, WIDTH_PER_GROUP
    (res2's bottleneck is their product), RES2_OUT_CHANNELS and STRIDE_IN_1X1 (defaults 50, 1,
    64, 256, True); each must describe torchvision's network, or the weights load into another."""
    d2_blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
    for arch in ARCHS:
        cfg = detectron2_config(arch, "w.pkl")
        assert cfg["MODEL"]["WEIGHTS"] == "w.pkl" and cfg["INPUT"] == {"FORMAT": "RGB"}
        assert cfg["MODEL"]["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
        assert cfg["MODEL"]["PIXEL_STD"] == [58.395, 57.12, 57.375]
        res = cfg["MODEL"]["RESNETS"]
        assert res["STRIDE_IN_1X1"] is False
        net = build_backbone(arch)
        stages = [getattr(net, f"layer{i}") for i in (1, 2, 3, 4)]
        assert d2_blocks[res.get("DEPTH", 50)] == [len(s) for s in stages], arch
        first = stages[0][0]
        last_conv = first.conv3 if hasattr(first, "conv3") else first.conv2
        assert res.get("RES2_OUT_CHANNELS", 256) == last_conv.out_channels, arch
        if hasattr(first, "conv3"):  # bottlenecks: torchvision strides in the 3x3 conv
            assert (stages[1][0].conv1.stride, stages[1][0].conv2.stride) == ((1, 1), (2, 2)), arch
            assert res.get("NUM_GROUPS", 1) == first.conv2.groups, arch
            assert res.get("NUM_GROUPS", 1) * res.get("WIDTH_PER_GROUP", 64) == first.conv2.out_channels, arch
    assert detectron2_config("resnext101_32x4d", "w")["MODEL"]["RESNETS"] == {
        "DEPTH": 101,
        "NUM_GROUPS": 32,
        "WIDTH_PER_GROUP": 4,
        "STRIDE_IN_1X1": False,
    }


def test_cli_detectron2_export_prints_its_config_and_refuses_other_suffixes(tmp_path):
    import pickle

    import yaml
    from click.testing import CliRunner

    from jigsawdata.cli import main

    path, _ = _fake_checkpoint(tmp_path, arch="resnet18")
    result = CliRunner().invoke(
        main, ["export", str(path), "--format", "detectron2", "--out", str(tmp_path / "r18.pkl")]
    )
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output.split("\n", 2)[2])
    assert cfg["MODEL"]["RESNETS"] == {"DEPTH": 18, "RES2_OUT_CHANNELS": 64, "STRIDE_IN_1X1": False}
    assert cfg["MODEL"]["WEIGHTS"] == str(tmp_path / "r18.pkl") and cfg["INPUT"]["FORMAT"] == "RGB"
    with open(tmp_path / "r18.pkl", "rb") as f:
        assert len(pickle.load(f)["model"]) == 100
    for name in ("r18.pt", "r18"):
        result = CliRunner().invoke(
            main, ["export", str(path), "--format", "detectron2", "--out", str(tmp_path / name)]
        )
        assert result.exit_code == 1 and ".pkl" in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / name).exists()


@pytest.mark.parametrize(
    "fmt,name",
    [
        ("torchvision", "r18.txt"),
        ("torchvision", "r18"),
        ("mmdet", "r18.pkl"),
        ("mmdet", "r18.safetensors"),
        ("detectron2", "r18.safetensors"),
    ],
)
def test_every_export_format_refuses_a_suffix_its_readers_would_misread(tmp_path, fmt, name):
    from click.testing import CliRunner

    from jigsawdata.cli import main

    path, _ = _fake_checkpoint(tmp_path, arch="resnet18")
    result = CliRunner().invoke(main, ["export", str(path), "--format", fmt, "--out", str(tmp_path / name)])
    assert result.exit_code == 1 and f"a {fmt} export ends in" in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / name).exists()


@pytest.mark.slow
def test_safetensors_export_is_the_reference_layout_and_finetune_reads_it(tmp_path):
    from click.testing import CliRunner

    from jigsawdata.cli import main
    from jigsawdata.trainer.detection import build_detector
    from jigsawdata.trainer.tensorfile import read_safetensors, safetensors_bytes

    path, _ = _fake_checkpoint(tmp_path, arch="resnet18")
    for out in ("r18.safetensors", "r18.pth"):
        result = CliRunner().invoke(main, ["export", str(path), "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "r18.pth", weights_only=True)
    read = read_safetensors(tmp_path / "r18.safetensors")
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    missing = torchvision.models.resnet18().load_state_dict(read, strict=False)
    assert set(missing.missing_keys) == {"fc.weight", "fc.bias"} and not missing.unexpected_keys
    reference = require("safetensors.torch")  # the format's own implementation, byte for byte
    assert reference.save(state, {"format": "pt"}) == safetensors_bytes(state, {"format": "pt"})
    assert all(torch.equal(reference.load_file(tmp_path / "r18.safetensors")[k], state[k]) for k in state)
    model = build_detector("c4", "resnet18", 80, init=str(tmp_path / "r18.safetensors"))
    assert any(torch.equal(p, state["conv1.weight"]) for p in model.parameters())


@pytest.mark.slow
def test_mmdet_load_from_names_a_lone_backbone_as_a_detectors(tmp_path):
    from click.testing import CliRunner

    from jigsawdata.cli import main

    path, _ = _fake_checkpoint(tmp_path, arch="resnet18")
    for flag, name in (([], "init.pth"), (["--load-from"], "load.pth")):
        result = CliRunner().invoke(
            main, ["export", str(path), "--format", "mmdet", *flag, "--out", str(tmp_path / name)]
        )
        assert result.exit_code == 0, result.output
    bare = torch.load(tmp_path / "init.pth", weights_only=True)["state_dict"]
    prefixed = torch.load(tmp_path / "load.pth", weights_only=True)["state_dict"]
    assert list(prefixed) == ["backbone." + k for k in bare]
    refused = CliRunner().invoke(main, ["export", str(path), "--load-from", "--out", str(tmp_path / "tv.pth")])
    assert refused.exit_code == 1 and "--load-from is for --format mmdet" in refused.output


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_are_never_unpickled(tmp_path, real_coco):
    from click.testing import CliRunner

    from jigsawdata.cli import main

    path = tmp_path / "bad.pt"
    torch.save({"format": ckpt_io.FORMAT, "payload": _Evil()}, path)
    with pytest.raises(InputError, match="not a loadable checkpoint"):
        ckpt_io.load(path)
    # every command that loads a file says so in one line, without torch's advice to unpickle it anyway
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(path.read_bytes())
    for args in (
        ["export", str(path), "--out", str(tmp_path / "x.pth")],
        ["evaluate-pretrain", str(path), "--shards", str(tmp_path)],
        ["erf", str(run), "--out", str(tmp_path / "x.png")],
        ["evaluate", str(run)],
        ["finetune", "--coco", str(real_coco), "--out", str(tmp_path / "ft"), "--init", str(path)],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "weights_only" not in result.output, (args, result.output)
        assert result.output.count("\n") == 1 and "Warning" not in result.output, (args, result.output)
        assert "names Python code (print) that loading would run: refused" in result.output, result.output
    torch.save({"format": "something-else"}, path)
    with pytest.raises(InputError, match="not a jigsawdata pre-training checkpoint"):
        ckpt_io.load(path)


def test_precision_modes():
    from jigsawdata.trainer.runtime import Precision

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    bf16 = Precision.of("bf16", gpu)
    assert bf16.enabled and bf16.dtype == torch.bfloat16 and not bf16.scaler().is_enabled()
    fp16 = Precision.of("fp16", gpu)
    assert fp16.enabled and fp16.dtype == torch.float16
    assert not Precision.of("off", gpu).enabled and not Precision.of("bf16", cpu).enabled
    with pytest.raises(InputError, match="--amp must be one of"):
        Precision.of("fp8", gpu)


def test_a_file_that_is_not_a_checkpoint_gets_a_one_line_reason(tmp_path):
    bad = tmp_path / "g.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError) as err:
        ckpt_io.load(bad)
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)


@pytest.mark.slow
def test_train_clock_counts_only_while_running():
    import time

    from jigsawdata.trainer.runtime import TrainClock

    clock = TrainClock(torch.device("cpu"), processes=2, seconds=10.0)
    clock.start()
    time.sleep(0.05)
    with clock.paused():
        time.sleep(0.5)
        frozen = clock.seconds
        time.sleep(0.05)
        assert clock.seconds == frozen
    time.sleep(0.05)
    clock.stop()
    assert 10.2 <= clock.seconds < 11.0  # 2 processes x 0.1 s running; the paused 0.5 s x 2 not counted
    stopped = clock.seconds
    with clock.paused():  # pausing a stopped clock does not start it
        pass
    time.sleep(0.02)
    assert clock.seconds == stopped


def test_metrics_png_draws_each_series_present_and_skips_a_cut_line(tmp_path):
    from PIL import Image

    from jigsawdata.trainer.metricsplot import read_records, render_metrics, write_metrics_png

    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"iteration": i, "loss": 5.0 / i, "lr": 0.1 * i}) for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 6, "lo')
    assert [r["iteration"] for r in read_records(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert write_metrics_png(run, "t") == run / "metrics.png"
    assert Image.open(run / "metrics.png").size == (640, 20 + 2 * 170)  # loss and lr; no validation records
    with_val = [*read_records(run / "metrics.jsonl"), {"iteration": 5, "val_accuracy": 0.4}]
    assert render_metrics(with_val, "t").size == (640, 20 + 3 * 170)
    assert render_metrics([{"iteration": 1, "loss": float("nan")}], "t") is None


def test_tensorboard_off_is_said_at_verbose_and_runs_go_on(tmp_path, monkeypatch, caplog):
    import logging
    import sys

    from jigsawdata.trainer.runtime import tensorboard_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the tensorboard package
    with caplog.at_level(logging.INFO, logger="jigsawdata.trainer.runtime"):
        assert tensorboard_writer(tmp_path) is None
    assert any(
        "TensorBoard logging is off: pip install 'jigsawdata[tensorboard]'" in r.getMessage() for r in caplog.records
    )


def test_a_pretraining_run_reads_each_shard_set_manifest_once(built_synthetic, tmp_path, monkeypatch):
    """The set is opened (checked, its manifest parsed) once and handed down to the loader and
    the validation set, which read no manifest of their own."""
    from jigsawdata.shardset.manifest import Manifest
    from jigsawdata.trainer.config import PretrainConfig
    from jigsawdata.trainer.pretrain import Trainer

    parsed = []
    real = Manifest.from_json.__func__
    monkeypatch.setattr(
        Manifest, "from_json", classmethod(lambda cls, data, where="": parsed.append(where) or real(cls, data, where))
    )
    cfg = PretrainConfig(
        shards=str(built_synthetic),
        out=str(tmp_path / "run"),
        arch="resnet18",
        iterations=1,
        batch=2,
        canvas=64,
        template_split=32,
        erf_images=2,
        workers=0,
        device="cpu",
        pipeline="reference",
        val_shards=str(built_synthetic),
        val_images=2,
    )
    trainer = Trainer(cfg)
    assert len(parsed) == 2, parsed  # the training set and the held-out set, once each
    assert trainer.shards.root == built_synthetic and trainer.class_names == trainer.shards.class_names

"""The pre-training learning signal: region accuracy on fixed jigsaw images."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.pipelines.template import Template
from jigsawdata.trainer.validate import load_validation_set, region_accuracy, region_predictions

SMALL = Template(canvas=128, split=32)


def test_region_accuracy_and_majority_rates_are_exact():
    labels = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [0, 2, 2, 0], [1, 1, 2, 3]])
    preds = torch.tensor([[0, 1, 0, 3], [1, 1, 2, 0], [0, 1, 2, 0], [1, 1, 2, 2]])
    m = region_accuracy(preds, labels)
    assert m["val_accuracy"] == pytest.approx(12 / 16)
    assert m["val_majority"] == pytest.approx(5 / 16)  # class 0 and class 2 each 5 of 16
    assert [m[f"val_accuracy_{r}"] for r in ("TL", "TR", "BL", "BR")] == pytest.approx([3 / 4, 3 / 4, 3 / 4, 3 / 4])
    assert [m[f"val_majority_{r}"] for r in ("TL", "TR", "BL", "BR")] == pytest.approx([3 / 4, 3 / 4, 1.0, 2 / 4])
    assert m["val_images"] == 4


class _Oracle(torch.nn.Module):
    """Logits that put each region's own label on its cells: predictions must be the labels."""

    strides = {"C5": 32}

    def __init__(self, labels: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.labels, self.classes = labels, classes
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.seen = 0

    def forward(self, x):
        n = len(x)
        region = torch.from_numpy(SMALL.feature_region_map())
        cell_labels = self.labels[self.seen : self.seen + n][:, region]  # (n, g, g)
        self.seen += n
        return torch.nn.functional.one_hot(cell_labels, self.classes).permute(0, 3, 1, 2).float()


def test_fixed_images_are_the_same_every_time_and_predictions_pool_regions(built_real):
    a = load_validation_set(built_real, SMALL, 10)
    b = load_validation_set(built_real, SMALL, 10)
    assert a.images.shape == (10, 3, 128, 128) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(set(map(tuple, a.labels.tolist()))) > 1
    oracle = _Oracle(a.labels, len(a.class_names))
    predictions = region_predictions(oracle, a.images, SMALL, chunk=3)
    assert list(predictions) == ["all", "C5"]
    assert torch.equal(predictions["all"], a.labels) and torch.equal(predictions["C5"], a.labels)


def test_validation_shards_need_the_same_classes(built_real, built_synthetic):
    real = load_validation_set(built_real, SMALL, 1)
    with pytest.raises(InputError, match="other classes"):
        load_validation_set(built_synthetic, SMALL, 1, class_names=real.class_names)


@pytest.mark.slow
def test_pretrain_logs_validation_and_evaluate_pretrain_reproduces_it(built_real, tmp_path):
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--shards",
        str(built_real),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--iterations",
        "4",
        "--batch",
        "4",
        "--warmup",
        "1",
        "--canvas",
        "128",
        "--template-split",
        "32",
        "--erf-images",
        "2",
        "--workers",
        "1",
        "--log-every",
        "2",
        "--pipeline",
        "reference",
        "--fit",
        "warp",
        "--resize-min",
        "1.0",
        "--resize-max",
        "1.2",
        "--flip-p",
        "0",
        "--val-shards",
        str(built_real),
        "--val-every",
        "3",
        "--val-images",
        "6",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "majority-class rate" in result.output and "BL (T)" in result.output
    from PIL import Image

    with Image.open(out / "metrics.png") as png:  # loss, lr and held-out accuracy, one panel each
        assert png.format == "PNG" and png.size == (640, 20 + 3 * 170)
    lines = [line for line in result.output.splitlines() if line.startswith("it ")]  # no terminal: a line per log
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"] and " loss " in lines[0] and " val " in lines[1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_accuracy" in r]
    assert [r["iteration"] for r in val] == [3, 4] and all(r["val_images"] == 6 for r in val)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["fit"], saved["resize_min"], saved["flip_p"], saved["template_split"]) == ("warp", 1.0, 0.0, 32)
    again = CliRunner().invoke(
        main, ["evaluate-pretrain", str(out), "--shards", str(built_real), "--images", "6", "--json"]
    )
    assert again.exit_code == 0, again.output
    measured = json.loads(again.output)
    assert measured == {k: v for k, v in val[-1].items()}, "the same checkpoint gives the same figure"

    # validation shards go through the same check as the training shards
    import shutil

    damaged = shutil.copytree(built_real, tmp_path / "damaged")
    victim = sorted(damaged.glob("T/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    expected = f"Error: T/{victim.name} of {damaged} is damaged: its sha256 differs from the manifest's"
    refused = CliRunner().invoke(main, ["evaluate-pretrain", str(out), "--shards", str(damaged), "--images", "6"])
    assert refused.exit_code == 1 and refused.output.startswith(expected), refused.output
    args[args.index("--val-shards") + 1] = str(damaged)
    args[args.index("--out") + 1] = str(tmp_path / "run2")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and refused.output.startswith(expected), refused.output
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()


def test_bad_pretrain_ablation_settings_are_one_line_errors(built_real, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "pretrain",
            "--shards",
            str(built_real),
            "--out",
            str(tmp_path / "r"),
            "--resize-min",
            "2",
            "--resize-max",
            "1",
        ],
    )
    assert result.exit_code == 1 and "scale must be a range" in result.output and "Traceback" not in result.output


def test_runs_saved_before_the_rename_keep_their_template_split():
    from jigsawdata.trainer.config import PretrainConfig, config_from, saved_config

    cfg = config_from(PretrainConfig, saved_config({"shards": "s", "out": "o", "split": 32, "canvas": 128}))
    assert cfg.template == Template(canvas=128, split=32)

"""One source for every run setting: dataclass fields drive the CLI options, the checks and
``--config`` files; the CLI follows the usual conventions (-h, help everywhere, one meaning
per flag, -q, one line when DALI is missing)."""

import json
import sys

import click
import pytest
from click.testing import CliRunner

from jigsawdata.cli import main, progress_bar
from jigsawdata.errors import InputError
from jigsawdata.settings import read_config_file
from jigsawdata.trainer.config import FinetuneConfig, PretrainConfig


def _options():
    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        for param in cmd.params:
            if isinstance(param, click.Option):
                yield " ".join(path), param

    return list(walk(main, ["jigsawdata"]))


def test_every_option_has_help():
    missing = [(cmd, p.opts) for cmd, p in _options() if not p.help and not p.hidden]
    assert missing == []


def test_one_meaning_per_flag_name():
    """A flag is a number in every command that has it, or in none (``--images`` was a folder in
    build-shards and a count elsewhere; ``--split`` a data split and a template cut)."""
    numeric: dict[str, set] = {}
    for _, param in _options():
        for name in param.opts:
            numeric.setdefault(name, set()).add(
                isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))
            )
    assert {name: kinds for name, kinds in numeric.items() if len(kinds) > 1} == {}


def test_device_values_are_the_same_everywhere():
    choices = {tuple(p.type.choices) for _, p in _options() if "--device" in p.opts}
    assert choices == {("auto", "cpu", "cuda")}


@pytest.mark.parametrize("args", [["-h"], ["pretrain", "-h"], ["build-shards", "-h"]])
def test_short_help(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "Usage:" in result.output


@pytest.fixture
def captured(monkeypatch):
    """The settings the CLI would train with, without training."""
    seen = {}

    class Fake:
        def __init__(self, cfg, **_):
            seen["cfg"] = cfg
            raise InputError("stopped before training")

    monkeypatch.setattr("jigsawdata.trainer.pretrain.Trainer", Fake)
    monkeypatch.setattr("jigsawdata.trainer.finetune.Finetuner", Fake)
    return seen


def test_config_file_then_flags(tmp_path, captured):
    conf = tmp_path / "run.yaml"
    conf.write_text(
        "shards: /data/shards\nout: runs/a\nlr-peak: 0.4\nweight_decay: 5.0e-5\niterations: 300\nverify: false\n"
    )
    result = CliRunner().invoke(main, ["pretrain", "--config", str(conf), "--iterations", "200", "--lr", "0.3"])
    assert "stopped before training" in result.output
    cfg = captured["cfg"]
    assert (cfg.shards, cfg.out, cfg.iterations, cfg.lr_peak, cfg.weight_decay, cfg.verify) == (
        "/data/shards",
        "runs/a",
        200,
        0.3,
        5e-5,
        False,
    )
    assert cfg.batch == PretrainConfig.__dataclass_fields__["batch"].default


def test_a_runs_config_json_is_a_config_file(tmp_path, captured):
    saved = {
        "coco": "/data/coco",
        "out": "runs/ft",
        "lr": 0.01,
        "detector": "fpn",
        "epochs": 3,
        "resolved": {"device": "cuda:0", "precision": "bf16", "world_size": 8, "versions": {}},
    }
    conf = tmp_path / "config.json"
    conf.write_text(json.dumps(saved))
    CliRunner().invoke(main, ["finetune", "--config", str(conf), "--out", "runs/ft2"])
    cfg = captured["cfg"]
    assert isinstance(cfg, FinetuneConfig)
    assert (cfg.coco, cfg.out, cfg.lr, cfg.detector, cfg.epochs) == ("/data/coco", "runs/ft2", 0.01, "fpn", 3)


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("shards: a\nout: b\nlearning_rate: 1\n", ".yaml", "unknown setting 'learning_rate'"),
        ("shards: a\nout: b\niterations: ten\n", ".yaml", "--iterations must be an integer, got 'ten'"),
        ("shards: a\nout: b\nlr_peak: 0.1\nlr-peak: 0.3\n", ".yaml", "--lr-peak is given twice"),
        ("shards: a\nout: b\ntau: 1.5\n", ".yml", "--tau must be >= 0 and <= 1, got 1.5"),
        ("shards: a\nout: b\nlr_peak: 0\n", ".yaml", "--lr-peak must be > 0, got 0.0"),
        ("shards: a\nout: b\narch: vgg\n", ".yaml", "--arch must be one of resnet18"),
        ("shards: a\nout: [b\n", ".yaml", "is not valid YAML"),
        ('{"shards": "a",', ".json", "is not valid JSON"),
        ("- shards\n", ".yaml", "must hold a mapping of settings"),
        ("shards: a\nout: b\nbatch: 4\nbatch: 8\n", ".yaml", "is not valid YAML: 'batch' is given twice"),
        ('{"shards": "a", "out": "b", "batch": 4, "batch": 8}', ".json", "is not valid JSON: 'batch' is given twice"),
        ('shards: a\nout: b\ntau: "0.5"\n', ".yaml", "--tau must be a number, got '0.5'"),
        ('{"shards": "a", "out": "b", "tau": "0.5"}', ".json", "--tau must be a number, got '0.5'"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, captured, text, suffix, message):
    conf = tmp_path / f"c{suffix}"
    conf.write_text(text)
    result = CliRunner().invoke(main, ["pretrain", "--config", str(conf)])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert "cfg" not in captured


def test_required_settings_from_flags_or_file(captured):
    result = CliRunner().invoke(main, ["pretrain", "--out", "x"])
    assert result.exit_code == 2 and "missing --shards" in result.output and "cfg" not in captured


def test_settings_are_checked_from_python_too():
    with pytest.raises(InputError, match="--workers 0: DALI needs >= 1 thread"):
        PretrainConfig(shards="a", out="b", workers=0)
    with pytest.raises(InputError, match="--lr must be > 0"):
        FinetuneConfig(coco="a", out="b", lr=0)
    with pytest.raises(InputError, match="--momentum must be a finite number"):
        FinetuneConfig(coco="a", out="b", momentum=float("nan"))
    assert isinstance(PretrainConfig(shards="a", out="b", tau=1).tau, float)


def test_read_config_file_accepts_flags_fields_and_aliases(tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"erf-every": 5, "val_images": 8, "--checkpoint-every": 3, "lr": 0.1}))
    assert read_config_file(conf, PretrainConfig) == {
        "erf_every": 5,
        "val_images": 8,
        "checkpoint_every": 3,
        "lr_peak": 0.1,
    }
    conf = tmp_path / "c.yaml"
    conf.write_text("weight_decay: 1e-4\nmomentum: 0.8\nwarmup: 5\nlr_peak: -2.5E+1\n")  # YAML 1.1 reads 1e-4 as text
    assert read_config_file(conf, PretrainConfig) == {
        "weight_decay": 1e-4,
        "momentum": 0.8,
        "warmup": 5,
        "lr_peak": -25.0,
    }


def test_progress_bars_follow_quiet_and_the_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True

        def write(self, _):
            pass

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Tty())
    with click.Context(main, obj={"quiet": False}):
        assert not progress_bar(total=1).disable
    with click.Context(main, obj={"quiet": True}):
        assert progress_bar(total=1).disable is True
    monkeypatch.setattr(Tty, "isatty", lambda self: False)
    with click.Context(main, obj={"quiet": False}):
        assert progress_bar(total=1).disable is True


def test_missing_dali_is_one_line_naming_the_fallback(monkeypatch, built_synthetic, tmp_path):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    result = CliRunner().invoke(
        main, ["preview", str(built_synthetic), "--out", str(tmp_path / "p.png"), "--pipeline", "dali", "--no-verify"]
    )
    assert result.exit_code == 1 and "use --pipeline reference" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["pretrain", "--shards", str(built_synthetic), "--out", str(run)])
    assert result.exit_code == 1 and "pip install 'jigsawdata[dali]'" in result.output
    assert not run.exists()
    result = CliRunner().invoke(main, ["bench", "pipeline", "--quick", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and result.output.strip().endswith(
        "or run the benchmarks that do not need it: build, loss"
    ), result.output


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate-pretrain", "{run}", "--shards", "{run}"],
        ["evaluate", "{run}"],
        ["preview", "{shards}", "--out", "{run}/p.png", "--no-verify"],
        ["erf", "{run}", "--out", "{run}/erf.png"],
    ],
)
def test_device_cuda_without_a_gpu_is_refused_everywhere(monkeypatch, built_synthetic, tmp_path, command):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    run.mkdir()
    args = [a.format(run=run, shards=built_synthetic) for a in command]
    result = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--device cuda, but torch sees no CUDA GPU" in result.output, result.output


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_work_before_or_after_the_command(monkeypatch, built_synthetic, where):
    import logging

    import tqdm

    seen = []

    class Recorder(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("disable"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # restored after the test
    flags, command = ["-q", "-vv"], ["verify", str(built_synthetic)]
    args = [*flags, *command] if where == "before" else [*command, *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert seen == [True]
    if where == "after":  # before the command, logging.basicConfig sets it (once per process)
        assert root.level == logging.DEBUG


@pytest.mark.parametrize("quiet", [False, True])
def test_library_warnings_are_one_log_line_and_quiet_silences_them(monkeypatch, built_synthetic, caplog, quiet):
    import logging
    import warnings

    import jigsawdata.shardset.check

    def warn_then_verify(root, on_shard=None):
        warnings.warn("This DataLoader will create 4 worker processes\nmore advice", UserWarning)
        return []

    monkeypatch.setattr(jigsawdata.shardset.check, "verify_shard_set", warn_then_verify)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    monkeypatch.setattr(logging.getLogger("py.warnings"), "level", logging.NOTSET)
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(main, [*(["-q"] if quiet else []), "verify", str(built_synthetic)])
    assert result.exit_code == 0, result.output
    logged = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert logged == ([] if quiet else ["UserWarning: This DataLoader will create 4 worker processes"])


def test_help_lists_every_command_once_under_its_topic():
    from jigsawdata.cli import TOPICS

    listed = [name for _, names in TOPICS for name in names]
    assert sorted(listed) == sorted(main.commands) and len(set(listed)) == len(listed)
    text = CliRunner().invoke(main, ["--help"]).output
    positions = [text.index(f"\n  {name} ") for name in listed]
    assert positions == sorted(positions), "commands appear in workflow order"
    assert all(f"{topic}:" in text for topic, _ in TOPICS)


def test_preview_takes_the_jigsaw_options_of_pretrain():
    """One place for the jigsaw settings: preview and pretrain have the same flags, types and
    defaults for every field of JigsawSettings."""
    import dataclasses

    from jigsawdata.pipelines.config import JigsawSettings

    def options(command: str) -> dict:
        return {p.name: (tuple(p.opts), type(p.type), p.default) for p in main.commands[command].params}

    preview, pretrain = options("preview"), options("pretrain")
    for field in dataclasses.fields(JigsawSettings):
        assert preview[field.name] == pretrain[field.name], field.name


@pytest.mark.slow
def test_build_shards_config_file_builds_the_set_the_flags_build(synthetic_root, tmp_path):
    def build(out, *args):
        result = CliRunner().invoke(
            main, ["build-shards", str(synthetic_root), "--out", str(tmp_path / out), "-q", *args]
        )
        assert result.exit_code == 0, result.output
        return {
            p.relative_to(tmp_path / out): p.read_bytes() for p in sorted((tmp_path / out).rglob("*")) if p.is_file()
        }

    flags = build("flags", "--seed", "5", "--max-enlarge", "1.5", "--shard-size", "64KB", "--shard-samples", "20")
    conf = tmp_path / "build.yaml"
    conf.write_text("seed: 5\nmax-enlarge: 1.5\nshard_size: 64KB\nshard_samples: 20\n")
    assert build("file", "--config", str(conf)) == flags
    overridden = build("override", "--config", str(conf), "--seed", "6")
    assert json.loads(overridden[type(next(iter(flags)))("manifest.json")])["params"]["seed"] == 6
    conf.write_text("seed: 5\nmax_enlarj: 1.5\n")
    result = CliRunner().invoke(
        main, ["build-shards", str(synthetic_root), "--out", str(tmp_path / "bad"), "--config", str(conf)]
    )
    assert result.exit_code == 1 and "unknown setting 'max_enlarj'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

"""What pre-training and fine-tuning share about running: processes (torchrun / DDP), RNG
state in checkpoints, and run directories."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from jigsawdata.errors import InputError
from jigsawdata.pipelines.ranks import DistInfo, process_info

from .checkpoint import CHECKPOINT_NAME


AMP_MODES = ("bf16", "fp16", "off")


@dataclass(frozen=True)
class Precision:
    """Mixed precision on a GPU: bf16 by default (fp32's range, no scaler needed), fp16
    with a grad scaler, or off. The CPU always runs fp32."""

    enabled: bool
    dtype: torch.dtype

    @classmethod
    def of(cls, amp: str, device: torch.device) -> "Precision":
        if amp not in AMP_MODES:
            raise InputError(f"--amp must be one of {AMP_MODES}, got {amp!r}")
        return cls(device.type == "cuda" and amp != "off", torch.float16 if amp == "fp16" else torch.bfloat16)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no CUDA GPU")
    info = process_info()
    if info.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if info.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather(obj, info: DistInfo) -> list:
    """``obj`` of every rank, in rank order (on every rank)."""
    if info.world == 1:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def check_resume_device(saved: str | None, device: torch.device, run: Path) -> None:
    """Refuse to continue a run on another kind of device than the one it was saved on.

    Neither exactness nor state survives the move: a CPU run's grad scaler holds no state
    that fp16 on a GPU accepts, the GPU's RNG state does not exist on the CPU, and kernels
    differ. ``saved`` is None for checkpoints that did not record it."""
    if saved is not None and saved != device.type:
        raise InputError(f"{run} was saved on the {saved.upper()} and cannot be resumed on the "
                         f"{device.type.upper()}: resume it with --device {saved}")


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def config_from(cls, values: dict):
    """A config dataclass from saved values, ignoring fields this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def claim_run_dir(out: Path, resume: bool) -> Path:
    """The run directory; a finished or started run is only continued with ``resume``.
    Nothing is created here: :func:`dump_config` does, once the run has passed its checks,
    so that a refused run leaves no empty directory behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a run directory")
    if not resume and (out / CHECKPOINT_NAME).exists():
        raise InputError(f"{out} holds a run already: pass --resume to continue it, or use another --out")
    if not resume and out.is_dir() and any(out.iterdir()):
        names = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise InputError(f"--out {out} is not empty ({names}) and holds no checkpoint: a new run needs a new or "
                         "empty directory")
    return out


def dump_config(out: Path, cfg) -> None:
    """The resolved settings of a run, next to its checkpoints (as timm's args.yaml)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")

"""What pre-training and fine-tuning share about running: processes (torchrun / DDP), RNG
state in checkpoints, and run directories."""

from __future__ import annotations

import datetime
import json
import logging
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from jigsawdata import __version__
from jigsawdata.environment import installed
from jigsawdata.errors import InputError
from jigsawdata.files import write_json_atomic, write_text_atomic
from jigsawdata.layout import CHECKPOINT_NAME, CONFIG_NAME
from jigsawdata.pipelines.ranks import DistInfo, process_info
from jigsawdata.settings import RESOLVED_KEY
from jigsawdata.shardset.location import is_url

from .config import AMP_MODES

log = logging.getLogger(__name__)


class TrainClock:
    """A run's training cost in device-seconds: what the experiment grid compares (docs/method.md 7).

    Wall seconds times the processes training while the clock runs; validation, evaluation
    and checkpoint I/O run with it paused. Pausing waits for the GPU's queued kernels first,
    so the time they take is counted where it was spent. The total goes into every
    checkpoint and a resumed run continues from it, with however many processes it has:
    work lost to an interruption is redone and counted once."""

    def __init__(self, device: torch.device, processes: int = 1, seconds: float = 0.0) -> None:
        self.device, self.processes = device, processes
        self._seconds, self._since = float(seconds), None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._seconds += (time.perf_counter() - self._since) * self.processes
            self._since = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    @property
    def seconds(self) -> float:
        """Device-seconds counted so far (without waiting for the GPU)."""
        running = (time.perf_counter() - self._since) * self.processes if self._since is not None else 0.0
        return self._seconds + running


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

    @property
    def name(self) -> str:
        """What the run computes in: fp32 (the CPU, or ``--amp off``), bf16 or fp16."""
        return ("bf16" if self.dtype == torch.bfloat16 else "fp16") if self.enabled else "fp32"

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)


def use_cuda(device: str) -> bool:
    """What ``--device`` means in every command: ``auto`` is a CUDA GPU when torch sees one,
    and ``cuda`` without one is refused rather than quietly run on the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no CUDA GPU")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def pick_device(device: str) -> torch.device:
    """The one device of a single-process command (evaluation, ERF maps)."""
    return torch.device("cuda" if use_cuda(device) else "cpu")


def init_distributed(device: str, timeout: datetime.timedelta | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device.
    ``timeout``: how long a collective waits for every rank (None: torch's default), e.g.
    longer where rank 0 alone builds data or evaluates while the others wait."""
    cuda = use_cuda(device)
    info = process_info()
    if info.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    if cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if info.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


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
        raise InputError(
            f"{run} was saved on the {saved.upper()} and cannot be resumed on the "
            f"{device.type.upper()}: resume it with --device {saved}"
        )


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def drop_records_after(path: Path, iteration: int) -> None:
    """Metrics logged after the checkpoint a run resumes from are logged again by the resumed
    run (and an interrupted last line is incomplete): keep one record per iteration."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("iteration", 0) <= iteration:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def claim_run_dir(out: Path | str, resume: bool) -> Path:
    """The run directory; a finished or started run is only continued with ``resume``.
    Nothing is created here: :func:`dump_config` does, once the run has passed its checks,
    so that a refused run leaves no empty directory behind."""
    if is_url(str(out)):
        raise InputError(f"--out {out} is a URL: a run directory is local (copy it up when it is done)")
    out = Path(str(out).removeprefix("file://"))
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a run directory")
    if not resume and (out / CHECKPOINT_NAME).exists():
        raise InputError(f"{out} holds a run already: pass --resume to continue it, or use another --out")
    if not resume and out.is_dir() and any(out.iterdir()):
        names = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise InputError(
            f"--out {out} is not empty ({names}) and holds no checkpoint: a new run needs a new or empty directory"
        )
    return out


def versions() -> dict[str, str | None]:
    """Versions of what a run's numbers depend on (``None``: not installed)."""
    return {
        "jigsawdata": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": installed("torchvision"),
        "nvidia-dali": installed("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali"),
        "cuda": torch.version.cuda,
    }


def source_revision() -> str | None:
    """The git commit of the jigsawdata source that runs (``+dirty`` with uncommitted changes),
    or None for an installed copy or without git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def provenance(**data) -> dict:
    """What ties a run to its inputs: the command line (as ``jigsawdata ...``, however it was
    started: the script, ``python -m``, torchrun), the source revision where known, and
    ``data`` (each data set's location and manifest or annotation sha256)."""
    return {"command": shlex.join(["jigsawdata", *sys.argv[1:]]), "revision": source_revision(), **data}


def resolved(device: torch.device, precision: Precision, info: DistInfo, origin: dict | None = None) -> dict:
    """What ``auto`` and the environment turned a run's settings into, and (``origin``) its
    :func:`provenance`."""
    return {
        "device": str(device),
        "precision": precision.name,
        "world_size": info.world,
        "versions": versions(),
        **({"provenance": origin} if origin else {}),
    }


def dump_config(out: Path, cfg, resolved_values: dict) -> None:
    """A run's settings, next to its checkpoints (as timm's args.yaml), with what they resolved to
    under ``resolved``. The file works as ``--config`` of a new run (``resolved`` is skipped)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / CONFIG_NAME, {**asdict(cfg), RESOLVED_KEY: resolved_values})


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While open, SIGTERM (Slurm's and Kubernetes' preemption notice) is noted instead of
    ending the process; the callable says whether it came. The previous handler is restored
    after. Outside the main thread (signals cannot be handled there) nothing is noted."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)


def tensorboard_writer(out: Path):
    """A TensorBoard writer into ``out/tensorboard``, or None (said at ``-v``) without the
    ``tensorboard`` package: ``pip install 'jigsawdata[tensorboard]'``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info(
            "TensorBoard logging is off: pip install 'jigsawdata[tensorboard]' for it (metrics.jsonl and "
            "metrics.png are written either way)"
        )
        return None
    return SummaryWriter(str(Path(out) / "tensorboard"))

"""What ERF-adaptive dense classification costs over plain global classification.

Same model body, same batch, same device, in one run: a training step of a torchvision
ResNet with average pooling + FC and cross-entropy, against a step of the dense head with
the ERF loss, plus the ERF refresh amortised over its interval. Inputs are fixed tensors, so
only the model and the loss are timed. Usage:

    python -m jigsawdata.benchmarks.loss_overhead [--arch resnet50] [--batch 32] [--steps 10] [--erf-every 5000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from jigsawdata.pipelines.template import Template
from jigsawdata.trainer.erf import effective_receptive_fields, erf_weights
from jigsawdata.trainer.losses import erf_dense_loss
from jigsawdata.trainer.model import DenseClassifier, build_backbone

from .common import environment, interleaved, report, stats, timed


def _timer(step, steps: int, cuda: bool):
    """One measured repeat of ``steps`` calls: returns a callable giving seconds per call."""

    def run() -> float:
        return timed(lambda: [step() for _ in range(steps)], cuda) / steps

    return run


def run(
    arch: str = "resnet50",
    batch: int = 32,
    steps: int = 10,
    repeats: int = 3,
    erf_every: int = 5000,
    erf_images: int = 64,
    classes: int = 81,
) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    template = Template()
    x = torch.randn(batch, 3, template.canvas, template.canvas, device=device)
    labels = torch.randint(0, classes, (batch, 4), device=device)

    def make_step(model, loss_fn):
        model = model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = model(x)
            loss = loss_fn(out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return model, step

    plain = build_backbone(arch)
    plain.fc = torch.nn.Linear(plain.fc.in_features, classes)
    _, plain_step = make_step(plain, lambda out: F.cross_entropy(out.float(), labels[:, 3]))
    dense, _ = make_step(DenseClassifier(arch, classes), lambda out: None)
    region_map = torch.from_numpy(template.feature_region_map()).to(device)
    weights = erf_weights(effective_receptive_fields(dense, x[:2]), template)
    _, dense_step = make_step(dense, lambda out: erf_dense_loss(out, labels, weights, region_map))

    for _ in range(3):
        plain_step()
        dense_step()
    n_erf = min(erf_images, batch)
    runs = interleaved(
        {
            "plain": _timer(plain_step, steps, cuda),
            "dense": _timer(dense_step, steps, cuda),
            "erf": _timer(lambda: erf_weights(effective_receptive_fields(dense, x[:n_erf]), template), 1, cuda),
        },
        repeats,
    )
    plain_t, dense_t, erf_t = stats(runs["plain"]), stats(runs["dense"]), stats(runs["erf"])
    amortised = erf_t["median"] / erf_every
    overhead = (dense_t["median"] + amortised) / plain_t["median"] - 1.0
    return {
        "benchmark": "loss_overhead",
        "arch": arch,
        "batch": batch,
        "erf_every": erf_every,
        "erf_images": n_erf,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "plain_step_s": plain_t,
        "erf_dense_step_s": dense_t,
        "erf_refresh_s": erf_t,
        "erf_refresh_amortised_s": amortised,
        "overhead": overhead,
        "environment": environment(),
    }


def format_table(r: dict) -> str:
    return "\n".join(
        [
            f"ERF-dense versus global classification: {r['arch']}, batch {r['batch']}, device {r['device']}",
            f"{'':<36}{'median s':>10}{'min':>10}{'max':>10}",
            *(
                f"{name:<36}{r[key]['median']:>10.4f}{r[key]['min']:>10.4f}{r[key]['max']:>10.4f}"
                for name, key in (
                    ("global pool + FC step", "plain_step_s"),
                    ("dense head + ERF loss step", "erf_dense_step_s"),
                    (f"ERF refresh ({r['erf_images']} images)", "erf_refresh_s"),
                )
            ),
            f"ERF refresh amortised over {r['erf_every']} iterations: {r['erf_refresh_amortised_s'] * 1e3:.3f} ms/step",
            f"overhead of the ERF-dense step: {100 * r['overhead']:+.2f}%",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--erf-every", type=int, default=5000)
    parser.add_argument("--erf-images", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.arch, args.batch, args.steps, args.repeats, args.erf_every, args.erf_images)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()

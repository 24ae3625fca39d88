"""Zero-padding share of jigsaw canvases for a shard set, for every fit mode in one run.

    python -m jigsawdata.benchmarks.pixel_utilisation SHARDS [--images 20000] [--json out.json]

Builds nothing and decodes nothing: the crop sizes come from the shard set's index.
"""

from __future__ import annotations

import argparse
import json

from jigsawdata.pipelines.config import FIT_MODES, JigsawConfig
from jigsawdata.pipelines.template import Template
from jigsawdata.pipelines.utilisation import crop_sizes, padding_share


def run(shards: str, images: int = 20_000, canvas: int = 224, split: int = 64, seed: int = 0) -> dict:
    sizes = crop_sizes(shards)
    template = Template(canvas=canvas, split=split)
    cases = {fit: JigsawConfig(template=template, fit=fit) for fit in FIT_MODES}
    cases["pad_crop, no resize"] = JigsawConfig(template=template, scale=(1.0, 1.0))
    return {
        "shards": str(shards),
        "crops": {g: len(v) for g, v in sizes.items()},
        "results": {name: padding_share(sizes, cfg, images, seed) for name, cfg in cases.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--images", type=int, default=20_000, help="Assembled images drawn.")
    parser.add_argument("--canvas", type=int, default=224)
    parser.add_argument("--template-split", type=int, default=64)
    parser.add_argument("--json", help="Also write the result here.")
    args = parser.parse_args()
    result = run(args.shards, args.images, args.canvas, args.template_split)
    for name, r in result["results"].items():
        regions = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["per_region"].items())
        print(f"{name:<20} padding {100 * r['padding_share']:5.1f}% of canvas pixels ({regions})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

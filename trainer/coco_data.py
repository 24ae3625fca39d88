"""COCO-format detection data for fine-tuning and evaluation, via pycocotools.

Targets follow torchvision's detection models: ``boxes`` (xyxy), ``labels`` (1..C in sorted
COCO category-id order; 0 is torchvision's background), ``masks`` for Mask R-CNN. Crowd boxes
are left out of training targets, as in torchvision's ``references/detection``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor

from jigsawdata.coco.reader import load_rgb
from jigsawdata.errors import InputError


def open_coco(ann_file: Path) -> COCO:
    if not Path(ann_file).is_file():
        raise InputError(f"annotation file not found: {ann_file}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


class CocoDetection(torch.utils.data.Dataset):
    def __init__(
        self,
        ann_file: Path,
        images_dir: Path,
        *,
        train: bool,
        masks: bool = False,
        flip_p: float = 0.5,
        max_images: int | None = None,
    ) -> None:
        self.coco = open_coco(ann_file)
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise InputError(f"image folder not found: {images_dir}")
        self.cat_ids = sorted(self.coco.cats)
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.train, self.masks, self.flip_p = train, masks, flip_p
        ids = sorted(self.coco.imgs)
        if train:  # images with no usable box teach nothing to the box heads
            ids = [
                i
                for i in ids
                if any(
                    not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1
                    for a in self.coco.imgToAnns.get(i, [])
                )
            ]
        self.ids = ids[:max_images] if max_images else ids
        if not self.ids:
            raise InputError(f"{ann_file} has no usable images")

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        img, reason = load_rgb(self.images_dir / info["file_name"], info["width"], info["height"])
        if img is None:
            raise InputError(f"image {info['file_name']}: {reason}")
        w, h = img.size
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)[keep],
            "image_id": image_id,
        }
        if self.masks:
            target["masks"] = torch.from_numpy(
                np.stack([self.coco.annToMask(a) for a, k in zip(anns, keep) if k])
                if keep.any()
                else np.zeros((0, h, w), np.uint8)
            )
        image = pil_to_tensor(img).float() / 255.0
        if self.train and self.flip_p > 0 and torch.rand(()) < self.flip_p:
            image, target = hflip(image, target)
        return image, target


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate(batch):
    return tuple(zip(*batch))


def to_coco_results(outputs: list[dict], image_ids: list[int], cat_ids: list[int], masks: bool) -> dict:
    """torchvision detections -> COCO results lists (``bbox`` and, with masks, ``segm``)."""
    results: dict[str, list] = {"bbox": [], "segm": []}
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().numpy()
        scores = out["scores"].detach().cpu().numpy().tolist()
        cats = [cat_ids[int(label) - 1] for label in out["labels"].cpu()]
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            results["bbox"].append(
                {"image_id": image_id, "category_id": cats[i], "score": scores[i], "bbox": [x0, y0, x1 - x0, y1 - y0]}
            )
        if masks and "masks" in out:
            binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            for i in range(len(binary)):
                rle = mask_utils.encode(np.asfortranarray(binary[i]))
                segmentation = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
                results["segm"].append(
                    {"image_id": image_id, "category_id": cats[i], "score": scores[i], "segmentation": segmentation}
                )
    return results

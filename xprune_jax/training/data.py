"""Training data for fine-tuning, augmented on the host in threads.

A :class:`TrainingSet` is a COCO-layout split (``ROOT/<split>/`` images, ``ROOT/annotations/instances_<split>.json``
ground truth when a loss needs it) or a labelled ImageFolder (classifiers). The order is a pure function
of ``(seed, step)``: the example at position ``p = step * batch + slot`` is ``permutation(seed, epoch)[p % n]``
with ``epoch = p // n``, and its augmentation draws from ``(seed, step, slot)``. A run resumed at any step
therefore sees exactly the batches an uninterrupted run sees.

Augmentation: horizontal flips; classifiers a scale jitter of the resize (``resize * [1, 1 + jitter]``) and a
random crop position; detectors a resize jitter (``[1 - jitter, 1]`` of the letterbox size or of
torchvision's min/max sizes) inside the fixed square input, boxes mapped through the model's own
pipeline (``to_input``).
"""

import collections
import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterator

import numpy as np
from PIL import Image

from xprune_jax import models
from xprune_jax.checkpoint import Model
from xprune_jax.data.images import classification_transform, image_folder, list_images, load_rgb
from xprune_jax.errors import UserError


@dataclasses.dataclass
class TrainingSet:
    kind: str  # "coco" | "image_folder"
    root: str
    split: str
    paths: list[str]
    labels: np.ndarray | None = None  # classifiers: class index per image
    targets: list | None = None  # detectors: per image (xywh boxes in original pixels, class indices)

    @property
    def labelled(self) -> bool:
        return self.labels is not None or self.targets is not None

    def describe(self) -> dict:
        return {"kind": self.kind, "root": os.path.abspath(self.root), "split": self.split, "images": len(self.paths),
                "labelled": self.labelled}


def coco_split(model: Model, root: str, split: str = "train2017", labelled: bool = True) -> TrainingSet:
    """The images of ``root/<split>``; with ``labelled``, their ground truth (in the model's class indices)
    from ``root/annotations/instances_<split>.json``."""
    folder = os.path.join(root, split)
    if not os.path.isdir(root):
        raise UserError(f"COCO root {root} does not exist: point --coco at a folder laid out like the official download")
    if not os.path.isdir(folder):
        raise UserError(f"COCO root {root} has no {split}/ folder: pass --split=<an image folder under it>")
    paths = list_images(folder)
    if not labelled:
        return TrainingSet("coco", root, split, paths)
    annotations = os.path.join(root, "annotations", f"instances_{split}.json")
    if not os.path.isfile(annotations):
        raise UserError(f"the task loss needs ground truth, but {annotations} does not exist; give a split with "
                        "annotations, or train by distillation alone (--objective=distill)")
    if models.get_architecture(model.arch).task != "detection":
        raise UserError("a classifier's task loss needs labels: give a labelled --image_folder (ImageFolder layout)")
    from xprune_jax.attribution.score import detection_targets
    from xprune_jax.evaluation.coco import pipeline_for

    targets = detection_targets(annotations, paths, pipeline_for(model).class_indices)
    return TrainingSet("coco", root, split, paths, targets=targets)


def labelled_folder(model: Model, root: str) -> TrainingSet:
    """A labelled ImageFolder (``root/<class name>/<image>``) for a classifier, labelled in its categories."""
    if models.get_architecture(model.arch).task != "classification":
        raise UserError(f"--image_folder trains classifiers; {model.arch} is a detector: give a COCO-layout --coco root")
    paths, labels, _ = image_folder(root, model.meta.get("categories"))
    return TrainingSet("image_folder", root, "", paths, labels=labels)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


def example_index(n: int, seed: int, position: int) -> int:
    """The dataset index of the example at ``position`` of the training stream."""
    return int(_permutation(n, seed, position // n)[position % n])


@dataclasses.dataclass(frozen=True)
class Augmentation:
    flip: float = 0.5  # probability of a horizontal flip
    jitter: float = 0.2  # relative resize jitter


class ExampleLoader:
    """``(step, slot) -> example`` for one model and training set: the network input and, when ``with_targets``,
    its labels or padded ground truth (``gt_boxes`` xyxy in input pixels, ``gt_classes``, ``gt_mask``; Faster
    R-CNN gets them as ``model_targets`` with a sampling key ``(seed, position)``)."""

    def __init__(self, model: Model, data: TrainingSet, batch_size: int, seed: int, augmentation: Augmentation,
                 with_targets: bool):
        self.model, self.data, self.batch_size, self.seed = model, data, batch_size, seed
        self.augmentation, self.with_targets = augmentation, with_targets
        self.task = models.get_architecture(model.arch).task
        if self.task == "detection":
            from xprune_jax.evaluation.coco import pipeline_for

            self.pipeline = pipeline_for(model)
            self.side = getattr(self.pipeline, "square_side", None) or self.pipeline.imgsz
            counts = [len(t[0]) for t in data.targets] if data.targets else [0]
            self.max_boxes = max(8, -(-max(counts) // 8) * 8)  # one padded size per run: one compilation

    def __call__(self, step: int, slot: int) -> dict:
        position = step * self.batch_size + slot
        index = example_index(len(self.data.paths), self.seed, position)
        rng = np.random.default_rng([self.seed, 1, step, slot])
        flip = rng.uniform() < self.augmentation.flip
        image = load_rgb(self.data.paths[index])
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.task == "classification":
            return self._classification(image, index, rng)
        return self._detection(np.asarray(image), index, rng, flip, position)

    def _classification(self, image, index, rng) -> dict:
        p = self.model.meta["preprocess"]
        resize = max(p["crop"], int(round(p["resize"] * rng.uniform(1.0, 1.0 + self.augmentation.jitter))))
        array = classification_transform(image, resize, p["crop"], p["mean"], p["std"], p.get("interpolation", "bilinear"),
                                         position=(rng.uniform(), rng.uniform()))
        example = {"images": array}
        if self.with_targets:
            example["labels"] = np.int32(self.data.labels[index])
        return example

    def _scaled_pipeline(self, scale: float):
        if hasattr(self.pipeline, "imgsz"):
            return dataclasses.replace(self.pipeline, imgsz=max(32, int(round(self.pipeline.imgsz * scale))))
        spec = self.model.spec
        t = spec.transform
        transform = dataclasses.replace(t, min_size=max(1, int(round(t.min_size * scale))),
                                        max_size=max(1, int(round(t.max_size * scale))))
        return dataclasses.replace(self.pipeline, module=models.build(self.model.arch,
                                                                      dataclasses.replace(spec, transform=transform)))

    def _detection(self, image: np.ndarray, index: int, rng, flip: bool, position: int) -> dict:
        pipeline = self._scaled_pipeline(rng.uniform(1.0 - self.augmentation.jitter, 1.0))
        array, meta = pipeline.preprocess(image, (self.side, self.side))
        if not self.with_targets:
            return {"images": array}
        boxes, classes = self.data.targets[index]
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        if flip:
            width = image.shape[1]
            xyxy = np.stack([width - xyxy[:, 2], xyxy[:, 1], width - xyxy[:, 0], xyxy[:, 3]], axis=1)
        xyxy = pipeline.to_input(xyxy, meta).reshape(-1, 4)
        n, pad = len(boxes), self.max_boxes - len(boxes)
        targets = {"gt_boxes": np.pad(xyxy, ((0, pad), (0, 0))).astype(np.float32),
                   "gt_classes": np.pad(classes, (0, pad)).astype(np.int32), "gt_mask": np.arange(self.max_boxes) < n}
        if self.model.arch.startswith("fasterrcnn"):
            return {"images": array, "model_targets": {**targets, "keys": np.array([self.seed, position], np.uint32)}}
        return {"images": array, **targets}


def batches(load: ExampleLoader, start: int, stop: int, workers: int = 4, ahead: int = 2,
            slots: range | None = None) -> Iterator[tuple[int, dict]]:
    """``(step, batch)`` for ``start <= step < stop``, decoded and augmented ``ahead`` batches in advance by
    ``workers`` threads; each batch is a dict of stacked arrays: the examples of ``slots`` (default: the
    whole batch; in a multi-process run, this process's rows)."""
    import jax

    slots = range(load.batch_size) if slots is None else slots

    def submit(pool, step):
        return [pool.submit(load, step, slot) for slot in slots]

    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        pending = collections.deque((step, submit(pool, step)) for step in range(start, min(stop, start + ahead)))
        while pending:
            step, futures = pending.popleft()
            if step + ahead < stop:
                pending.append((step + ahead, submit(pool, step + ahead)))
            examples = [f.result() for f in futures]
            yield step, jax.tree_util.tree_map(lambda *x: np.stack(x), *examples)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

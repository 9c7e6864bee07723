"""The JAX YOLOv8 detection loss against Ultralytics 8.4.190's own ``v8DetectionLoss``, on the float32
torch model of tests/test_yolov8.py and its converted Flax model, with the real COCO ground truth of
the letterboxed test images (crowd boxes excluded, as Ultralytics' COCO labels)."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from ultralytics.cfg import get_cfg
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.ops import xywh2xyxy

from tests.test_yolov8 import IMGSZ, _apply, batch, checkpoint, converted  # noqa: F401 (pytest fixtures)
from xprune_jax import models
from xprune_jax.losses import detection_loss, head_maps_from_intermediates, model_loss
from xprune_jax.models.yolov8_pipeline import YOLOv8Pipeline

MAX_BOXES = 32  # static padding of the ground truth per image


@pytest.fixture(scope="module")
def ground_truth(coco_root, coco_images, batch):
    """Per image of ``batch`` (its order): (classes 0..79, xyxy boxes in input pixels), from the COCO json
    mapped through the letterbox recorded in the batch's metas."""
    images = [p for p in coco_images[:12] if (lambda s: s[0] > s[1])(Image.open(p).size)][:3]
    pipeline = YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec(), imgsz=IMGSZ)
    (plan,) = pipeline.plan([Image.open(p).size[::-1] for p in images], batch_size=4)
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    category_index = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    out = []
    for index, meta in zip(plan.indices, batch.metas):
        image_id = int(images[index].stem)
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a.get("iscrowd", 0)]
        (gain_y, gain_x), (pad_x, pad_y) = meta.gain, meta.pad
        boxes = np.array([[x * gain_x + pad_x, y * gain_y + pad_y, (x + w) * gain_x + pad_x, (y + h) * gain_y + pad_y]
                          for x, y, w, h in (a["bbox"] for a in anns)], np.float64).reshape(-1, 4)
        out.append((np.array([category_index[a["category_id"]] for a in anns], np.int64), boxes))
    return out


def _targets(ground_truth, images: list[int], empty: set[int], shape):
    """Ultralytics' batch (normalised xywh) and the same boxes as padded xyxy pixels, computed with
    Ultralytics' own ops so both losses see identical float32 boxes."""
    height, width = shape
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    batch_idx, classes, bboxes = [], [], []
    gt_boxes = np.zeros((len(images), MAX_BOXES, 4), np.float32)
    gt_classes = np.zeros((len(images), MAX_BOXES), np.int32)
    gt_mask = np.zeros((len(images), MAX_BOXES), bool)
    for slot, i in enumerate(images):
        if i in empty:
            continue
        cls, xyxy = ground_truth[i]
        xyxy = np.clip(xyxy, 0, [width, height, width, height])  # as Ultralytics' labels, clipped to the image
        xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                         xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], -1) / [width, height, width, height]
        normalised = torch.from_numpy(xywh.astype(np.float32))
        n = len(cls)
        assert 0 < n <= MAX_BOXES
        batch_idx.append(torch.full((n,), float(slot)))
        classes.append(torch.from_numpy(cls.astype(np.float32)))
        bboxes.append(normalised)
        gt_boxes[slot, :n] = xywh2xyxy(normalised * scale).numpy()
        gt_classes[slot, :n] = cls
        gt_mask[slot, :n] = True
    cat = lambda parts, shape: torch.cat(parts) if parts else torch.zeros(shape)  # noqa: E731
    torch_batch = {"batch_idx": cat(batch_idx, (0,)), "cls": cat(classes, (0,)).view(-1, 1),
                   "bboxes": cat(bboxes, (0, 4))}
    return torch_batch, gt_boxes, gt_classes, gt_mask


def _torch_loss(torch_model, images, torch_batch):
    """Ultralytics' loss on the eval-mode model's raw head outputs (BatchNorm on running statistics,
    as the Flax model) and the gradient of the summed loss w.r.t. those raw outputs."""
    torch_model.args = get_cfg()  # default.yaml: box 7.5, cls 0.5, dfl 1.5
    criterion = v8DetectionLoss(torch_model)
    with torch.no_grad():
        _, preds = torch_model(images)
    preds = {"boxes": preds["boxes"].clone().requires_grad_(), "scores": preds["scores"].clone().requires_grad_(),
             "feats": preds["feats"]}
    loss, items = criterion(preds, torch_batch)
    loss.sum().backward()
    items = items if torch.is_tensor(items) else torch.stack(list(items.values()))  # box, cls, dfl
    return loss.detach().numpy(), items.numpy(), preds


def _maps_from_torch(preds, sizes):
    """Ultralytics' ``[B, C, A]`` raw outputs -> per-level channels-last maps."""
    boxes, scores = preds["boxes"].detach().numpy(), preds["scores"].detach().numpy()
    box_maps, class_maps, start = [], [], 0
    for h, w in sizes:
        box_maps.append(np.moveaxis(boxes[:, :, start:start + h * w], 1, 2).reshape(-1, h, w, boxes.shape[1]))
        class_maps.append(np.moveaxis(scores[:, :, start:start + h * w], 1, 2).reshape(-1, h, w, scores.shape[1]))
        start += h * w
    return box_maps, class_maps


def _rel(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.maximum(np.abs(want), 1e-12)))


@pytest.mark.parametrize("case", ["several_and_none", "all_three", "all_empty"])
def test_loss_matches_ultralytics(case, checkpoint, converted, batch, ground_truth):
    """Two images: the one with most objects and another whose ground truth is dropped (an image with no
    objects); the three images with their ground truth; two images without any object (Ultralytics'
    no-target path)."""
    _, torch_model = checkpoint("n")
    model = converted("n")
    most = int(np.argmax([len(cls) for cls, _ in ground_truth]))
    other = (most + 1) % 3
    images, empty = {"several_and_none": ([most, other], {other}), "all_three": ([0, 1, 2], set()),
                     "all_empty": ([most, other], {most, other})}[case]
    torch_batch, gt_boxes, gt_classes, gt_mask = _targets(ground_truth, images, empty, batch.shape)
    if case == "several_and_none":
        assert gt_mask[0].sum() >= 5 and gt_mask[1].sum() == 0
    want, want_items, preds = _torch_loss(torch_model, batch.nchw[images], torch_batch)
    sizes = [tuple(f.shape[2:]) for f in preds["feats"]]

    loss_fn = jax.jit(jax.value_and_grad(
        lambda maps, *gt: (lambda r: (r["total"], r))(detection_loss(*maps, *gt)), has_aux=True))
    # 1. the same raw maps as Ultralytics: only the loss differs
    (total, got), grads = loss_fn(_maps_from_torch(preds, sizes), gt_boxes, gt_classes, gt_mask)
    assert _rel(got["loss"], want) < 1e-4, (np.asarray(got["loss"]), want)
    assert _rel([got["box"], got["cls"], got["dfl"]], want_items) < 1e-4
    assert abs(float(total) - want.sum()) <= 1e-4 * abs(want.sum())
    box_grads, class_grads = _maps_from_torch({"boxes": preds["boxes"].grad, "scores": preds["scores"].grad}, sizes)
    for g, w in zip((*grads[0], *grads[1]), (*box_grads, *class_grads)):
        assert np.max(np.abs(np.asarray(g) - w)) <= 1e-4 * np.max(np.abs(w)) + 1e-12

    # 2. end to end: the converted Flax model's captured head maps
    _, acts = _apply(model.module)(model.variables, batch.x[images])
    (_, got), _ = loss_fn(head_maps_from_intermediates(acts), gt_boxes, gt_classes, gt_mask)
    assert _rel(got["loss"], want) < 1e-4, (np.asarray(got["loss"]), want)


def test_weights_drop_padded_images(converted, batch, ground_truth):
    """A padded image (weight 0) changes nothing: the loss equals the loss of the valid images alone."""
    model = converted("n")
    _, gt_boxes, gt_classes, gt_mask = _targets(ground_truth, [0, 1, 2], set(), batch.shape)
    loss_fn = jax.jit(functools.partial(model_loss, model.module))
    full = loss_fn(model.variables, batch.x, gt_boxes, gt_classes, gt_mask, np.array([1.0, 1.0, 0.0], np.float32))
    part = loss_fn(model.variables, batch.x[:2], gt_boxes[:2], gt_classes[:2], gt_mask[:2])
    assert float(full["total"]) > 0 and np.all(gt_mask.sum(1) > 0)
    np.testing.assert_allclose(np.asarray(full["loss"]), np.asarray(part["loss"]), rtol=1e-5)

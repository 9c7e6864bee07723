"""Objectives: the scalar L whose gradient attribution explains, summed over the valid images of a
batch (so each image's gradient is its own dL/da, whatever the batch size). Each is called as
``objective(outputs, batch, intermediates)``: the model's outputs, the batch (``images``,
``weights`` masking padded images, and the ground truth where the objective needs it) and the
captured intermediates (nested, as Flax returns them)."""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from xprune_jax.detection import CONFIDENCE_TOP_K
from xprune_jax.errors import UserError

OBJECTIVES: dict[str, Callable] = {}
DEFAULT_OBJECTIVE = {"classification": "cross_entropy", "detection": "confidence"}


def register(name: str):
    def decorator(fn):
        OBJECTIVES[name] = fn
        return fn

    return decorator


@register("cross_entropy")
def cross_entropy(logits, batch: dict, intermediates=None):
    """Cross-entropy against ``batch["labels"]`` where given (>= 0), else against the model's own
    top-1 prediction."""
    own = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    labels = jnp.where(batch["labels"] >= 0, batch["labels"], own)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * batch["weights"])


@register("confidence")
def confidence(outputs, batch: dict, intermediates=None):
    """Label-free: the sum over the valid images of each image's top-k (k = ``CONFIDENCE_TOP_K`` = 100)
    class scores before any thresholding or NMS.

    - YOLOv8 (outputs ``[B, 4 + classes, anchors]``: boxes, then class scores): the top-k of each
      anchor's best-class score.
    - RetinaNet (a dict of detections): the top-k sigmoid class scores over all anchors and classes
      of all levels.
    - Faster R-CNN (a dict of detections): the top-k of each proposal's best non-background softmax
      score from the box predictor. As in torchvision, proposals carry no gradient (the RPN's box
      deltas are detached), so the RPN head gets none.

    Detectors whose outputs are a dict provide these per-image scores as ``outputs["confidence"]``
    ``[B, k]`` (fewer than k candidates count as zeros)."""
    if isinstance(outputs, dict):
        if "confidence" not in outputs:
            raise UserError("the confidence objective needs the model's pre-NMS scores (outputs['confidence']); "
                            "this model does not provide them")
        return jnp.sum(jnp.sum(outputs["confidence"], axis=-1) * batch["weights"])
    if not hasattr(outputs, "ndim") or outputs.ndim != 3:
        raise UserError("the confidence objective reads YOLOv8-style outputs [B, 4 + classes, anchors] or a detector's "
                        "outputs['confidence']; this model's outputs are not supported")
    best = jnp.max(outputs[:, 4:, :], axis=1)
    top = jax.lax.top_k(best, min(CONFIDENCE_TOP_K, best.shape[-1]))[0]
    return jnp.sum(jnp.sum(top, axis=-1) * batch["weights"])


@register("loss")
def loss(outputs, batch: dict, intermediates):
    """The model's own training loss against the calibration images' ground truth: for YOLOv8,
    Ultralytics' v8 detection loss (task-aligned assigner, BCE, CIoU, DFL; :mod:`xprune_jax.losses.yolov8`),
    computed for each image as Ultralytics computes it for a batch of one, and summed over the valid
    images. ``batch`` carries ``gt_boxes`` ``[B, M, 4]`` (xyxy input pixels), ``gt_classes`` ``[B, M]``
    and ``gt_mask`` ``[B, M]``. BatchNorm uses the running statistics, as everywhere here. torchvision's
    detectors get :class:`TorchvisionLoss` instead (see :func:`get_objective`)."""
    from xprune_jax import models
    from xprune_jax.losses.yolov8 import detection_loss, head_maps_from_intermediates

    if "gt_boxes" not in batch:
        raise UserError("the loss objective needs the calibration images' ground truth; give a COCO root with "
                        "annotations for the calibration split")
    box_maps, class_maps = head_maps_from_intermediates(models.flatten_names(intermediates))

    def one(box_maps, class_maps, boxes, classes, mask):
        single = lambda x: x[None]  # noqa: E731
        return detection_loss(jax.tree_util.tree_map(single, box_maps), jax.tree_util.tree_map(single, class_maps),
                              boxes[None], classes[None], mask[None])["total"]

    per_image = jax.vmap(one)(box_maps, class_maps, batch["gt_boxes"], batch["gt_classes"], batch["gt_mask"])
    return jnp.sum(per_image * batch["weights"])


@dataclasses.dataclass(frozen=True)
class TorchvisionLoss:
    """The ``loss`` objective of torchvision's detectors of ``spec`` (:mod:`xprune_jax.losses.rcnn`): each
    image's training loss (the sum of torchvision's loss dict for it as a batch of one), summed over the
    valid images. ``batch`` carries the ground truth as for YOLOv8.

    - RetinaNet: the focal and L1 losses from the head outputs and FPN levels the forward captured.
    - Faster R-CNN (``model_targets``): the model runs torchvision's training forward itself (training
      RPN proposals, sampled RoIs through the box head), so the batch's ``model_targets``
      (``gt_boxes``, ``gt_classes``, ``gt_mask``, and ``keys`` ``[B, 2]`` seeding each image's anchor and
      proposal sampling) go to the model with the images, and its outputs hold the per-image losses.
    """

    spec: Any

    @property
    def model_targets(self) -> bool:
        from xprune_jax.models.rcnn import FasterRCNNSpec

        return isinstance(self.spec, FasterRCNNSpec)

    def __call__(self, outputs, batch: dict, intermediates):
        from xprune_jax import models
        from xprune_jax.models.rcnn import retinanet_intermediates_loss

        if self.model_targets:
            per_image = outputs["per_image"]
        else:
            per_image = retinanet_intermediates_loss(
                self.spec, models.flatten_names(intermediates), batch["images"].shape[1:3], batch["gt_boxes"],
                batch["gt_classes"], batch["gt_mask"])["per_image"]
        return jnp.sum(sum(per_image.values()) * batch["weights"])


LOSS_ARCHS = ("yolov8", "retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn")  # the detectors whose loss is ported


def get_objective(name: str, task: str, arch: str = "", spec: Any = None) -> tuple[str, Callable]:
    """The objective ``name`` (or the task's default) for a model; ``loss`` of a torchvision detector
    needs the model's ``spec``."""
    name = name or DEFAULT_OBJECTIVE.get(task, "")
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r} for a {task} model; choose one of: {', '.join(sorted(OBJECTIVES))}")
    if name == "loss" and not arch.startswith(LOSS_ARCHS):
        raise UserError(f"the loss objective is ported for YOLOv8, RetinaNet and Faster R-CNN only, not "
                        f"{arch or task} models; use --objective=confidence (label-free)")
    if (name == "cross_entropy") != (task == "classification"):
        raise UserError(f"objective {name!r} does not fit a {task} model; choose "
                        f"{'cross_entropy' if task == 'classification' else 'confidence or loss'}")
    if name == "loss" and not arch.startswith("yolov8"):
        return name, TorchvisionLoss(spec)
    return name, OBJECTIVES[name]

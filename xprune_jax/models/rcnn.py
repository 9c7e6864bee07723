"""torchvision's ``fasterrcnn_resnet50_fpn`` and ``retinanet_resnet50_fpn`` (COCO_V1) in Flax.

Module names are torch module paths (``backbone.fpn.inner_blocks.0.0``, ``rpn.head.cls_logits``,
``roi_heads.box_head.fc6``, ``head.classification_head.conv.0.0``), so parameter paths are the
state_dict keys and the generic converter maps them. The backbone is ResNet-50 with FrozenBN of
eps 0 (``overwrite_eps(model, 0.0)`` in the builders).

Everything has static shapes: candidates and detections are padded, with ``valid`` masks.
Models take the normalised, zero-padded batch of :class:`TorchvisionDetectionPipeline` and read
each image's unpadded size from the padding itself (no 8-bit value equals mean * 255, so a row or
column of a real image is never exactly 0 in all channels), so clipping follows torchvision's
per-image sizes while the input stays a plain ``[B, H, W, 3]`` array.

Besides every conv and linear output, the models capture ``backbone.fpn.<level>`` (the FPN
outputs under torchvision's feature names), ``rpn.objectness`` (logits ``[B, anchors]``, in
torch's (level, y, x, anchor) order) and ``rpn.proposals`` (``[B, post_nms_top_n, 4]``, by
decreasing objectness, zero where invalid).

``FasterRCNN(spec)(images, targets)`` runs torchvision's training forward and returns its losses
(:mod:`xprune_jax.losses.rcnn`); RetinaNet's loss (:func:`retinanet_intermediates_loss`) reads the head
outputs and FPN levels it captures.

Besides the padded detections, both models output ``confidence`` ``[B, CONFIDENCE_TOP_K]``: each
image's top-k class scores before any thresholding or NMS, which the label-free ``confidence``
objective sums (see :func:`xprune_jax.attribution.objectives.confidence`).

With ``return_raw=True`` both also output ``raw``, the network's outputs before any post-processing
(at least float32 whatever the parameters' dtype). Given another forward's ``raw`` on the same images as
``candidates_from``, the post-processing reads it instead of this network's: the network runs as
usual and its own ``raw`` is returned, but the candidates that reach top-k and NMS are the other
model's. Latency ratios of pruned models use it to time their networks with the post-processing's
work held fixed (a pruned network's scores change how many boxes pass the thresholds). Gradients follow
torchvision's graph: the RPN's box deltas (and objectness) are detached where proposals are decoded
and selected, so proposals carry no gradient into the RPN head.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax.detection import CONFIDENCE_TOP_K
from xprune_jax.detection import BatchPlan, batches_by_shape
from xprune_jax.losses.rcnn import (FasterRCNNLossConfig, RetinaNetLossConfig, fastrcnn_loss, retinanet_head_outputs,
                                     retinanet_loss, roi_training_samples, rpn_loss)
from xprune_jax.models.layers import (INTERMEDIATES, PERTURBATIONS, Conv2d, Edits, Linear, at_least_float32, capture,
                                      edited)
from xprune_jax.models.mobilenet_v3 import MobileNetV3Backbone, MobileNetV3Spec, mobilenet_v3_large_spec
from xprune_jax.models.resnet import ResNetBackbone, ResNetSpec, resnet_spec
from xprune_jax.ops import (BoxCoder, batched_nms, clip_boxes_to_image, grid_anchors, multiscale_roi_align,
                            small_box_mask, top_k_pairs)
from xprune_jax.spec import register_spec

RPN_MIN_BOX_SIZE = 1e-3  # torchvision's RegionProposalNetwork.min_size
DETECTION_MIN_BOX_SIZE = 1e-2  # RoIHeads.postprocess_detections' remove_small_boxes


@register_spec
@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """``GeneralizedRCNNTransform`` at test time."""

    min_size: int = 800
    max_size: int = 1333
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    size_divisible: int = 32


@register_spec
@dataclasses.dataclass(frozen=True)
class FasterRCNNSpec:
    """Widths left None are ``fpn_width`` (the FPN's lateral convs, the RPN's conv) or
    ``representation_size`` (fc7): torchvision's; width pruning sets them."""

    body: ResNetSpec
    fpn_stages: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
    fpn_width: int = 256  # the FPN's outputs, which the RPN and the RoI heads read
    fpn_inner_width: int | None = None  # the lateral convs' outputs, summed top-down
    rpn_width: int | None = None  # the RPN head's 3x3 conv
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))  # per level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n: int = 1000  # per level
    rpn_post_nms_top_n: int = 1000  # per image
    rpn_nms_thresh: float = 0.7
    rpn_score_thresh: float = 0.0
    roi_size: int = 7
    roi_sampling_ratio: int = 2
    representation_size: int = 1024  # fc6
    fc7_width: int | None = None
    num_classes: int = 91  # with background
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    transform: TransformSpec = TransformSpec()
    edits: Edits = Edits()


@register_spec
@dataclasses.dataclass(frozen=True)
class FasterRCNNMobileNetSpec(FasterRCNNSpec):
    """``fasterrcnn_mobilenet_v3_large_fpn``: the same detector over MobileNetV3-Large's features 13 and 16 (both
    at stride 32), with five anchor sizes on each of the three levels."""

    body: MobileNetV3Spec
    fpn_stages: tuple[str, ...] = ("13", "16")
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32, 64, 128, 256, 512),) * 3
    rpn_score_thresh: float = 0.05


@register_spec
@dataclasses.dataclass(frozen=True)
class RetinaNetSpec:
    """Widths left None are ``fpn_width``: torchvision's; width pruning sets them."""

    body: ResNetSpec
    fpn_stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    fpn_width: int = 256  # the FPN's outputs (P6 and P7 too), which both subnets read
    fpn_inner_width: int | None = None  # the lateral convs' outputs, summed top-down
    anchor_sizes: tuple[tuple[int, ...], ...] = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3)))
                                                      for x in (32, 64, 128, 256, 512))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    head_depth: int = 4  # 3x3 conv + ReLU layers in each subnet
    classification_widths: tuple[int, ...] | None = None  # of those layers, head_depth of them
    regression_widths: tuple[int, ...] | None = None
    num_classes: int = 91
    topk_candidates: int = 1000  # per level
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    transform: TransformSpec = TransformSpec()
    edits: Edits = Edits()


def widths(spec: "FasterRCNNSpec | RetinaNetSpec") -> dict[str, "int | tuple[int, ...]"]:
    """Every width field of the FPN and the heads, by field name, the None defaults filled in."""
    out = {"fpn_width": spec.fpn_width, "fpn_inner_width": spec.fpn_inner_width or spec.fpn_width}
    if isinstance(spec, FasterRCNNSpec):
        return {**out, "rpn_width": spec.rpn_width or spec.fpn_width, "representation_size": spec.representation_size,
                "fc7_width": spec.fc7_width or spec.representation_size}
    return {**out, **{f"{subnet}_widths": getattr(spec, f"{subnet}_widths") or (spec.fpn_width,) * spec.head_depth
                      for subnet in ("classification", "regression")}}


def _frozen_bn_resnet50() -> ResNetSpec:
    return dataclasses.replace(resnet_spec("resnet50"), bn_eps=0.0)


def fasterrcnn_resnet50_fpn_spec() -> FasterRCNNSpec:
    return FasterRCNNSpec(_frozen_bn_resnet50())


def fasterrcnn_mobilenet_v3_large_fpn_spec() -> FasterRCNNMobileNetSpec:
    return FasterRCNNMobileNetSpec(mobilenet_v3_large_spec())


def retinanet_resnet50_fpn_spec() -> RetinaNetSpec:
    return RetinaNetSpec(_frozen_bn_resnet50())


def capture_as(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """:func:`~xprune_jax.models.layers.capture` under ``<module path>.<name>``."""
    x = module.perturb(name, x, collection=PERTURBATIONS)
    module.sow(INTERMEDIATES, name, x, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    return x


def unpadded_sizes(images: jax.Array) -> jax.Array:
    """``[B, 2]`` float (height, width) of each image's content: up to its last non-zero row/column."""
    nonzero = images != 0
    rows = jnp.any(nonzero, axis=(2, 3))
    cols = jnp.any(nonzero, axis=(1, 3))
    height = jnp.max(jnp.where(rows, jnp.arange(1, rows.shape[1] + 1), 0), axis=1)
    width = jnp.max(jnp.where(cols, jnp.arange(1, cols.shape[1] + 1), 0), axis=1)
    return jnp.stack([height, width], axis=1).astype(jnp.float32)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's ``interpolate(mode="nearest", size=...)`` along one axis."""
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


class FeaturePyramidNetwork(nn.Module):
    """``FeaturePyramidNetwork`` with ``LastLevelMaxPool`` (extra "pool") or ``LastLevelP6P7`` from
    P5 (extra "p6p7"). Returns the levels finest first, named as torchvision's feature dict."""

    width: int
    inner_width: int
    extra: str  # "pool" | "p6p7"

    @nn.compact
    def __call__(self, stages: list[jax.Array]) -> list[jax.Array]:
        laterals = [Conv2d(self.inner_width, 1, use_bias=True, name=f"inner_blocks.{i}.0")(x)
                    for i, x in enumerate(stages)]
        last = laterals[-1]
        levels = [Conv2d(self.width, 3, use_bias=True, name=f"layer_blocks.{len(stages) - 1}.0")(last)]
        for i in range(len(stages) - 2, -1, -1):
            (height, width), (in_h, in_w) = laterals[i].shape[1:3], last.shape[1:3]
            last = laterals[i] + last[:, _nearest_indices(in_h, height)][:, :, _nearest_indices(in_w, width)]
            levels.insert(0, Conv2d(self.width, 3, use_bias=True, name=f"layer_blocks.{i}.0")(last))
        if self.extra == "pool":  # max_pool2d(kernel 1, stride 2) is a subsampling
            levels.append(levels[-1][:, ::2, ::2])
        else:
            p6 = Conv2d(self.width, 3, 2, use_bias=True, name="extra_blocks.p6")(levels[-1])
            levels += [p6, Conv2d(self.width, 3, 2, use_bias=True, name="extra_blocks.p7")(nn.relu(p6))]
        return [capture_as(self, name, level) for name, level in zip(fpn_level_names(len(stages), self.extra), levels)]


def fpn_level_names(num_stages: int, extra: str) -> list[str]:
    """torchvision's feature names of the FPN levels: the stages, then "pool" or "p6", "p7"."""
    return [str(i) for i in range(num_stages)] + (["pool"] if extra == "pool" else ["p6", "p7"])


class SharedConv2d(nn.Module):
    """A ``torch.nn.Conv2d`` (stride 1, bias) that a head applies to every level.

    Its output is captured once, all levels packed as ``[B, sum_l H_l * W_l, C]``, so that the
    layer's activation and gradient cover every level it runs on.
    """

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, levels: list[jax.Array]) -> list[jax.Array]:
        k, pad = self.kernel_size, self.kernel_size // 2
        features = self.get_variable("params", "kernel").shape[-1] if self.has_variable("params", "kernel") else self.features
        kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                            (k, k, levels[0].shape[-1], features))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        outputs = [jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias.astype(x.dtype)
                   for x in levels]
        packed = capture(self, jnp.concatenate([y.reshape(y.shape[0], -1, features) for y in outputs], axis=1))
        split_at = np.cumsum([y.shape[1] * y.shape[2] for y in outputs])[:-1]
        return [part.reshape(y.shape) for part, y in zip(jnp.split(packed, split_at, axis=1), outputs)]


def _relu(levels: list[jax.Array]) -> list[jax.Array]:
    return [nn.relu(x) for x in levels]


def _anchors(spec, levels: list[jax.Array], input_shape: tuple[int, int]) -> list[np.ndarray]:
    """The AnchorGenerator's anchors, split per level (NumPy constants: the shapes are static)."""
    feature_sizes = [level.shape[1:3] for level in levels]
    anchors = grid_anchors(spec.anchor_sizes, (spec.aspect_ratios,) * len(levels), feature_sizes, input_shape)
    counts = [h * w * len(spec.aspect_ratios) * len(sizes) for (h, w), sizes in zip(feature_sizes, spec.anchor_sizes)]
    return np.split(anchors, np.cumsum(counts)[:-1])


def anchors_from_intermediates(spec: "FasterRCNNSpec | RetinaNetSpec", intermediates: dict,
                               input_shape: tuple[int, int]) -> np.ndarray:
    """The anchors ``[A, 4]`` of one forward, in torchvision's order, from its captured (flattened) FPN levels."""
    extra = "pool" if isinstance(spec, FasterRCNNSpec) else "p6p7"
    levels = [intermediates[f"backbone.fpn.{name}"] for name in fpn_level_names(len(spec.fpn_stages), extra)]
    return np.concatenate(_anchors(spec, levels, input_shape))


def retinanet_intermediates_loss(spec, intermediates: dict, input_shape: tuple[int, int], gt_boxes, gt_classes,
                                 gt_mask, config: RetinaNetLossConfig = RetinaNetLossConfig()) -> dict:
    """:func:`retinanet_loss` of one forward of the Flax RetinaNet of ``spec``, from its captured
    (flattened) intermediates: the head outputs and the anchors of its FPN levels."""
    cls_logits, bbox_regression = retinanet_head_outputs(intermediates, spec.num_classes)
    anchors = anchors_from_intermediates(spec, intermediates, input_shape)
    return retinanet_loss(cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_mask, config)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[b, index[b]]`` for ``x [B, N, ...]`` and ``index [B, K]``."""
    return jax.vmap(lambda rows, i: rows[i])(x, index)


class RegionProposalNetwork(nn.Module):
    """``RPNHead`` and proposal selection (:func:`rpn_proposals`, on ``candidates_from``'s objectness and
    deltas where given), with the spec's top-n (torchvision's training values for the training forward).
    Returns ``(proposals, valid, (objectness [B, A], deltas [B, A, 4], anchors [A, 4]))``, the head
    outputs in torchvision's order for the loss."""

    spec: FasterRCNNSpec

    @nn.compact
    def __call__(self, levels, image_sizes, input_shape, candidates_from: dict | None = None):
        s = self.spec
        num_anchors = len(s.aspect_ratios) * len(s.anchor_sizes[0])
        batch = levels[0].shape[0]
        t = _relu(SharedConv2d(widths(s)["rpn_width"], 3, name="head.conv.0.0")(levels))
        head_logits = SharedConv2d(num_anchors, 1, name="head.cls_logits")(t)
        head_deltas = SharedConv2d(4 * num_anchors, 1, name="head.bbox_pred")(t)
        # (y, x, anchor) order within each level, as torch's permute_and_flatten; at least float32 from here on.
        objectness = capture_as(self, "objectness", at_least_float32(jnp.concatenate(
            [x.reshape(batch, -1) for x in head_logits], axis=1)))
        deltas = at_least_float32(jnp.concatenate([d.reshape(batch, -1, 4) for d in head_deltas], axis=1))
        level_anchors = _anchors(s, levels, input_shape)
        source = candidates_from or {"objectness": objectness, "rpn_deltas": deltas}
        # torchvision detaches the objectness and the box deltas here: proposals carry no gradient.
        proposals, valid = rpn_proposals(s, jax.lax.stop_gradient(source["objectness"]),
                                         jax.lax.stop_gradient(source["rpn_deltas"]), level_anchors, image_sizes)
        # As in torchvision (proposals from detached deltas; roi_align gives boxes no gradient), none flows here.
        return (jax.lax.stop_gradient(capture_as(self, "proposals", proposals)), valid,
                (objectness, deltas, np.concatenate(level_anchors)))


def rpn_candidates(spec: FasterRCNNSpec, objectness, deltas, level_anchors: list[np.ndarray]):
    """Per level the top-n objectness logits, their boxes decoded, and their level ids: ``(boxes [B, N, 4],
    logits [B, N], level_ids [N])`` from ``objectness [B, A]`` and ``deltas [B, A, 4]``."""
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    split_at = np.cumsum([len(a) for a in level_anchors])[:-1]
    top_logits, top_boxes, level_ids = [], [], []
    for level, (logits, level_deltas, anchors) in enumerate(
            zip(jnp.split(objectness, split_at, axis=1), jnp.split(deltas, split_at, axis=1), level_anchors)):
        logits_top, index = jax.lax.top_k(logits, min(spec.rpn_pre_nms_top_n, logits.shape[1]))
        top_logits.append(logits_top)
        top_boxes.append(coder.decode(_gather(level_deltas, index), jnp.asarray(anchors)[index]))
        level_ids.append(np.full(index.shape[1], level, np.int32))
    return (jnp.concatenate(top_boxes, axis=1), jnp.concatenate(top_logits, axis=1),
            jnp.asarray(np.concatenate(level_ids)))


def rpn_select(spec: FasterRCNNSpec, boxes, logits, level_ids, image_sizes):
    """Each image's proposals ``[B, post_nms_top_n, 4]`` (zero where not ``valid``) from its candidates:
    clipped, small boxes dropped, NMS per level, by decreasing objectness."""

    def select(boxes, logits, image_size):
        scores = jax.nn.sigmoid(logits)
        boxes = clip_boxes_to_image(boxes, image_size[0], image_size[1])
        candidates = small_box_mask(boxes, RPN_MIN_BOX_SIZE) & (scores >= spec.rpn_score_thresh)
        keep, valid = batched_nms(boxes, scores, level_ids, candidates, spec.rpn_nms_thresh, spec.rpn_post_nms_top_n)
        return jnp.where(valid[:, None], boxes[keep], 0.0), valid

    return jax.vmap(select)(boxes, logits, image_sizes)


def rpn_proposals(spec: FasterRCNNSpec, objectness, deltas, level_anchors: list[np.ndarray], image_sizes):
    """torchvision's ``RegionProposalNetwork.filter_proposals``: :func:`rpn_candidates`, then :func:`rpn_select`."""
    return rpn_select(spec, *rpn_candidates(spec, objectness, deltas, level_anchors), image_sizes)


def _padded_detections(boxes, scores, labels, keep, valid) -> dict:
    return {"boxes": jnp.where(valid[:, None], boxes[keep], 0.0), "scores": jnp.where(valid, scores[keep], 0.0),
            "labels": jnp.where(valid, labels[keep], 0).astype(jnp.int32), "valid": valid}


class RoIHeads(nn.Module):
    """``MultiScaleRoIAlign`` + ``TwoMLPHead`` + ``FastRCNNPredictor``: RoIs ``[B, R, 4]`` -> class logits
    ``[B, R, C]`` and per-class box deltas ``[B, R, C, 4]`` (at least float32)."""

    spec: FasterRCNNSpec

    @nn.compact
    def __call__(self, levels, rois, input_shape):
        s = self.spec
        batch, num_rois = rois.shape[:2]
        pooled = multiscale_roi_align(levels, rois, input_shape, s.roi_size, s.roi_sampling_ratio).astype(levels[0].dtype)
        x = pooled.transpose(0, 1, 4, 2, 3).reshape(batch * num_rois, -1)  # torch's (C, H, W) flatten for fc6
        x = nn.relu(Linear(s.representation_size, name="box_head.fc6")(x))
        x = nn.relu(Linear(widths(s)["fc7_width"], name="box_head.fc7")(x))
        logits = Linear(s.num_classes, name="box_predictor.cls_score")(x).reshape(batch, num_rois, -1)
        deltas = Linear(4 * s.num_classes, name="box_predictor.bbox_pred")(x).reshape(batch, num_rois, -1, 4)
        return at_least_float32(logits), at_least_float32(deltas)


def roi_detections(spec: FasterRCNNSpec, logits, deltas, proposals, valid, image_sizes) -> dict:
    """``RoIHeads.postprocess_detections`` (decode, softmax, per-class NMS) for each image, plus its
    label-free confidence."""
    return jax.vmap(functools.partial(_roi_detections, spec))(logits, deltas, proposals, valid, image_sizes)


def _roi_detections(s: FasterRCNNSpec, logits, deltas, proposals, valid, image_size):
    boxes = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, proposals[:, None])
    boxes = clip_boxes_to_image(boxes, image_size[0], image_size[1])[:, 1:].reshape(-1, 4)  # drop background
    scores = jax.nn.softmax(logits, axis=-1)[:, 1:]
    # Label-free confidence: the top-k of each valid proposal's best non-background score.
    best = jnp.where(valid, jnp.max(scores, axis=-1), 0.0)
    confidence = jax.lax.top_k(best, min(CONFIDENCE_TOP_K, best.shape[0]))[0]
    labels = jnp.broadcast_to(jnp.arange(1, s.num_classes, dtype=jnp.int32), scores.shape).reshape(-1)
    candidates = jnp.broadcast_to(valid[:, None], scores.shape).reshape(-1)
    scores = scores.reshape(-1)
    candidates &= (scores > s.score_thresh) & small_box_mask(boxes, DETECTION_MIN_BOX_SIZE)
    keep, kept = batched_nms(boxes, scores, labels, candidates, s.nms_thresh, s.detections_per_img)
    return {**_padded_detections(boxes, scores, labels, keep, kept), "confidence": confidence}


class FasterRCNN(nn.Module):
    """``[B, H, W, 3]`` normalised padded images -> padded detections in input pixels.

    With ``return_raw``, the output also holds ``raw``: the RPN head's ``objectness [B, A]`` and
    ``rpn_deltas [B, A, 4]``, the ``proposals [B, R, 4]`` and the RoI heads' ``class_logits [B, R, C]``
    and ``box_deltas [B, R, C, 4]``. With ``candidates_from`` (such a ``raw``), proposals are selected
    from its RPN outputs and detections made from its RoI head outputs, while this network's RoI heads
    run on its proposals (see the module docstring).

    With ``targets`` (``gt_boxes``, ``gt_classes``, ``gt_mask`` as in :mod:`xprune_jax.losses.rcnn`, and
    ``keys`` ``[B, 2]`` uint32, each image's sampling key: ``jax.random.split(keys[i])`` gives its RPN's
    and its RoI heads' keys) it runs torchvision's training forward instead (``model.train()(images,
    targets)``; FrozenBN, so BatchNorm is unchanged): RPN proposals with the training top-n, its loss,
    the RoI heads on the sampled proposals and their loss. Returns torchvision's loss dict plus
    ``per_image`` (each image's losses as torchvision computes them for a batch of one).

    With ``rois`` ``[B, R, 4]`` (e.g. a teacher's proposals, for distillation) the box head also runs on
    them, and the outputs (the loss dict, or without ``targets`` an empty dict: the RPN still runs and
    captures its head outputs) gain ``rois_logits`` ``[B, R, C]`` and ``rois_deltas`` ``[B, R, C, 4]``.
    """

    spec: FasterRCNNSpec

    @nn.compact
    def __call__(self, images, targets: dict | None = None, rois=None, candidates_from: dict | None = None,
                 return_raw: bool = False):
        with edited(self.spec.edits):
            return self._forward(images, targets, rois, candidates_from, return_raw)

    def _forward(self, images, targets, rois, candidates_from, return_raw):
        s, input_shape, image_sizes = self.spec, images.shape[1:3], unpadded_sizes(images)
        backbone = MobileNetV3Backbone if isinstance(s.body, MobileNetV3Spec) else ResNetBackbone
        stages = backbone(s.body, name="backbone.body")(images)
        levels = FeaturePyramidNetwork(s.fpn_width, widths(s)["fpn_inner_width"], "pool", name="backbone.fpn")([stages[k] for k in s.fpn_stages])
        roi_heads = RoIHeads(s, name="roi_heads")
        if targets is None and rois is None:
            proposals, valid, (objectness, rpn_deltas, _) = RegionProposalNetwork(s, name="rpn")(
                levels, image_sizes, input_shape, candidates_from)
            rois = proposals if candidates_from is None else candidates_from["proposals"]
            logits, deltas = roi_heads(levels[:-1], rois, input_shape)
            raw = {"objectness": objectness, "rpn_deltas": rpn_deltas, "proposals": rois, "class_logits": logits,
                   "box_deltas": deltas}
            source = candidates_from or raw
            detections = roi_detections(s, source["class_logits"], source["box_deltas"], proposals, valid, image_sizes)
            return {**detections, "raw": raw} if return_raw or candidates_from is not None else detections
        out = {}
        if targets is None:
            RegionProposalNetwork(s, name="rpn")(levels, image_sizes, input_shape)
        else:
            config = FasterRCNNLossConfig()
            train_spec = dataclasses.replace(s, rpn_pre_nms_top_n=config.rpn_pre_nms_top_n,
                                             rpn_post_nms_top_n=config.rpn_post_nms_top_n)
            proposals, valid, (objectness, deltas, anchors) = RegionProposalNetwork(train_spec, name="rpn")(
                levels, image_sizes, input_shape)
            keys = jax.vmap(jax.random.split)(targets["keys"])
            rpn = rpn_loss(objectness, deltas, anchors, targets["gt_boxes"], targets["gt_mask"], keys[:, 0], config)
            samples = roi_training_samples(proposals, valid, targets["gt_boxes"], targets["gt_classes"],
                                           targets["gt_mask"], keys[:, 1], config)
            roi = fastrcnn_loss(*roi_heads(levels[:-1], samples["rois"], input_shape), samples, config.beta)
            out = {**{k: v for k, v in {**rpn, **roi}.items() if k != "per_image"},
                   "per_image": {**rpn["per_image"], **roi["per_image"]}}
        if rois is not None:
            out["rois_logits"], out["rois_deltas"] = roi_heads(levels[:-1], rois, input_shape)
        return out


class RetinaNetHead(nn.Module):
    """Classification and regression subnets, shared over levels: ``(logits [B, HWA, K],
    deltas [B, HWA, 4])`` per level, in torch's (y, x, anchor) order, at least float32."""

    spec: RetinaNetSpec

    @nn.compact
    def __call__(self, levels):
        s = self.spec
        num_anchors = len(s.aspect_ratios) * len(s.anchor_sizes[0])

        def subnet(prefix: str, last: str, outputs: int) -> list[jax.Array]:
            x = levels
            for i, width in enumerate(widths(s)[prefix.replace("_head", "_widths")]):
                x = _relu(SharedConv2d(width, 3, name=f"{prefix}.conv.{i}.0")(x))
            return SharedConv2d(outputs, 3, name=f"{prefix}.{last}")(x)

        logits = subnet("classification_head", "cls_logits", num_anchors * s.num_classes)
        deltas = subnet("regression_head", "bbox_reg", 4 * num_anchors)
        return [(at_least_float32(c.reshape(c.shape[0], -1, s.num_classes)), at_least_float32(r.reshape(r.shape[0], -1, 4)))
                for c, r in zip(logits, deltas)]


class RetinaNet(nn.Module):
    """``[B, H, W, 3]`` normalised padded images -> padded detections in input pixels.

    With ``return_raw``, the output also holds ``raw``: the head's ``logits`` and ``deltas``, one array per
    level. ``candidates_from`` (such a ``raw``) is post-processed instead of this network's own (see the
    module docstring).
    """

    spec: RetinaNetSpec

    @nn.compact
    def __call__(self, images, candidates_from: dict | None = None, return_raw: bool = False):
        with edited(self.spec.edits):
            return self._forward(images, candidates_from, return_raw)

    def _forward(self, images, candidates_from, return_raw):
        s, input_shape, image_sizes = self.spec, images.shape[1:3], unpadded_sizes(images)
        stages = ResNetBackbone(s.body, name="backbone.body")(images)
        levels = FeaturePyramidNetwork(s.fpn_width, widths(s)["fpn_inner_width"], "p6p7", name="backbone.fpn")([stages[k] for k in s.fpn_stages])
        head = RetinaNetHead(s, name="head")(levels)
        raw = {"logits": [logits for logits, _ in head], "deltas": [deltas for _, deltas in head]}
        source = candidates_from or raw
        boxes, scores, labels, confidence = retinanet_candidates(s, source["logits"], source["deltas"],
                                                                 _anchors(s, levels, input_shape))
        detections = {**retinanet_nms(s, boxes, scores, labels, image_sizes), "confidence": confidence}
        return {**detections, "raw": raw} if return_raw or candidates_from is not None else detections


def retinanet_candidates(spec: RetinaNetSpec, logits: list, deltas: list, level_anchors: list[np.ndarray]):
    """Per level, the top-k (anchor, class) scores above the threshold, their boxes decoded: ``(boxes [B, N, 4],
    scores [B, N], labels [B, N], confidence [B, CONFIDENCE_TOP_K])``; -inf scores mark no candidate."""
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    scores, boxes, labels, confidence = [], [], [], []
    for level_logits, level_deltas, anchors in zip(logits, deltas, level_anchors):
        level_scores = jax.nn.sigmoid(level_logits)  # [B, anchors, classes]
        size = level_scores.shape[1] * level_scores.shape[2]
        # lax.top_k over the flattened (anchor, class) scores, without sorting all of them; one pass
        # over the scores finds each anchor's best, which both top-ks start from.
        best = jnp.max(level_scores, axis=-1)
        # The image's top-k over all levels lies within the per-level top-k (before thresholding).
        confidence.append(top_k_pairs(level_scores, min(CONFIDENCE_TOP_K, size), best)[0])
        above, best = (jnp.where(x > spec.score_thresh, x, -jnp.inf) for x in (level_scores, best))
        top_scores, index = top_k_pairs(above, min(spec.topk_candidates, size), best)
        anchor_index = index // spec.num_classes
        scores.append(top_scores)
        labels.append(index % spec.num_classes)
        boxes.append(coder.decode(_gather(level_deltas, anchor_index), jnp.asarray(anchors)[anchor_index]))
    confidence = jnp.concatenate(confidence, axis=1)
    return (jnp.concatenate(boxes, axis=1), jnp.concatenate(scores, axis=1), jnp.concatenate(labels, axis=1),
            jax.lax.top_k(confidence, min(CONFIDENCE_TOP_K, confidence.shape[1]))[0])


def retinanet_nms(spec: RetinaNetSpec, boxes, scores, labels, image_sizes) -> dict:
    """Each image's candidates clipped and put through class-aware NMS: padded detections."""

    def detections(boxes, scores, labels, image_size):
        boxes = clip_boxes_to_image(boxes, image_size[0], image_size[1])
        keep, kept = batched_nms(boxes, scores, labels, scores > spec.score_thresh, spec.nms_thresh,
                                 spec.detections_per_img)
        return _padded_detections(boxes, scores, labels, keep, kept)

    return jax.vmap(detections)(boxes, scores, labels, image_sizes)


def _linear_taps(in_size: int, out_size: int):
    """torch's bilinear (align_corners=False) source indices and weights along one axis, in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                        np.float32(0))
    low = source.astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = np.clip(source - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, np.float32(1) - frac, frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` of an HWC float32
    image, summed in torch's CPU order (along x within each row, then along y)."""
    low, high, w_low, w_high = _linear_taps(image.shape[1], width)
    rows = image[:, low] * w_low[None, :, None] + image[:, high] * w_high[None, :, None]
    low, high, w_low, w_high = _linear_taps(image.shape[0], height)
    return rows[low] * w_low[:, None, None] + rows[high] * w_high[:, None, None]


@dataclasses.dataclass(frozen=True)
class TorchvisionDetectionPipeline:
    """:class:`~xprune_jax.detection.DetectionPipeline` of torchvision's R-CNN family:
    ``GeneralizedRCNNTransform`` (normalise, resize, zero-pad bottom/right) around ``module``.

    ``bucket`` (a multiple of ``size_divisible``) rounds the padded shapes: 32 gives exactly
    torchvision's padding of each image alone (its eval uses one image per batch), so outputs match
    torchvision box for box; a larger bucket means fewer compilations, at the cost of exactness near
    the padding. Batches hold one padded shape, so an image's detections do not depend on the other
    images or the batch size (torchvision pads a batch to its largest image): evaluation and
    ``predict`` share this pipeline.
    """

    module: FasterRCNN | RetinaNet
    bucket: int = 32

    def __post_init__(self):
        if self.bucket % self.module.spec.transform.size_divisible:
            raise ValueError(f"bucket {self.bucket} is not a multiple of {self.module.spec.transform.size_divisible}")

    @property
    def max_detections(self) -> int:
        return self.module.spec.detections_per_img

    @property
    def square_side(self) -> int:
        """The side of the square padded shape that holds every resized image (its long side is at
        most ``max_size``): what calibration uses to batch images of any size with one compilation."""
        return -(-self.module.spec.transform.max_size // self.bucket) * self.bucket

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The transform's output size: scaled by min(min_size / short side, max_size / long side), floored."""
        t = self.module.spec.transform
        scale = min(t.min_size / min(height, width), t.max_size / max(height, width))
        return math.floor(height * scale), math.floor(width * scale)

    def plan(self, sizes: list[tuple[int, int]], batch_size: int) -> list[BatchPlan]:
        """Batches of images with the same padded shape (in order of first appearance)."""
        return batches_by_shape([tuple(-(-side // self.bucket) * self.bucket for side in self.resized_size(h, w))
                                 for h, w in sizes], batch_size)

    def preprocess(self, image: np.ndarray, input_shape: tuple[int, int]) -> tuple[np.ndarray, tuple]:
        """uint8 HWC RGB -> the normalised, resized image zero-padded to ``input_shape``; meta is
        ``(original (h, w), resized (h, w))``."""
        t = self.module.spec.transform
        x = (image.astype(np.float32) / np.float32(255) - np.asarray(t.mean, np.float32)) / np.asarray(t.std, np.float32)
        resized = self.resized_size(*image.shape[:2])
        if resized[0] > input_shape[0] or resized[1] > input_shape[1]:
            raise ValueError(f"input shape {input_shape} is smaller than the resized image {resized}")
        out = np.zeros((*input_shape, 3), np.float32)
        out[:resized[0], :resized[1]] = resize_bilinear(x, *resized)
        return out, (tuple(image.shape[:2]), resized)

    def forward(self, variables: dict, images, candidates_from: dict | None = None, return_raw: bool = False) -> dict:
        return self.module.apply(variables, images, candidates_from=candidates_from, return_raw=return_raw)

    @property
    def class_indices(self) -> dict[int, int]:
        """torchvision's label index is the category id (0 is the background)."""
        return {i: i for i in range(1, self.module.spec.num_classes)}

    def to_input(self, boxes: np.ndarray, meta: tuple) -> np.ndarray:
        """torchvision's ``resize_boxes`` of the training targets: x and y scaled by the float32 ratio
        resized / original."""
        (height, width), (resized_h, resized_w) = meta
        ratio_h, ratio_w = np.float32(resized_h) / np.float32(height), np.float32(resized_w) / np.float32(width)
        return np.asarray(boxes, np.float32) * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)

    def to_original(self, boxes: np.ndarray, meta: tuple) -> np.ndarray:
        """torchvision's ``resize_boxes``: x and y scaled by the float32 ratio original / resized."""
        (height, width), (resized_h, resized_w) = meta
        ratio_h, ratio_w = np.float32(height) / np.float32(resized_h), np.float32(width) / np.float32(resized_w)
        return np.asarray(boxes, np.float32) * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)

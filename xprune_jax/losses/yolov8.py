"""Ultralytics 8.4.190's YOLOv8 detection training loss (``ultralytics.utils.loss.v8DetectionLoss``) in JAX.

Static shapes throughout: ground truth is padded to a fixed ``M`` boxes per image with a mask, and
every ``nonzero``/boolean gather of the torch code is a dense ``[B, M, A]`` (or ``[B, A]``) array
with masks. The pieces, as in that version:

- **Task-aligned assigner** (``ultralytics.utils.tal.TaskAlignedAssigner``: topk 10, alpha 0.5,
  beta 6.0, eps 1e-9, gradient-free): candidate anchors are those whose centre lies strictly
  (by more than 1e-9) inside the ground-truth box, where a box side shorter than ``stride_val``
  (the second stride, 16) is first enlarged to it about the centre; the alignment metric is
  ``score[class] ** 0.5 * CIoU.clamp(0) ** 6`` on candidates; the top-10 anchors by metric per box
  (over all anchors) that are also candidates are positives; an anchor positive for several boxes
  keeps the box of highest CIoU; target scores are the one-hot class times
  ``max_gt(metric * max_anchor(CIoU) / (max_anchor(metric) + eps))``.
- **Losses**, each divided by ``max(sum of target scores over the batch, 1)``: BCE with logits on
  all anchors and classes; ``(1 - CIoU) * weight`` on positives, with ``weight`` the anchor's target
  score sum (CIoU's ``alpha`` term without gradient); DFL on positives (left/right-bin cross-entropy
  of the target distance clamped to ``[0, reg_max - 1.01]``, mean over the 4 sides) times ``weight``.
- Gains box 7.5, cls 0.5, dfl 1.5 (``default.yaml``); Ultralytics returns the 3 gained components
  multiplied by the batch size (what its trainer sums and back-propagates) and the components
  without that factor as ``loss_items``.

Inputs are the raw head maps, before DFL decoding and sigmoid: per level ``[B, h, w, 4 * reg_max]``
box-bin logits (``model.22.cv2.{i}.2``) and ``[B, h, w, num_classes]`` class logits
(``model.22.cv3.{i}.2``). The Flax YOLOv8 captures them; get them with
``head_maps_from_intermediates(models.apply_with_intermediates(module, variables, images)[1])``.
Differentiating through the captured intermediates gives the gradient with respect to the
parameters (the intermediates are the traced values that feed the decoded output).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from xprune_jax.ops import dist2bbox, make_anchor_points


@dataclasses.dataclass(frozen=True)
class LossConfig:
    box: float = 7.5  # default.yaml gains
    cls: float = 0.5
    dfl: float = 1.5
    topk: int = 10  # v8DetectionLoss(tal_topk=10) -> TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0)
    alpha: float = 0.5
    beta: float = 6.0
    eps: float = 1e-9  # TaskAlignedAssigner eps (also select_candidates_in_gts)
    iou_eps: float = 1e-7  # bbox_iou eps
    reg_max: int = 16
    strides: tuple[int, ...] = (8, 16, 32)


def head_maps_from_intermediates(intermediates: dict, head: str = "model.22", levels: int = 3):
    """The raw per-level head maps captured by the Flax YOLOv8: (box logits, class logits) lists."""
    return ([intermediates[f"{head}.cv2.{i}.2"] for i in range(levels)],
            [intermediates[f"{head}.cv3.{i}.2"] for i in range(levels)])


def flatten_head_maps(box_maps, class_maps):
    """Per-level ``[B, h, w, C]`` maps -> ``[B, A, 4 * reg_max]``, ``[B, A, nc]`` (level-major,
    row-major anchors, Ultralytics' order) and the level sizes."""
    sizes = [tuple(m.shape[1:3]) for m in box_maps]
    boxes = jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in box_maps], axis=1)
    scores = jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in class_maps], axis=1)
    return boxes, scores, sizes


def ciou(box1, box2, eps: float = 1e-7):
    """Ultralytics ``bbox_iou(box1, box2, xywh=False, CIoU=True)`` (broadcasting, last axis xyxy) ->
    ``[...]``; its ``alpha`` is computed without gradient, as there."""
    b1_x1, b1_y1, b1_x2, b1_y2 = (box1[..., i] for i in range(4))
    b2_x1, b2_y1, b2_x2, b2_y2 = (box2[..., i] for i in range(4))
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    inter = (jnp.clip(jnp.minimum(b1_x2, b2_x2) - jnp.maximum(b1_x1, b2_x1), 0)
             * jnp.clip(jnp.minimum(b1_y2, b2_y2) - jnp.maximum(b1_y1, b2_y1), 0))
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = jnp.maximum(b1_x2, b2_x2) - jnp.minimum(b1_x1, b2_x1)
    ch = jnp.maximum(b1_y2, b2_y2) - jnp.minimum(b1_y1, b2_y1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi ** 2) * (jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1)) ** 2
    alpha = jax.lax.stop_gradient(v / (1 - iou + v + eps))
    return iou - (rho2 / c2 + v * alpha)


def assign_targets(pd_scores, pd_bboxes, anchor_points, gt_labels, gt_bboxes, gt_mask,
                   config: LossConfig = LossConfig()):
    """``TaskAlignedAssigner.forward`` (no gradient). Shapes: scores ``[B, A, C]`` (sigmoid),
    boxes ``[B, A, 4]`` xyxy pixels, anchors ``[A, 2]`` pixels, labels ``[B, M]`` int, gt boxes
    ``[B, M, 4]`` xyxy pixels, mask ``[B, M]`` bool.

    Returns ``(target_labels [B, A], target_bboxes [B, A, 4], target_scores [B, A, C], fg_mask [B, A]
    bool, target_gt_idx [B, A])``.
    """
    pd_scores, pd_bboxes = jax.lax.stop_gradient(pd_scores), jax.lax.stop_gradient(pd_bboxes)
    gt_bboxes = jax.lax.stop_gradient(gt_bboxes)
    num_classes = pd_scores.shape[2]
    max_boxes = gt_bboxes.shape[1]
    gt_mask = gt_mask.astype(bool)
    gt_labels = gt_labels.astype(jnp.int32)
    stride_val = config.strides[1] if len(config.strides) > 1 else config.strides[0]

    # select_candidates_in_gts: sides below stride_val enlarged to it, centres strictly inside
    x1, y1, x2, y2 = (gt_bboxes[..., i] for i in range(4))
    xy = jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2], axis=-1)
    wh = jnp.stack([x2 - x1, y2 - y1], axis=-1)
    wh = jnp.where((wh < stride_val) & gt_mask[..., None], jnp.asarray(stride_val, wh.dtype), wh)
    lt, rb = xy - wh / 2, xy + wh / 2  # [B, M, 2]
    ax, ay = anchor_points[:, 0], anchor_points[:, 1]
    mask_in_gts = ((ax - lt[..., 0:1] > config.eps) & (ay - lt[..., 1:2] > config.eps)
                   & (rb[..., 0:1] - ax > config.eps) & (rb[..., 1:2] - ay > config.eps))  # [B, M, A]
    candidates = mask_in_gts & gt_mask[..., None]

    # get_box_metrics on the candidates
    scores = jnp.take_along_axis(jnp.swapaxes(pd_scores, 1, 2),
                                 jnp.clip(gt_labels, 0, num_classes - 1)[..., None], axis=1)  # [B, M, A]
    pair = jnp.clip(ciou(gt_bboxes[:, :, None, :], pd_bboxes[:, None, :, :], config.iou_eps), 0)
    overlaps = jnp.where(candidates, pair, 0.0)
    align_metric = jnp.where(candidates, scores ** config.alpha * pair ** config.beta, 0.0)

    # select_topk_candidates: topk over all anchors, indices of padded boxes set to 0, repeats dropped
    topk_idxs = jax.lax.top_k(align_metric, config.topk)[1]  # [B, M, k]
    topk_idxs = jnp.where(gt_mask[..., None], topk_idxs, 0)
    counts = jnp.zeros(align_metric.shape, jnp.int32)
    b_idx = jnp.arange(counts.shape[0])[:, None, None]
    m_idx = jnp.arange(max_boxes)[None, :, None]
    counts = counts.at[b_idx, m_idx, topk_idxs].add(1)
    mask_topk = jnp.where(counts > 1, 0, counts)
    mask_pos = (mask_topk * candidates).astype(jnp.float32)  # mask_in_gts * mask_gt

    # select_highest_overlaps: an anchor on several boxes keeps the box of highest overlap
    fg_count = mask_pos.sum(axis=1)  # [B, A]
    max_overlaps_idx = jnp.argmax(overlaps, axis=1)  # [B, A]
    is_max = jax.nn.one_hot(max_overlaps_idx, max_boxes, axis=1, dtype=mask_pos.dtype)  # [B, M, A]
    mask_pos = jnp.where((fg_count > 1)[:, None, :], is_max, mask_pos)
    fg_mask = mask_pos.max(axis=1) > 0
    target_gt_idx = jnp.argmax(mask_pos, axis=1)  # [B, A]

    # get_targets
    target_labels = jnp.maximum(jnp.take_along_axis(gt_labels, target_gt_idx, axis=1), 0)
    target_bboxes = jnp.take_along_axis(gt_bboxes, target_gt_idx[..., None], axis=1)
    target_scores = jax.nn.one_hot(target_labels, num_classes, dtype=pd_scores.dtype) * fg_mask[..., None]

    # normalise by the best metric and best overlap of each box
    align_metric = align_metric * mask_pos
    pos_align_metrics = align_metric.max(axis=-1, keepdims=True)
    pos_overlaps = (overlaps * mask_pos).max(axis=-1, keepdims=True)
    norm_align_metric = (align_metric * pos_overlaps / (pos_align_metrics + config.eps)).max(axis=1)  # [B, A]
    target_scores = target_scores * norm_align_metric[..., None]
    return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx


def detection_loss(box_maps, class_maps, gt_boxes, gt_classes, gt_mask, weights=None,
                   config: LossConfig = LossConfig()) -> dict:
    """``v8DetectionLoss(model)(preds, batch)`` on raw head maps and padded ground truth.

    Args:
        box_maps: per level ``[B, h, w, 4 * reg_max]`` box-bin logits.
        class_maps: per level ``[B, h, w, nc]`` class logits.
        gt_boxes: ``[B, M, 4]`` xyxy in input pixels; gt_classes ``[B, M]`` (0..nc-1); gt_mask ``[B, M]``.
        weights: optional ``[B]`` 0/1 image mask (padded images of a static batch). Images of weight 0
            contribute nothing (their ground truth is ignored, their BCE dropped) and do not count in
            the batch size; with all ones (or None) this is exactly Ultralytics' loss.

    Returns a dict: ``box``, ``cls``, ``dfl`` (the gained components, Ultralytics' ``loss_items``),
    ``loss`` ``[3]`` = those times the batch size (what ``v8DetectionLoss`` returns first) and
    ``total`` = ``loss.sum()`` (what Ultralytics' trainer back-propagates).
    """
    pred_distri, pred_logits, sizes = flatten_head_maps(box_maps, class_maps)
    batch_size = pred_logits.shape[0]
    dtype = pred_logits.dtype
    points, strides = make_anchor_points(sizes, config.strides[: len(sizes)])
    points, strides = jnp.asarray(points, dtype), jnp.asarray(strides, dtype)
    if weights is None:
        weights = jnp.ones((batch_size,), dtype)
    weights = jnp.asarray(weights, dtype)
    gt_mask = jnp.asarray(gt_mask, bool) & (weights[:, None] > 0)
    gt_boxes = jnp.where(gt_mask[..., None], jnp.asarray(gt_boxes, dtype), 0.0)

    # bbox_decode: softmax over the bins, expectation, ltrb -> xyxy in grid units
    probs = jax.nn.softmax(pred_distri.reshape(*pred_distri.shape[:-1], 4, config.reg_max), axis=-1)
    distances = jnp.sum(probs * jnp.arange(config.reg_max, dtype=dtype), axis=-1)
    pred_bboxes = dist2bbox(distances, points, xywh=False)  # [B, A, 4]

    _, target_bboxes, target_scores, fg_mask, _ = assign_targets(
        jax.nn.sigmoid(pred_logits), pred_bboxes * strides, points * strides, gt_classes, gt_boxes, gt_mask, config)
    target_scores = jax.lax.stop_gradient(target_scores)
    target_bboxes = jax.lax.stop_gradient(target_bboxes)
    target_scores_sum = jnp.maximum(target_scores.sum(), 1.0)

    bce = optax.sigmoid_binary_cross_entropy(pred_logits, target_scores).sum(axis=(1, 2))  # per image
    loss_cls = jnp.sum(bce * weights) / target_scores_sum

    # BboxLoss on the foreground anchors
    target_grid = target_bboxes / strides
    weight = target_scores.sum(-1)  # [B, A]
    iou = ciou(pred_bboxes, target_grid, config.iou_eps)
    loss_box = jnp.sum(jnp.where(fg_mask, (1.0 - iou) * weight, 0.0)) / target_scores_sum

    limit = config.reg_max - 1 - 0.01
    target_ltrb = jnp.concatenate([points - target_grid[..., :2], target_grid[..., 2:] - points], -1)
    target_ltrb = jnp.clip(target_ltrb, 0, limit)  # bbox2dist(reg_max - 1), then DFLoss's clamp (same bound)
    left = jnp.floor(target_ltrb)
    weight_left = left + 1 - target_ltrb
    weight_right = 1 - weight_left
    logp = jax.nn.log_softmax(pred_distri.reshape(*pred_distri.shape[:-1], 4, config.reg_max), axis=-1)
    left_idx = left.astype(jnp.int32)[..., None]
    logp_left = jnp.take_along_axis(logp, left_idx, axis=-1)[..., 0]
    logp_right = jnp.take_along_axis(logp, left_idx + 1, axis=-1)[..., 0]
    dfl = -(logp_left * weight_left + logp_right * weight_right).mean(-1)  # [B, A]
    loss_dfl = jnp.sum(jnp.where(fg_mask, dfl * weight, 0.0)) / target_scores_sum

    items = jnp.stack([loss_box * config.box, loss_cls * config.cls, loss_dfl * config.dfl])
    loss = items * jnp.sum(weights)
    return {"box": items[0], "cls": items[1], "dfl": items[2], "loss": loss, "total": loss.sum()}


def model_loss(module, variables: dict, images, gt_boxes, gt_classes, gt_mask, weights=None,
               config: LossConfig = LossConfig()) -> dict:
    """Apply the Flax YOLOv8 ``module`` to ``[B, H, W, 3]`` images and return :func:`detection_loss`
    on its captured raw head maps (differentiable w.r.t. ``variables``). BatchNorm uses the running
    statistics (the model's only mode), not the batch statistics of Ultralytics' training forward."""
    from xprune_jax import models  # the models package imports much; keep this module light

    _, intermediates = models.apply_with_intermediates(module, variables, images)
    box_maps, class_maps = head_maps_from_intermediates(intermediates, levels=len(config.strides))
    return detection_loss(box_maps, class_maps, gt_boxes, gt_classes, gt_mask, weights, config)

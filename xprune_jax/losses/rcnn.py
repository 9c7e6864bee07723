"""torchvision 0.29's training losses of RetinaNet and Faster R-CNN in JAX (static shapes).

Ground truth is padded to ``M`` boxes per image with a mask: ``gt_boxes [B, M, 4]`` xyxy in network-input
pixels (the boxes after ``GeneralizedRCNNTransform``'s resize), ``gt_classes [B, M]`` torchvision label
indices (the COCO category id for COCO_V1 weights) and ``gt_mask [B, M]``. An image without boxes is all
background, as in torchvision. Every boolean gather of the torch code is a dense array with masks.

- :func:`match` is ``det_utils.Matcher`` (first maximum on ties, low-quality matches including ties).
- **RetinaNet** (``RetinaNet.compute_loss``): Matcher(0.5, 0.4, low-quality matches) on the anchors; sigmoid
  focal loss (alpha 0.25, gamma 2) summed over foreground and background anchors (those between the
  thresholds ignored) and L1 of the ``BoxCoder((1, 1, 1, 1))`` deltas on the foreground, each divided by
  max(1, foreground anchors) per image, then averaged over the images.
- **Faster R-CNN** RPN (``RegionProposalNetwork.compute_loss``): Matcher(0.7, 0.3, low-quality matches),
  256 anchors sampled per image (at most half positive), BCE of the objectness averaged over the sampled
  anchors of the batch, smooth L1 (beta 1/9, sum) of the deltas on the sampled positives divided by that
  number. RoI heads (``RoIHeads.select_training_samples`` and ``fastrcnn_loss``): the ground-truth boxes
  appended to the proposals, Matcher(0.5, 0.5), 512 proposals sampled per image (at most a quarter
  positive), cross-entropy averaged over the sampled proposals of the batch, smooth L1 (beta 1/9, sum) of
  the true class's ``BoxCoder((10, 10, 5, 5))`` deltas on the positives divided by the number sampled.

**Sampling is reproducible**: torchvision draws the sampled positives and negatives with
``torch.randperm``. Here :func:`balanced_sample` gives every candidate a priority
``jax.random.uniform(key)`` and keeps the highest-priority positives and negatives (a uniform random
subset of each, as ``randperm`` draws). Each image has its own key (``keys [B]``, typed or raw
``uint32 [B, 2]``), so its samples do not depend on the other images of the batch, and a key fixes them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from xprune_jax.ops import BoxCoder, box_iou

BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS = -1, -2  # Matcher's negative match values


@dataclasses.dataclass(frozen=True)
class RetinaNetLossConfig:
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    alpha: float = 0.25
    gamma: float = 2.0


@dataclasses.dataclass(frozen=True)
class FasterRCNNLossConfig:
    """torchvision's ``fasterrcnn_resnet50_fpn`` training settings."""

    rpn_pre_nms_top_n: int = 2000  # rpn_pre_nms_top_n_train, per level
    rpn_post_nms_top_n: int = 2000  # rpn_post_nms_top_n_train, per image
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    beta: float = 1 / 9  # smooth L1


def match(quality, gt_mask, high: float, low: float, allow_low_quality_matches: bool):
    """``Matcher(high, low, allow_low_quality_matches)(quality)`` for ``quality [M, N]`` (IoU of the
    ground truth with the N predictions) whose padded rows ``gt_mask [M]`` are False -> ``[N]`` int32:
    the matched box, or ``BELOW_LOW_THRESHOLD`` / ``BETWEEN_THRESHOLDS``. Without ground truth every
    prediction is below the low threshold."""
    quality = jnp.where(gt_mask[:, None], quality, -1.0)
    matched_vals, all_matches = jnp.max(quality, axis=0), jnp.argmax(quality, axis=0).astype(jnp.int32)
    matches = jnp.where(matched_vals < low, BELOW_LOW_THRESHOLD,
                        jnp.where(matched_vals < high, BETWEEN_THRESHOLDS, all_matches))
    if allow_low_quality_matches:  # each box's best predictions (ties included) keep their match
        best = (quality == jnp.max(quality, axis=1, keepdims=True)) & gt_mask[:, None]
        matches = jnp.where(jnp.any(best, axis=0), all_matches, matches)
    return matches


def balanced_sample(labels, key, batch_size_per_image: int, positive_fraction: float):
    """``BalancedPositiveNegativeSampler`` for one image: ``labels [N]`` >= 1 positive, 0 negative, < 0
    ignored -> (positive mask, negative mask). ``min(#positives, int(batch * fraction))`` positives and
    ``min(#negatives, batch - sampled positives)`` negatives, each those of highest
    ``jax.random.uniform(key, [N])`` priority: a uniform random subset, reproducible from ``key``."""
    positive, negative = labels >= 1, labels == 0
    num_pos = jnp.minimum(jnp.sum(positive), int(batch_size_per_image * positive_fraction))
    num_neg = jnp.minimum(jnp.sum(negative), batch_size_per_image - num_pos)
    priority = jax.random.uniform(key, labels.shape)

    def highest(candidates, count, max_count):
        _, index = jax.lax.top_k(jnp.where(candidates, priority, -1.0), min(max_count, labels.shape[0]))
        chosen = (jnp.arange(index.shape[0]) < count) & candidates[index]
        return jnp.zeros(labels.shape, bool).at[index].max(chosen)

    return (highest(positive, num_pos, int(batch_size_per_image * positive_fraction)),
            highest(negative, num_neg, batch_size_per_image))


def _smooth_l1(x, beta: float):
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _matched_boxes(matches, gt_boxes, fallback):
    """Each prediction's matched box where it has one, else ``fallback`` (so that encoding stays finite)."""
    matched = gt_boxes[jnp.clip(matches, 0)]
    return jnp.where((matches >= 0)[:, None], matched, fallback)


def retinanet_loss(cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_mask,
                   config: RetinaNetLossConfig = RetinaNetLossConfig()) -> dict:
    """``RetinaNet.compute_loss`` on the head outputs ``cls_logits [B, A, K]`` and ``bbox_regression
    [B, A, 4]`` (torchvision's (level, y, x, anchor) order) and the anchors ``[A, 4]``.

    Returns torchvision's ``classification`` and ``bbox_regression`` (means over the images) and their
    per-image values ``[B]`` (each image's loss as torchvision computes it for a batch of one) under
    ``per_image``.
    """
    gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, cls_logits.dtype))
    anchors = jnp.asarray(anchors, cls_logits.dtype)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def one(logits, deltas, boxes, classes, mask):
        matches = match(box_iou(boxes, anchors), mask.astype(bool), config.fg_iou_thresh, config.bg_iou_thresh, True)
        foreground = matches >= 0
        num_foreground = jnp.maximum(jnp.sum(foreground), 1).astype(logits.dtype)
        targets = jax.nn.one_hot(classes[jnp.clip(matches, 0)], logits.shape[-1], dtype=logits.dtype)
        targets = targets * foreground[:, None]
        focal = optax.sigmoid_focal_loss(logits, targets, alpha=config.alpha, gamma=config.gamma)  # torchvision's
        classification = jnp.sum(jnp.where((matches != BETWEEN_THRESHOLDS)[:, None], focal, 0.0)) / num_foreground
        regression_targets = coder.encode(_matched_boxes(matches, boxes, anchors), anchors)
        l1 = jnp.where(foreground[:, None], jnp.abs(deltas - regression_targets), 0.0)
        return classification, jnp.sum(l1) / num_foreground

    classification, regression = jax.vmap(one)(cls_logits, bbox_regression, gt_boxes, gt_classes, gt_mask)
    return {"classification": jnp.mean(classification), "bbox_regression": jnp.mean(regression),
            "per_image": {"classification": classification, "bbox_regression": regression}}


def retinanet_head_outputs(intermediates: dict, num_classes: int):
    """The RetinaNet head's outputs from the Flax model's captured (flattened) intermediates: its last
    convs, packed over levels ``[B, sum HW, A * K]`` and ``[B, sum HW, 4 A]`` -> ``cls_logits [B, HWA, K]``,
    ``bbox_regression [B, HWA, 4]`` in torchvision's order."""
    logits = intermediates["head.classification_head.cls_logits"]
    deltas = intermediates["head.regression_head.bbox_reg"]
    return logits.reshape(logits.shape[0], -1, num_classes), deltas.reshape(deltas.shape[0], -1, 4)


def rpn_loss(objectness, deltas, anchors, gt_boxes, gt_mask, keys,
             config: FasterRCNNLossConfig = FasterRCNNLossConfig()) -> dict:
    """``RegionProposalNetwork.compute_loss`` (with ``assign_targets_to_anchors``) on the RPN head's
    ``objectness [B, A]`` logits and ``deltas [B, A, 4]`` and the anchors ``[A, 4]``; image ``i`` samples
    with ``keys[i]``.

    Returns torchvision's ``loss_objectness`` and ``loss_rpn_box_reg`` and, under ``per_image``, their
    values for each image as a batch of one.
    """
    gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, objectness.dtype))
    anchors = jnp.asarray(anchors, objectness.dtype)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def one(logits, pred, boxes, mask, image_key):
        matches = match(box_iou(boxes, anchors), mask.astype(bool), config.rpn_fg_iou_thresh,
                        config.rpn_bg_iou_thresh, True)
        labels = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
        positive, negative = balanced_sample(labels, image_key, config.rpn_batch_size_per_image,
                                             config.rpn_positive_fraction)
        bce = optax.sigmoid_binary_cross_entropy(logits, positive.astype(logits.dtype))
        bce = jnp.sum(jnp.where(positive | negative, bce, 0.0))
        targets = coder.encode(_matched_boxes(matches, boxes, anchors), anchors)
        box = jnp.sum(jnp.where(positive[:, None], _smooth_l1(pred - targets, config.beta), 0.0))
        return bce, box, jnp.sum(positive | negative).astype(logits.dtype)

    bce, box, sampled = jax.vmap(one)(objectness, deltas, gt_boxes, gt_mask, keys)
    return {"loss_objectness": jnp.sum(bce) / jnp.sum(sampled), "loss_rpn_box_reg": jnp.sum(box) / jnp.sum(sampled),
            "per_image": {"loss_objectness": bce / sampled, "loss_rpn_box_reg": box / sampled}}


def roi_training_samples(proposals, proposal_valid, gt_boxes, gt_classes, gt_mask, keys,
                         config: FasterRCNNLossConfig = FasterRCNNLossConfig()) -> dict:
    """``RoIHeads.select_training_samples``: ``proposals [B, P, 4]`` (``proposal_valid [B, P]``) with the
    ground-truth boxes appended, matched and sampled (image ``i`` with ``keys[i]``).

    Returns, padded to ``S = box_batch_size_per_image`` per image in index order as torchvision keeps
    them: ``rois [B, S, 4]``, ``labels [B, S]`` (0 background), ``regression_targets [B, S, 4]`` and
    ``valid [B, S]``. No gradient flows into the samples (torchvision detaches the proposals).
    """
    proposals = jax.lax.stop_gradient(proposals)
    gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, proposals.dtype))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    size = config.box_batch_size_per_image

    def one(boxes_in, valid_in, boxes, classes, mask, image_key):
        mask = mask.astype(bool)
        candidates = jnp.concatenate([boxes_in, boxes])
        valid = jnp.concatenate([valid_in.astype(bool), mask])
        matches = match(box_iou(boxes, candidates), mask, config.box_fg_iou_thresh, config.box_bg_iou_thresh, False)
        labels = jnp.where(matches >= 0, classes[jnp.clip(matches, 0)],
                           jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
        labels = jnp.where(valid, labels, -1)
        positive, negative = balanced_sample(labels, image_key, size, config.box_positive_fraction)
        sampled = positive | negative
        (index,) = jnp.nonzero(sampled, size=size, fill_value=0)
        rows_valid = jnp.arange(size) < jnp.sum(sampled)
        rois = jnp.where(rows_valid[:, None], candidates[index], 0.0)
        matched = _matched_boxes(jnp.where(positive, matches, BELOW_LOW_THRESHOLD), boxes, candidates)[index]
        targets = jnp.where((rows_valid & positive[index])[:, None], coder.encode(matched, candidates[index]), 0.0)
        return {"rois": rois, "labels": jnp.where(rows_valid, labels[index], 0), "regression_targets": targets,
                "valid": rows_valid}

    return jax.vmap(one)(proposals, proposal_valid, gt_boxes, gt_classes, gt_mask, keys)


def fastrcnn_loss(class_logits, box_regression, samples: dict, beta: float = 1 / 9) -> dict:
    """``fastrcnn_loss`` on the box predictor's ``class_logits [B, S, C]`` and ``box_regression
    [B, S, C, 4]`` for the :func:`roi_training_samples` ``samples``.

    Returns torchvision's ``loss_classifier`` and ``loss_box_reg`` and, under ``per_image``, their values
    for each image as a batch of one (0 for an image without samples, a padded one).
    """
    labels, valid = samples["labels"], samples["valid"]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(class_logits, axis=-1), labels[..., None], axis=-1)[..., 0]
    ce = jnp.sum(jnp.where(valid, ce, 0.0), axis=1)
    deltas = jnp.take_along_axis(box_regression, labels[..., None, None], axis=2)[:, :, 0]
    positive = valid & (labels > 0)
    box = jnp.sum(jnp.where(positive[..., None], _smooth_l1(deltas - samples["regression_targets"], beta), 0.0),
                  axis=(1, 2))
    sampled = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(class_logits.dtype)  # 0 only in padded images
    return {"loss_classifier": jnp.sum(ce) / jnp.sum(sampled), "loss_box_reg": jnp.sum(box) / jnp.sum(sampled),
            "per_image": {"loss_classifier": ce / sampled, "loss_box_reg": box / sampled}}

"""Box utilities with torchvision / Ultralytics semantics. Boxes are (x1, y1, x2, y2), float32."""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def box_area(boxes: jax.Array) -> jax.Array:
    """Area of ``boxes [..., 4]`` (no +1), like ``torchvision.ops.box_area``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Pairwise IoU ``[N, M]`` of ``boxes1 [N, 4]`` and ``boxes2 [M, 4]``, like ``torchvision.ops.box_iou``.

    Two zero-area boxes give 0/0 = NaN, as in torchvision (and NaN never exceeds an NMS threshold).
    """
    lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / union


def clip_boxes_to_image(boxes: jax.Array, height, width) -> jax.Array:
    """Clamp x to [0, width] and y to [0, height], like ``torchvision.ops.clip_boxes_to_image``."""
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def small_box_mask(boxes: jax.Array, min_size: float) -> jax.Array:
    """Keep-mask of ``torchvision.ops.remove_small_boxes``: width >= min_size and height >= min_size."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size)


def _center_form(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(widths, heights, center x, center y) as torchvision's BoxCoder computes them."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return widths, heights, boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """``torchvision.models.detection._utils.BoxCoder`` (encode_single / decode_single).

    Both methods broadcast over leading dimensions: e.g. per-class codes ``[N, num_classes, 4]``
    decode against ``boxes[:, None]``.
    """

    weights: tuple[float, float, float, float]
    bbox_xform_clip: float = math.log(1000.0 / 16)

    def encode(self, reference_boxes: jax.Array, proposals: jax.Array) -> jax.Array:
        """Regression targets (dx, dy, dw, dh) that turn ``proposals`` into ``reference_boxes``."""
        wx, wy, ww, wh = self.weights
        ex_widths, ex_heights, ex_ctr_x, ex_ctr_y = _center_form(proposals)
        gt_widths, gt_heights, gt_ctr_x, gt_ctr_y = _center_form(reference_boxes)
        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * jnp.log(gt_widths / ex_widths)
        dh = wh * jnp.log(gt_heights / ex_heights)
        return jnp.stack([dx, dy, dw, dh], axis=-1)

    def decode(self, rel_codes: jax.Array, boxes: jax.Array) -> jax.Array:
        """Apply ``rel_codes [..., 4]`` to ``boxes [..., 4]``; dw and dh are clamped at ``bbox_xform_clip``."""
        wx, wy, ww, wh = self.weights
        widths, heights, ctr_x, ctr_y = _center_form(boxes)
        dx = rel_codes[..., 0] / wx
        dy = rel_codes[..., 1] / wy
        dw = jnp.minimum(rel_codes[..., 2] / ww, self.bbox_xform_clip)
        dh = jnp.minimum(rel_codes[..., 3] / wh, self.bbox_xform_clip)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (jnp.exp(dw) * widths)
        half_h = 0.5 * (jnp.exp(dh) * heights)
        return jnp.stack(
            [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1
        )


def make_anchor_points(
    feature_sizes: Sequence[tuple[int, int]], strides: Sequence[float], grid_cell_offset: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Ultralytics ``make_anchors``: anchor points ``[N, 2]`` (x, y, in grid units) and strides ``[N, 1]``.

    Levels are concatenated in order, each row-major (y, then x); N = sum of h * w.
    """
    points, point_strides = [], []
    for (height, width), stride in zip(feature_sizes, strides, strict=True):
        shift_y, shift_x = np.meshgrid(
            np.arange(height, dtype=np.float32) + grid_cell_offset,
            np.arange(width, dtype=np.float32) + grid_cell_offset,
            indexing="ij",
        )
        points.append(np.stack([shift_x, shift_y], axis=-1).reshape(-1, 2))
        point_strides.append(np.full((height * width, 1), stride, dtype=np.float32))
    return np.concatenate(points), np.concatenate(point_strides)


def dist2bbox(distance: jax.Array, anchor_points: jax.Array, xywh: bool = True) -> jax.Array:
    """Ultralytics ``dist2bbox``: (left, top, right, bottom) distances to xywh or xyxy boxes (last axis)."""
    x1y1 = anchor_points - distance[..., :2]
    x2y2 = anchor_points + distance[..., 2:]
    if xywh:
        return jnp.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], axis=-1)
    return jnp.concatenate([x1y1, x2y2], axis=-1)

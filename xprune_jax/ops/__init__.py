"""Detection ops shared by every detector: boxes, anchors, NMS, RoIAlign and top-k (pure JAX, static shapes)."""

from xprune_jax.ops.anchors import grid_anchors
from xprune_jax.ops.boxes import (
    BoxCoder,
    box_area,
    box_iou,
    clip_boxes_to_image,
    dist2bbox,
    make_anchor_points,
    small_box_mask,
)
from xprune_jax.ops.nms import batched_nms, nms
from xprune_jax.ops.roi_align import multiscale_roi_align, roi_align
from xprune_jax.ops.topk import top_k_above, top_k_pairs

__all__ = [
    "BoxCoder",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "dist2bbox",
    "grid_anchors",
    "make_anchor_points",
    "multiscale_roi_align",
    "nms",
    "roi_align",
    "small_box_mask",
    "top_k_above",
    "top_k_pairs",
]

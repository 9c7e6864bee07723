"""RoIAlign on NHWC features, identical to ``torchvision.ops.roi_align`` / ``MultiScaleRoIAlign``.

Every box reads 4 corners per sample from a flattened feature table, so a box costs
ph * pw * sampling_ratio**2 * 4 gathered rows of C channels whatever the level it pools from.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax.ops.boxes import box_area


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _axis_taps(start, end, length, pooled: int, sampling_ratio: int, aligned: bool):
    """Bilinear taps along one axis, with torchvision's CPU-kernel rules.

    Args:
      start, end: [K] roi bounds in feature coordinates (already shifted by -0.5 if aligned).
      length: [K] int32 feature map size along this axis.
    Returns:
      index, weight: [2 * sampling_ratio, K, pooled]: for each sample of each bin, its low and high
      neighbour and their weights; weights are zero for samples outside [-1, length].
    """
    roi_length = end - start
    if not aligned:
        roi_length = jnp.maximum(roi_length, 1.0)
    bin_size = (roi_length / pooled)[None, :, None]
    sample = (jnp.arange(sampling_ratio, dtype=jnp.float32) + 0.5)[:, None, None]
    bins = jnp.arange(pooled, dtype=jnp.float32)[None, None, :]
    coord = start[None, :, None] + bins * bin_size + sample * bin_size / sampling_ratio  # [s, K, pooled]

    length = length[None, :, None]
    inside = (coord >= -1.0) & (coord <= length.astype(jnp.float32))
    coord = jnp.maximum(coord, 0.0)
    low = jnp.floor(coord).astype(jnp.int32)
    at_edge = low >= length - 1
    low = jnp.where(at_edge, length - 1, low)
    high = jnp.where(at_edge, length - 1, low + 1)
    frac = coord - low  # torchvision zeroes it at the edge, where low == high anyway
    low_weight = jnp.where(inside, 1.0 - frac, 0.0)
    high_weight = jnp.where(inside, frac, 0.0)
    return jnp.concatenate([low, high]), jnp.concatenate([low_weight, high_weight])


def _roi_align_flat(table, row_start, height, width, boxes, scale, output_size, sampling_ratio, aligned):
    """RoIAlign of box k over the map stored row-major at ``table[row_start[k]:]`` ([height[k], width[k], C]).

    Args:
      table: [rows, C] flattened feature maps. row_start, height, width: [K] int32.
      boxes: [K, 4] image coordinates. scale: [K] spatial scale.
    Returns:
      [K, ph, pw, C].
    """
    pooled_h, pooled_w = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * scale - offset for i in range(4))
    rows, row_weights = _axis_taps(y1, y2, height, pooled_h, sampling_ratio, aligned)
    cols, col_weights = _axis_taps(x1, x2, width, pooled_w, sampling_ratio, aligned)
    row_offsets = (row_start[None, :, None] + rows * width[None, :, None])[..., None]  # [2s, K, ph, 1]
    cols, col_weights = cols[:, :, None, :], col_weights[:, :, None, :]  # [2s, K, 1, pw]
    # A sum of [K, ph, pw, C] gathers, which XLA fuses: no [K, ph, pw, (2s)**2, C] intermediate.
    total = sum(
        table[row_offsets[i] + cols[j]] * (row_weights[i, ..., None] * col_weights[j])[..., None]
        for i in range(2 * sampling_ratio)
        for j in range(2 * sampling_ratio)
    )
    return total / (sampling_ratio * sampling_ratio)


def _check_sampling_ratio(sampling_ratio: int) -> None:
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be > 0 (adaptive sampling has data-dependent shapes), got {sampling_ratio}")


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    batch_idx: jax.Array,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> jax.Array:
    """``torchvision.ops.roi_align`` for NHWC ``features [B, H, W, C]``.

    Args:
      boxes: [K, 4] (x1, y1, x2, y2) in image coordinates; ``batch_idx`` [K] int: their images.
      output_size: (ph, pw) or an int. spatial_scale: feature size / image size.
      sampling_ratio: samples per bin along each axis; must be > 0 (static shapes).
      aligned: shift boxes by -0.5 pixel; if False, roi sizes are clamped to >= 1.
    Returns:
      [K, ph, pw, C].
    """
    _check_sampling_ratio(sampling_ratio)
    _, height, width, channels = features.shape
    num_boxes = boxes.shape[0]
    row_start = batch_idx.astype(jnp.int32) * (height * width)
    return _roi_align_flat(
        features.reshape(-1, channels),
        row_start,
        jnp.full(num_boxes, height, jnp.int32),
        jnp.full(num_boxes, width, jnp.int32),
        boxes,
        jnp.full(num_boxes, spatial_scale, jnp.float32),
        _pair(output_size),
        sampling_ratio,
        aligned,
    )


def _infer_scale(feature_size: int, image_size: int) -> float:
    """torchvision's ``_infer_scale``: the power of two nearest (in log2, float32) to feature/image size."""
    return 2.0 ** float(np.round(np.log2(np.float32(feature_size / image_size))))


def multiscale_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    image_size: tuple[int, int],
    output_size: int | Sequence[int] = 7,
    sampling_ratio: int = 2,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> jax.Array:
    """``torchvision.ops.MultiScaleRoIAlign`` over the FPN levels ``features`` (aligned=False).

    Args:
      features: per level [B, H_l, W_l, C], finest first (featmap names '0'..'3').
      boxes: [B, R, 4] per-image boxes in image coordinates.
      image_size: (H, W) from which the level scales are inferred. torchvision uses the largest
        unpadded image size of the batch; the padded batch size infers the same scales.
    Returns:
      [B, R, ph, pw, C]: each box pooled from level floor(canonical_level + log2(sqrt(area) /
      canonical_scale) + eps), clamped to the available levels.
    """
    _check_sampling_ratio(sampling_ratio)
    num_images, num_rois = boxes.shape[:2]
    channels = features[0].shape[-1]
    scales = [_infer_scale(level.shape[1], image_size[0]) for level in features]
    k_min, k_max = (int(-np.log2(np.float32(s))) for s in (scales[0], scales[-1]))

    flat_boxes = boxes.reshape(-1, 4)
    target = jnp.floor(canonical_level + jnp.log2(jnp.sqrt(box_area(flat_boxes)) / canonical_scale) + eps)
    level = jnp.clip(target, k_min, k_max).astype(jnp.int32) - k_min
    level = jnp.clip(level, 0, len(features) - 1)  # only boxes of negative area (NaN level) need this

    heights = np.array([f.shape[1] for f in features], np.int32)
    widths = np.array([f.shape[2] for f in features], np.int32)
    level_start = np.cumsum([0] + [num_images * h * w for h, w in zip(heights, widths)])[:-1].astype(np.int32)
    batch_idx = jnp.repeat(jnp.arange(num_images, dtype=jnp.int32), num_rois)
    height, width = jnp.asarray(heights)[level], jnp.asarray(widths)[level]
    pooled = _roi_align_flat(
        jnp.concatenate([f.reshape(-1, channels) for f in features]),
        jnp.asarray(level_start)[level] + batch_idx * height * width,
        height,
        width,
        flat_boxes,
        jnp.asarray(scales, jnp.float32)[level],
        _pair(output_size),
        sampling_ratio,
        aligned=False,
    )
    return pooled.reshape(num_images, num_rois, *pooled.shape[1:])

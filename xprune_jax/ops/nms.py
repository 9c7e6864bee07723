"""Greedy non-maximum suppression with static shapes, identical to ``torchvision.ops.nms`` / ``batched_nms``.

``iou_threshold`` (a Python float) and ``max_output`` (a Python int) are static; boxes, scores, class
ids and ``valid`` may be traced. Both functions work under ``jax.jit`` and ``jax.vmap``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xprune_jax.ops.boxes import box_iou


def _float32_threshold(iou_threshold: float) -> np.float32:
    """The largest float32 <= ``iou_threshold``.

    torchvision compares the float32 IoU with a float64 threshold; for a float32 ``x``,
    ``x > t32`` holds exactly when ``x > iou_threshold`` does (e.g. for 0.6, whose float32 rounds up).
    """
    threshold = np.float32(iou_threshold)
    if float(threshold) > iou_threshold:  # compared in float64
        threshold = np.nextafter(threshold, np.float32(-np.inf))
    return threshold


def _greedy_nms(boxes, scores, valid, class_ids, iou_threshold: float, max_output: int):
    """Greedy NMS in which a kept box suppresses the boxes of its own class only.

    Boxes are visited by decreasing score (stable: ties in index order, as torchvision's CPU sort).
    Each step keeps the best remaining candidate and drops the candidates whose IoU with it is
    strictly above the threshold; the loop ends after ``max_output`` boxes or when none is left,
    so it costs O(N) memory and at most ``max_output`` steps of O(N) work.
    """
    order = jnp.argsort(scores, descending=True, stable=True)  # invalid boxes are never candidates
    boxes, class_ids = boxes[order], class_ids[order]
    threshold = _float32_threshold(iou_threshold)

    def has_room_and_candidates(state):
        candidates, _, num_kept = state
        return (num_kept < max_output) & jnp.any(candidates)

    def keep_best_candidate(state):
        candidates, kept, num_kept = state
        best = jnp.argmax(candidates)  # the first remaining candidate has the highest score
        overlapping = box_iou(boxes[best][None], boxes)[0] > threshold
        candidates &= ~(overlapping & (class_ids == class_ids[best]))
        candidates = candidates.at[best].set(False)  # zero-area boxes have NaN IoU with themselves
        return candidates, kept.at[num_kept].set(best.astype(jnp.int32)), num_kept + 1

    initial = (valid[order], jnp.zeros(max_output, jnp.int32), jnp.int32(0))
    _, kept, num_kept = lax.while_loop(has_room_and_candidates, keep_best_candidate, initial)
    keep_valid = jnp.arange(max_output) < num_kept
    return jnp.where(keep_valid, order[kept], 0).astype(jnp.int32), keep_valid


def nms(
    boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float, max_output: int
) -> tuple[jax.Array, jax.Array]:
    """``torchvision.ops.nms`` over the ``valid`` boxes, padded to ``max_output``.

    Args:
      boxes: [N, 4] (x1, y1, x2, y2). scores: [N]. valid: [N] bool; invalid boxes are never kept
        and never suppress.
      iou_threshold: suppress boxes whose IoU with a kept box is strictly greater.
      max_output: static output length.
    Returns:
      keep_idx [max_output] int32 (indices into ``boxes`` by decreasing score; padding is 0) and
      keep_valid [max_output] bool. The first ``max_output`` entries of torchvision's result.
    """
    return _greedy_nms(boxes, scores, valid, jnp.zeros(scores.shape, jnp.int32), iou_threshold, max_output)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    class_ids: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
) -> tuple[jax.Array, jax.Array]:
    """Class-aware ``torchvision.ops.batched_nms``: boxes only suppress boxes of the same class.

    Same arguments and outputs as :func:`nms`, plus ``class_ids [N]`` int. Suppression is restricted
    to equal class ids directly: exactly torchvision's per-class path (which it takes on CPU for more
    than 1000 boxes), and its coordinate-offset path (boxes + class_id * (max_coordinate + 1))
    except where that offset's float32 rounding moves an IoU across the threshold.
    """
    return _greedy_nms(boxes, scores, valid, class_ids, iou_threshold, max_output)

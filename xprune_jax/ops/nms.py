"""Greedy non-maximum suppression with static shapes, identical to ``torchvision.ops.nms`` / ``batched_nms``.

``iou_threshold`` (a Python float) and ``max_output`` (a Python int) are static; boxes, scores, class
ids and ``valid`` may be traced. Both functions work under ``jax.jit`` and ``jax.vmap``.

Two exact algorithms give the same boxes in the same order; ``method`` picks one:

- ``"tiled"`` (the default): the candidates in score order, ``tile`` at a time (as TF's
  ``non_max_suppression_padded``): a tile is suppressed by the boxes kept so far in one
  ``[tile, max_output]`` IoU block, then by itself through a ``[tile, tile]`` IoU block iterated
  to its fixed point. A few steps of parallel work instead of one step per kept box: RetinaNet's
  300 detections from ~2000 candidates take at most 8-10 steps of 256, Faster R-CNN's 1000
  proposals from ~4700 at most 19. The tile is 256 on CPU and 512 elsewhere (``lax.platform_dependent``: chosen when the computation is lowered for its
  platform); benchmarks/README.md has the measurements.
- ``"loop"``: one step per kept box (at most ``max_output`` steps of O(N) work): the simplest form,
  kept as the baseline the benchmarks compare with. 2-6x slower on CPU at the detectors' sizes;
  on an accelerator each of its hundreds of steps costs kernel launches and a host round trip for
  the loop's condition.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xprune_jax.ops.boxes import box_iou

METHODS = ("tiled", "loop")
TILE = {"cpu": 256, "default": 512}  # candidates per step of the tiled algorithm, per platform
_SHAPES_ONLY = contextvars.ContextVar("nms_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Within this context NMS keeps no box, at its real output shapes and dtypes: for abstract traces
    that read only shapes (the layer analysis of a detector), which would otherwise trace the tiled
    algorithm once per platform (and again under ``vmap``). Never compute values inside it."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _float32_threshold(iou_threshold: float) -> np.float32:
    """The largest float32 <= ``iou_threshold``.

    torchvision compares the float32 IoU with a float64 threshold; for a float32 ``x``,
    ``x > t32`` holds exactly when ``x > iou_threshold`` does (e.g. for 0.6, whose float32 rounds up).
    """
    threshold = np.float32(iou_threshold)
    if float(threshold) > iou_threshold:  # compared in float64
        threshold = np.nextafter(threshold, np.float32(-np.inf))
    return threshold


def _score_order(scores, valid):
    """Valid boxes by decreasing score (stable: ties in index order, as torchvision's CPU sort), then the rest."""
    return jnp.argsort(jnp.where(valid, scores, -jnp.inf), descending=True, stable=True)


def _nms_loop(boxes, class_ids, candidates, threshold, max_output: int):
    """Kept positions (into the score-ordered ``boxes``) and their count, one kept box per step.

    Each step keeps the best remaining candidate and drops the candidates of its class whose IoU with
    it is strictly above the threshold; the loop ends after ``max_output`` boxes or when none is left.
    """

    def has_room_and_candidates(state):
        remaining, _, num_kept = state
        return (num_kept < max_output) & jnp.any(remaining)

    def keep_best_candidate(state):
        remaining, kept, num_kept = state
        best = jnp.argmax(remaining)  # the first remaining candidate has the highest score
        overlapping = box_iou(boxes[best][None], boxes)[0] > threshold
        remaining &= ~(overlapping & (class_ids == class_ids[best]))
        remaining = remaining.at[best].set(False)  # zero-area boxes have NaN IoU with themselves
        return remaining, kept.at[num_kept].set(best.astype(jnp.int32)), num_kept + 1

    initial = (candidates, jnp.zeros(max_output, jnp.int32), jnp.int32(0))
    _, kept, num_kept = lax.while_loop(has_room_and_candidates, keep_best_candidate, initial)
    return kept, num_kept


def _nms_tiled(boxes, class_ids, candidates, threshold, max_output: int, tile: int):
    """:func:`_nms_loop`'s result, ``tile`` score-ordered candidates per step.

    Within a tile, box j is kept iff it is a candidate, no box kept in earlier tiles suppresses it, and
    no kept box i < j of the tile does. That recursion has one solution, which iterating it from
    "all candidates kept" reaches: after k rounds the first k boxes are right, and a round that
    changes nothing has found it (usually after a few rounds). The steps stop once ``max_output``
    boxes are kept or no candidate is left.
    """
    n = boxes.shape[0]
    tile = min(tile, n)
    padded = -(-n // tile) * tile
    if padded != n:
        boxes = jnp.pad(boxes, ((0, padded - n), (0, 0)))
        class_ids = jnp.pad(class_ids, (0, padded - n))
        candidates = jnp.pad(candidates, (0, padded - n))
    # Candidates come first in score order: the tiles after the last one hold none.
    tiles_needed = (jnp.max(jnp.where(candidates, jnp.arange(padded), -1)) + tile) // tile
    later = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # [i, j]: i comes before j

    def more_to_keep(state):
        step, num_kept, *_ = state
        return (step < tiles_needed) & (num_kept < max_output)

    def keep_from_tile(state):
        step, num_kept, kept, kept_boxes, kept_classes = state
        start = step * tile
        tile_boxes = lax.dynamic_slice_in_dim(boxes, start, tile)
        tile_classes = lax.dynamic_slice_in_dim(class_ids, start, tile)
        # Suppressed by a box kept in an earlier tile (slots past num_kept hold no box).
        by_kept = ((box_iou(tile_boxes, kept_boxes) > threshold) & (tile_classes[:, None] == kept_classes[None])
                   & (jnp.arange(max_output) < num_kept)[None])
        open_ = lax.dynamic_slice_in_dim(candidates, start, tile) & ~jnp.any(by_kept, axis=1)
        suppresses = ((box_iou(tile_boxes, tile_boxes) > threshold) & (tile_classes[:, None] == tile_classes[None])
                      & later)

        def changed(inner):
            keep, previous = inner
            return jnp.any(keep != previous)

        def refine(inner):
            keep, _ = inner
            return open_ & ~jnp.any(suppresses & keep[:, None], axis=0), keep

        keep, _ = lax.while_loop(changed, refine, refine((open_, open_)))
        slot = num_kept + jnp.cumsum(keep) - 1
        slot = jnp.where(keep & (slot < max_output), slot, max_output)  # past the end: dropped
        return (step + 1, jnp.minimum(num_kept + jnp.sum(keep, dtype=jnp.int32), max_output),
                kept.at[slot].set(start + jnp.arange(tile, dtype=jnp.int32), mode="drop"),
                kept_boxes.at[slot].set(tile_boxes, mode="drop"), kept_classes.at[slot].set(tile_classes, mode="drop"))

    initial = (jnp.int32(0), jnp.int32(0), jnp.zeros(max_output, jnp.int32), jnp.zeros((max_output, 4), boxes.dtype),
               jnp.zeros(max_output, class_ids.dtype))
    _, num_kept, kept, _, _ = lax.while_loop(more_to_keep, keep_from_tile, initial)
    return kept, num_kept


def _greedy_nms(boxes, scores, valid, class_ids, iou_threshold: float, max_output: int, method: str,
                tile: int | None):
    """Greedy NMS in which a kept box suppresses the boxes of its own class only."""
    if method not in METHODS:
        raise ValueError(f"NMS method must be one of {METHODS}, got {method!r}")
    if _SHAPES_ONLY.get():
        return jnp.zeros(max_output, jnp.int32), jnp.zeros(max_output, bool)
    order = _score_order(scores, valid)  # invalid boxes are never candidates
    args = (boxes[order], class_ids[order], valid[order])
    threshold = _float32_threshold(iou_threshold)
    if method == "loop":
        kept, num_kept = _nms_loop(*args, threshold, max_output)
    elif tile is not None:
        kept, num_kept = _nms_tiled(*args, threshold, max_output, tile)
    else:
        kept, num_kept = lax.platform_dependent(*args, **{
            platform: functools.partial(_nms_tiled, threshold=threshold, max_output=max_output, tile=size)
            for platform, size in TILE.items()})
    keep_valid = jnp.arange(max_output) < num_kept
    return jnp.where(keep_valid, order[kept], 0).astype(jnp.int32), keep_valid


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float, max_output: int,
        method: str = "tiled", tile: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``torchvision.ops.nms`` over the ``valid`` boxes, padded to ``max_output``.

    Args:
      boxes: [N, 4] (x1, y1, x2, y2). scores: [N]. valid: [N] bool; invalid boxes are never kept
        and never suppress.
      iou_threshold: suppress boxes whose IoU with a kept box is strictly greater.
      max_output: static output length.
      method: "tiled" or "loop" (see the module docstring); both give the same result.
      tile: candidates per step of "tiled" (None: the platform's, :data:`TILE`).
    Returns:
      keep_idx [max_output] int32 (indices into ``boxes`` by decreasing score; padding is 0) and
      keep_valid [max_output] bool. The first ``max_output`` entries of torchvision's result.
    """
    return _greedy_nms(boxes, scores, valid, jnp.zeros(scores.shape, jnp.int32), iou_threshold, max_output, method,
                       tile)


def batched_nms(boxes: jax.Array, scores: jax.Array, class_ids: jax.Array, valid: jax.Array, iou_threshold: float,
                max_output: int, method: str = "tiled", tile: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Class-aware ``torchvision.ops.batched_nms``: boxes only suppress boxes of the same class.

    Same arguments and outputs as :func:`nms`, plus ``class_ids [N]`` int. Suppression is restricted
    to equal class ids directly: exactly torchvision's per-class path (which it takes on CPU for more
    than 1000 boxes), and its coordinate-offset path (boxes + class_id * (max_coordinate + 1))
    except where that offset's float32 rounding moves an IoU across the threshold.
    """
    return _greedy_nms(boxes, scores, valid, class_ids, iou_threshold, max_output, method, tile)

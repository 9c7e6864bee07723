"""torchvision's ``AnchorGenerator``, computed in NumPy (shapes are static, so anchors are constants)."""

from collections.abc import Sequence

import numpy as np


def _cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred anchors ``[len(ratios) * len(sizes), 4]``, ratio-major, in torchvision's float32 arithmetic."""
    scales = np.asarray(sizes, dtype=np.float32)
    h_ratios = np.sqrt(np.asarray(aspect_ratios, dtype=np.float32))
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))  # half to even, like torch.round


def grid_anchors(
    sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[Sequence[float]],
    feature_sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
) -> np.ndarray:
    """Anchors ``[sum_l h_l * w_l * A_l, 4]`` of ``AnchorGenerator(sizes, aspect_ratios)`` (float32).

    ``image_size`` is the padded batch size (H, W). Per level, stride = image_size // feature_size,
    shifts are top-left (``arange(w) * stride``), and anchors are ordered by location (y, x), then anchor.
    """
    levels = []
    for level_sizes, ratios, (height, width) in zip(sizes, aspect_ratios, feature_sizes, strict=True):
        base = _cell_anchors(level_sizes, ratios)
        shift_y, shift_x = np.meshgrid(
            np.arange(height) * (image_size[0] // height), np.arange(width) * (image_size[1] // width), indexing="ij"
        )
        shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4).astype(np.float32)
        levels.append((shifts + base[None]).reshape(-1, 4))
    return np.concatenate(levels)

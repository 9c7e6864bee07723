"""The one interface every detector implements, so COCO evaluation and prediction are written once.

A detector's preprocessing differs (torchvision's GeneralizedRCNNTransform, Ultralytics' letterbox
with rectangular batches), so each detector supplies a :class:`DetectionPipeline`; the harness in
``xprune_jax.evaluation`` drives any of them the same way:

    batches = pipeline.plan(sizes, batch_size)           # host: group images, fix input shapes
    for batch in batches:
        arrays, metas = zip(*(pipeline.preprocess(img, batch.input_shape) for img in images))
        out = jitted(pipeline.forward)(variables, stack(arrays))   # device: padded detections
        boxes = pipeline.to_original(out["boxes"][i], metas[i])    # host: original pixels

Static shapes throughout: every output is padded to ``max_detections`` with a ``valid`` mask.
"""

import dataclasses
from typing import Any, Protocol

import numpy as np


CONFIDENCE_TOP_K = 100  # detectors output (and the confidence objective sums) each image's top-k pre-NMS scores


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    indices: tuple[int, ...]  # positions in the image list
    input_shape: tuple[int, int]  # (H, W) of the batch tensor; few distinct values = few compilations


class DetectionPipeline(Protocol):
    max_detections: int

    def plan(self, sizes: list[tuple[int, int]], batch_size: int) -> list[BatchPlan]:
        """Group images (given as original (h, w)) into batches with fixed input shapes."""

    def preprocess(self, image: np.ndarray, input_shape: tuple[int, int]) -> tuple[np.ndarray, Any]:
        """HWC uint8 RGB image -> (HWC float32 network input of ``input_shape``, meta for to_original)."""

    def forward(self, variables: dict, images, candidates_from: dict | None = None, return_raw: bool = False) -> dict:
        """Jittable: [B, H, W, 3] -> {"boxes" [B, N, 4] xyxy in input pixels, "scores" [B, N],
        "labels" [B, N] COCO category ids (1..90), "valid" [B, N] bool}, N = max_detections.

        With ``return_raw``, also ``raw``: the network's outputs before post-processing (a dict of
        arrays). Given another forward's ``raw`` on the same images as ``candidates_from``, the
        post-processing reads it instead (and ``raw`` is returned, so the network still runs): the
        network is timed with the post-processing's work held fixed."""

    def to_original(self, boxes: np.ndarray, meta: Any) -> np.ndarray:
        """Boxes [N, 4] in input pixels -> xyxy in the original image's pixels."""

    @property
    def class_indices(self) -> dict[int, int]:
        """COCO category id -> the class index of the model's training loss (ground truth for ``loss``)."""

    def to_input(self, boxes: np.ndarray, meta: Any) -> np.ndarray:
        """xyxy boxes [N, 4] in original pixels -> input pixels, as the training transform maps targets."""


def batches_by_shape(shapes: list[tuple[int, int]], batch_size: int) -> list[BatchPlan]:
    """Batches of images (given as their input shapes) that share an input shape, in order of first
    appearance: each image's input does not depend on the other images or on the batch size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return [BatchPlan(tuple(indices[i:i + batch_size]), shape)
            for shape, indices in groups.items() for i in range(0, len(indices), batch_size)]

"""YOLOv8 as Ultralytics 8.4.190 runs it, as two :class:`xprune_jax.detection.DetectionPipeline`
implementations: COCO validation (``model.val()``, :class:`YOLOv8Pipeline`, for ``xprune eval``
and the experiments) and prediction (``model.predict(image)``, :class:`YOLOv8PredictPipeline`, for
``xprune predict``).

Validation (``DetectionValidator``):

- Batches are rectangular (``BaseDataset.set_rectangle``): images sorted by aspect ratio h/w
  (``np.argsort``, so give the images in Ultralytics' order, sorted file names, for identical
  batches), each batch shaped ``ceil(shape * imgsz / 32 + 0.5) * 32`` where shape is ``(max ar, 1)``
  for landscape batches, ``(1, 1 / min ar)`` for portrait ones and ``(1, 1)`` for mixed ones. The
  shapes thus depend on the batch size (Ultralytics' default: 16).
- Resize (``BaseDataset.load_image``): the long side to ``imgsz``, the other side ``ceil``-ed, with
  cv2 INTER_LINEAR whether shrinking or enlarging (older 8.x versions used INTER_AREA to shrink; not
  verified here). Letterbox (``LetterBox(scaleup=False)``, centred) to the batch shape with 114;
  RGB / 255. Ultralytics decodes JPEGs with cv2; the caller's decoder may differ slightly.
- NMS (``non_max_suppression`` as the validator calls it): conf 0.001, IoU 0.7, multi-label (one
  candidate per box and class scoring above conf, in box-major order), at most 30000 candidates by
  score, class-aware through a ``class * 7680`` coordinate offset, 300 detections. Static shapes:
  the candidates are the top 30000 box-class pairs (padding marked invalid). Ultralytics' NMS time
  limit (2 s + 0.05 s per image, after which it leaves the rest of the batch empty) is not
  reproduced: on a slow CPU it can truncate Ultralytics' own results.
- Boxes go back to the original image like ``scale_boxes`` with the letterbox's ``ratio_pad``
  (per-axis gains in this version; older 8.x used ``ratio_pad[0][0]`` for both axes), clipped to
  the image. Labels map 80 -> 91 COCO ids (``coco80_to_coco91_class``), or to class + 1 for models
  with another number of classes.

Prediction (``DetectionPredictor``, one image per call, as ``model.predict(image)`` runs it):

- ``LetterBox(auto=True)`` straight from the original image: scaled by ``min(imgsz / h, imgsz / w)``
  (up or down; sides ``round``-ed, at least 1) with cv2 INTER_LINEAR, padded with 114, centred, to
  the next multiple of 32 on each side. Ultralytics letterboxes a batch of several images with
  ``auto`` only when all have the same shape, and to ``imgsz`` squares otherwise; batches here group
  images of the same input shape, so every image gets what it gets alone, whatever its neighbours
  and the batch size, and a folder compiles once per distinct input shape.
- NMS as ``DetectionPredictor.postprocess`` calls it: conf 0.25, IoU 0.7, single label (each box's
  best class, if above conf), at most 30000 candidates by score, class-aware, 300 detections.
- Boxes go back like ``scale_boxes`` without ``ratio_pad``: gains and padding recomputed from the
  input and original shapes. Where the short side's padding is 0 and its size was rounded down,
  that recomputed gain is not the letterbox's (a 200x333 image at 640 is resized to 384x640, its
  boxes scaled back as if from 384x639): Ultralytics' boxes, reproduced as they are. Clipping,
  labels and the untimed NMS as for validation.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax.detection import BatchPlan, batches_by_shape
from xprune_jax.models.yolov8 import MAX_STRIDE, YOLOv8, YOLOv8Spec
from xprune_jax.ops import nms, top_k_above

COCO80_TO_COCO91 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                    32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                    58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                    88, 89, 90)


def category_ids(num_classes: int) -> tuple[int, ...]:
    """The COCO category id of each class index: COCO-80 -> COCO-91 ids, other datasets ids 1..K."""
    return COCO80_TO_COCO91 if num_classes == 80 else tuple(range(1, num_classes + 1))


@dataclasses.dataclass(frozen=True)
class LetterboxMeta:
    original_shape: tuple[int, int]  # (h, w) of the original image
    gain: tuple[float, float]  # (y, x): input pixels per original pixel
    pad: tuple[int, int]  # (left, top) padding in input pixels


@dataclasses.dataclass(frozen=True)
class YOLOv8Pipeline:
    """Ultralytics' validation (rectangular batches, multi-label NMS at conf 0.001); for a converted
    model, ``YOLOv8Pipeline(model.spec, imgsz=model.meta["preprocess"]["imgsz"])``."""

    spec: YOLOv8Spec
    imgsz: int = 640
    conf_threshold: float = 0.001
    iou_threshold: float = 0.7
    max_detections: int = 300
    max_candidates: int = 30000  # Ultralytics' max_nms
    class_offset: float = 7680.0  # Ultralytics' max_wh
    multi_label: bool = True
    batch_pad: float = 0.5
    pad_value: int = 114

    def plan(self, sizes: list[tuple[int, int]], batch_size: int) -> list[BatchPlan]:
        shapes = np.asarray(sizes)
        aspect = shapes[:, 0] / shapes[:, 1]
        order = aspect.argsort()
        plans = []
        for start in range(0, len(order), batch_size):
            indices = order[start: start + batch_size]
            low, high = aspect[indices].min(), aspect[indices].max()
            relative = (high, 1.0) if high < 1 else (1.0, 1.0 / low) if low > 1 else (1.0, 1.0)
            height, width = (math.ceil(r * self.imgsz / MAX_STRIDE + self.batch_pad) * MAX_STRIDE for r in relative)
            plans.append(BatchPlan(tuple(int(i) for i in indices), (height, width)))
        return plans

    def preprocess(self, image: np.ndarray, input_shape: tuple[int, int]) -> tuple[np.ndarray, LetterboxMeta]:
        import cv2  # Ultralytics' own dependency, needed only here

        h0, w0 = image.shape[:2]
        ratio = self.imgsz / max(h0, w0)
        if ratio != 1:
            size = (min(math.ceil(w0 * ratio), self.imgsz), min(math.ceil(h0 * ratio), self.imgsz))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        h1, w1 = image.shape[:2]
        ratio = min(input_shape[0] / h1, input_shape[1] / w1, 1.0)
        new_h, new_w = max(round(h1 * ratio), 1), max(round(w1 * ratio), 1)
        image, pad = self._letterbox(image, (new_h, new_w), input_shape)
        return image, LetterboxMeta((h0, w0), (h1 / h0 * ratio, w1 / w0 * ratio), pad)

    def _letterbox(self, image: np.ndarray, size: tuple[int, int], input_shape: tuple[int, int]):
        """``image`` resized to ``size`` (h, w) with INTER_LINEAR, centred in ``input_shape`` padded
        with ``pad_value``, scaled to [0, 1]; and its (left, top) padding."""
        import cv2

        if size != image.shape[:2]:
            image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        dh, dw = (input_shape[0] - size[0]) / 2, (input_shape[1] - size[1]) / 2
        if dh < 0 or dw < 0:
            raise ValueError(f"input shape {input_shape} is smaller than the resized image {size}")
        top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(self.pad_value,) * 3)
        return image.astype(np.float32) / 255.0, (left, top)

    def forward(self, variables: dict, images, candidates_from: dict | None = None, return_raw: bool = False) -> dict:
        """Padded detections; ``raw`` is the network's ``predictions [B, 4 + nc, A]`` (see
        :meth:`xprune_jax.detection.DetectionPipeline.forward`)."""
        raw = {"predictions": YOLOv8(self.spec).apply(variables, images)}
        detections = jax.vmap(self._select)(jnp.swapaxes((candidates_from or raw)["predictions"], 1, 2))
        return {**detections, "raw": raw} if return_raw or candidates_from is not None else detections

    def _select(self, predictions):
        """One image's ``[A, 4 + nc]`` predictions -> padded detections after NMS."""
        centers, half_sizes = predictions[:, :2], predictions[:, 2:4] / 2
        boxes = jnp.concatenate([centers - half_sizes, centers + half_sizes], axis=-1)
        class_scores = predictions[:, 4:]
        num_classes = class_scores.shape[1]
        # Multi-label: a candidate per box and class, box-major (the order of torch.where(scores > conf));
        # single label: a candidate per box, its best class.
        scores = class_scores.reshape(-1) if self.multi_label else class_scores.max(axis=1)
        # the best max_candidates above conf, in index order: NMS orders them by score (stable), as top_k would
        candidate_scores, index, candidates = top_k_above(scores, self.conf_threshold,
                                                          min(self.max_candidates, scores.size))
        if self.multi_label:
            box_index, classes = index // num_classes, index % num_classes
        else:
            box_index, classes = index, jnp.argmax(class_scores, axis=1)[index]
        candidate_boxes = boxes[box_index]
        offset_boxes = candidate_boxes + (classes.astype(boxes.dtype) * self.class_offset)[:, None]
        keep, valid = nms(offset_boxes, candidate_scores, candidates, self.iou_threshold, self.max_detections)
        class_ids = np.asarray(category_ids(num_classes), np.int32)
        return {"boxes": jnp.where(valid[:, None], candidate_boxes[keep], 0.0),
                "scores": jnp.where(valid, candidate_scores[keep], 0.0),
                "labels": jnp.where(valid, jnp.asarray(class_ids)[classes[keep]], 0),
                "valid": valid}

    @property
    def class_indices(self) -> dict[int, int]:
        return {category: index for index, category in enumerate(category_ids(self.spec.detect.num_classes))}

    def to_input(self, boxes: np.ndarray, meta: LetterboxMeta) -> np.ndarray:
        """xyxy boxes in original pixels -> input pixels (the inverse of :meth:`to_original`)."""
        (gain_y, gain_x), (pad_x, pad_y) = meta.gain, meta.pad
        return (np.asarray(boxes, np.float64) * (gain_x, gain_y, gain_x, gain_y) + (pad_x, pad_y, pad_x, pad_y)).astype(np.float32)

    def to_original(self, boxes: np.ndarray, meta: LetterboxMeta) -> np.ndarray:
        (gain_y, gain_x), (pad_x, pad_y), (height, width) = meta.gain, meta.pad, meta.original_shape
        boxes = (np.asarray(boxes, np.float64) - (pad_x, pad_y, pad_x, pad_y)) / (gain_x, gain_y, gain_x, gain_y)
        return np.clip(boxes, 0, (width, height, width, height)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class YOLOv8PredictPipeline(YOLOv8Pipeline):
    """Ultralytics' ``model.predict(image)``: each image letterboxed alone to its own minimal
    rectangle, single-label NMS at conf 0.25."""

    conf_threshold: float = 0.25
    multi_label: bool = False

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        ratio = min(self.imgsz / height, self.imgsz / width)
        return max(round(height * ratio), 1), max(round(width * ratio), 1)

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """``LetterBox(auto=True)``'s output shape: the resized image padded to multiples of 32."""
        return tuple(side + (self.imgsz - side) % MAX_STRIDE for side in self._resized_size(height, width))

    def plan(self, sizes: list[tuple[int, int]], batch_size: int) -> list[BatchPlan]:
        return batches_by_shape([self.input_shape(h, w) for h, w in sizes], batch_size)

    def preprocess(self, image: np.ndarray, input_shape: tuple[int, int]) -> tuple[np.ndarray, LetterboxMeta]:
        h0, w0 = image.shape[:2]
        image, _ = self._letterbox(image, self._resized_size(h0, w0), input_shape)
        # scale_boxes without ratio_pad: the gain and padding recomputed from the two shapes.
        gain = min(input_shape[0] / h0, input_shape[1] / w0)
        h1, w1 = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
        pad = round((input_shape[1] - w1) / 2 - 0.1), round((input_shape[0] - h1) / 2 - 0.1)
        return image, LetterboxMeta((h0, w0), (h1 / h0, w1 / w0), pad)

"""Labels made from a reference detector's own boxes, so that "the same mAP" can fail with random weights.

A detector with random weights scores AP 0 on the real COCO labels, so two implementations agreeing
there proves nothing. Against labels made from the reference's top boxes, jittered, the AP is far
from 0 and 1, and it moves when a box, score or label of either side moves.
"""

import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO


def ground_truth_from_dict(dataset: dict) -> COCO:
    """A pycocotools ground truth from an in-memory dataset in the instances_val2017.json layout."""
    ground_truth = COCO()
    ground_truth.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
    return ground_truth


def pseudo_ground_truth(annotation_file, reference: list[dict], image_ids: list[int], top: int = 15,
                        jitter: float = 0.15, seed: int = 0) -> COCO:
    """The real annotation file's images and categories, with its annotations replaced by each image's
    ``top`` highest-scoring ``reference`` detections (COCO results: image_id, category_id, bbox xywh,
    score) of a known category, every side moved by up to ``jitter`` times the box's width or height."""
    with open(annotation_file) as f:
        dataset = json.load(f)
    known = {c["id"] for c in dataset["categories"]}
    rng = np.random.default_rng(seed)
    pseudo = []
    for image_id in image_ids:
        ranked = sorted((d for d in reference if d["image_id"] == image_id and d["category_id"] in known),
                        key=lambda d: -d["score"])
        for d in ranked[:top]:
            x, y, w, h = d["bbox"]
            shift = rng.uniform(-jitter, jitter, 4) * [w, h, w, h]
            pseudo.append({"id": len(pseudo) + 1, "image_id": image_id, "category_id": d["category_id"], "iscrowd": 0,
                           "bbox": [x + shift[0], y + shift[1], w + shift[2], h + shift[3]], "area": float(w * h)})
    return ground_truth_from_dict({**dataset, "annotations": pseudo})

"""The trained YOLOv8n fixture (benchmarks/fixtures/yolov8n_shapes.pt) against its card.

The val split is regenerated with the card's generator parameters (no train images: every image
depends only on (seed, split, index)), checked byte-for-byte through the annotations' sha256, then
the fixture goes through the real conversion path and the repo's JAX COCO evaluation.
"""

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "benchmarks", "fixtures")
WEIGHTS = os.path.join(FIXTURES, "yolov8n_shapes.pt")
CARD = os.path.join(FIXTURES, "yolov8n_shapes.json")
AP_GOAL = 0.5  # AP50-95 on the generated val split, stated in benchmarks/fixtures/README.md
AP_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def card():
    if not os.path.exists(WEIGHTS) or not os.path.exists(CARD):
        pytest.fail(f"{WEIGHTS} or its card is missing: run benchmarks/fixtures/train_yolov8.py")
    with open(CARD) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def val_root(card, coco_root, tmp_path_factory):
    """The card's val split, regenerated from the real COCO images (conftest's ``coco_root``)."""
    from xprune_jax.data.synthetic import make_dataset

    p = card["dataset"]["parameters"]
    root = str(tmp_path_factory.mktemp("shapes") / "shapes")
    summary = make_dataset(root, str(coco_root), seed=p["seed"], train_images=0, val_images=p["val_images"],
                           image_size=p["image_size"], crop_size=p["crop_size"], progress=False)
    assert summary["parameters"]["backgrounds"] == p["backgrounds"]
    assert summary["splits"]["val"]["annotations_sha256"] == card["dataset"]["annotations_sha256"]["val"], \
        "the regenerated val split differs from the one the card was measured on"
    return root


def test_fixture_is_an_official_layout_checkpoint(card):
    import numpy as np
    import torch
    from converters.ultralytics_io import read_checkpoint

    from xprune_jax.fileio import file_sha256

    assert os.path.getsize(WEIGHTS) < 10 * 2**20
    assert file_sha256(WEIGHTS) == card["sha256"]
    obj = torch.load(WEIGHTS, map_location="cpu", weights_only=False)
    assert isinstance(obj, dict) and obj.get("ema") is None and obj.get("optimizer") is None
    assert type(obj["model"]).__name__ == "DetectionModel"
    assert all(p.dtype == torch.float16 for p in obj["model"].parameters())
    checkpoint = read_checkpoint(WEIGHTS)  # weights_only, with the allow-list
    assert checkpoint.imgsz == card["dataset"]["parameters"]["image_size"]
    trusted = read_checkpoint(WEIGHTS, trust_pickle=True)  # unpickled as Ultralytics does: the same
    assert (checkpoint.names, checkpoint.yaml, checkpoint.version) == (trusted.names, trusted.yaml, trusted.version)
    assert checkpoint.state_dict.keys() == trusted.state_dict.keys()
    assert all(np.array_equal(v, trusted.state_dict[k]) for k, v in checkpoint.state_dict.items())


def test_fixture_reaches_its_card_ap(card, val_root, tmp_path):
    from converters.ultralytics_io import convert
    from xprune_jax.data.synthetic import CLASSES
    from xprune_jax.evaluation.coco import evaluate

    model = convert("yolov8n", WEIGHTS)
    assert model.spec.detect.num_classes == len(CLASSES)
    assert list(model.meta["categories"]) == list(CLASSES) == card["names"]
    assert model.meta["preprocess"]["imgsz"] == card["dataset"]["parameters"]["image_size"]

    metrics = evaluate(model, val_root, str(tmp_path / "eval"), batch_size=card["metrics"]["jax_eval"]["batch_size"],
                       progress=False)
    assert metrics["images"] == card["metrics"]["val_images"]
    with open(tmp_path / "eval" / "latency.json") as f:
        assert json.load(f)["compiled_shapes"] == 1
    with open(tmp_path / "eval" / "detections.json") as f:
        labels = {d["category_id"] for d in json.load(f)}
    assert labels <= set(range(1, len(CLASSES) + 1))
    assert metrics["AP"] == pytest.approx(card["metrics"]["AP"], abs=AP_TOLERANCE)
    assert metrics["AP50"] == pytest.approx(card["metrics"]["AP50"], abs=AP_TOLERANCE)
    assert metrics["AP"] >= AP_GOAL

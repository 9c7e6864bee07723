"""The fixtures too large to commit (ResNet-50-FPN detectors) against their cards, where they are cached.

They are made by one command each (benchmarks/fixtures/README.md) into ``~/.cache/xprune_jax/fixtures``;
a checkout without them (CI) skips these tests. The val split is regenerated from the card's generator
parameters and checked through its annotations' sha256; the fixture goes through the real
conversion path (``xprune convert`` reads the file and its card) and the repo's JAX COCO evaluation.
"""

import json
import os

import pytest

CACHE = os.path.expanduser("~/.cache/xprune_jax/fixtures")
DETECTORS = ["retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn"]
AP_TOLERANCE = 0.005


def _cached(arch: str) -> tuple[str, dict]:
    weights = os.path.join(CACHE, f"{arch}_shapes.pth")
    card = os.path.splitext(weights)[0] + ".json"
    if not (os.path.exists(weights) and os.path.exists(card)):
        pytest.skip(f"{weights} is not cached here: make it with benchmarks/fixtures/train_detector.py --arch={arch}")
    with open(card) as f:
        return weights, json.load(f)


@pytest.fixture(scope="module")
def shapes_val(coco_root, tmp_path_factory):
    """Regenerates the val split of a card's dataset (every image depends only on seed, split and index)."""
    from xprune_jax.data.synthetic import make_dataset

    made = {}

    def regenerate(card: dict) -> str:
        p = card["dataset"]["parameters"]
        key = json.dumps(p, sort_keys=True)
        if key not in made:
            root = str(tmp_path_factory.mktemp("shapes") / "shapes")
            summary = make_dataset(root, str(coco_root), seed=p["seed"], train_images=0, val_images=p["val_images"],
                                   image_size=p["image_size"], crop_size=p["crop_size"], progress=False)
            assert summary["splits"]["val"]["annotations_sha256"] == card["dataset"]["annotations_sha256"]["val"], \
                "the regenerated val split differs from the one the card was measured on"
            made[key] = root
        return made[key]

    return regenerate


@pytest.mark.parametrize("arch", DETECTORS)
def test_cached_detector_reaches_its_card_ap(arch, shapes_val, tmp_path):
    from converters.torchvision_io import convert
    from xprune_jax.checkpoint import load_model, save_model
    from xprune_jax.evaluation.coco import evaluate
    from xprune_jax.fileio import file_sha256

    weights, card = _cached(arch)
    assert file_sha256(weights) == card["metrics"]["sha256"]
    save_model(convert(arch, weights), str(tmp_path / "model"))
    model = load_model(str(tmp_path / "model"))
    assert model.meta["categories"] == card["categories"] and model.spec.num_classes == len(card["categories"])
    assert (model.spec.transform.min_size, model.spec.transform.max_size) == \
        (card["transform"]["min_size"], card["transform"]["max_size"])
    metrics = evaluate(model, shapes_val(card), str(tmp_path / "eval"), batch_size=8, progress=False)
    assert metrics["images"] == card["metrics"]["val_images"]
    for key in ("AP", "AP50"):
        assert abs(metrics[key] - card["metrics"][key]) <= AP_TOLERANCE, (key, metrics[key], card["metrics"])

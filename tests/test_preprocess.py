"""Our classification transform equals torchvision's eval transform on real COCO images."""

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from converters.torchvision_io import assumption_note, convert, official_weights, preprocess_config
from xprune_jax import models
from xprune_jax.data.images import classification_transform, load_rgb


@pytest.mark.parametrize("weights", [torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                                     torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
                                     torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1])
def test_matches_torchvision_eval_transform(weights, coco_images):
    config = preprocess_config("resnet50" if "ResNet" in str(weights) else "mobilenet_v2", weights)
    sizes = set()
    for path in coco_images[:12]:
        img = load_rgb(str(path))
        sizes.add(img.size[0] > img.size[1])
        want = weights.transforms()(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
        got = classification_transform(img, **config)
        assert got.shape == want.shape == (224, 224, 3)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert sizes == {True, False}  # portrait and landscape images were both covered


def test_official_file_names_name_their_weights():
    """Every official download of every torchvision architecture here is recognised by its file name."""
    for arch, architecture in models.ARCHITECTURES.items():
        if architecture.module.__module__.endswith("yolov8"):
            continue
        for weights in torchvision.models.get_model_weights(arch):
            assert official_weights(arch, os.path.join("/any", os.path.basename(weights.url))) is weights
    assert official_weights("resnet50", "resnet50-0676ba61.pth") is torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    assert official_weights("resnet50", "resnet50-11ad3fa6.pth") is torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert official_weights("resnet50", "resnet50-mine.pth") is None
    assert official_weights("resnet101", "resnet50-0676ba61.pth") is None


@pytest.fixture(scope="module")
def mobilenet_bytes(tmp_path_factory):
    """A random MobileNetV2 state_dict file: the smallest architecture with V1 (resize 256) and V2 (232) weights."""
    path = tmp_path_factory.mktemp("mobilenet") / "w.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return path.read_bytes()


@pytest.mark.parametrize("name, weights, resize", [
    ("mobilenet_v2-b0353104.pth", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, 256),
    ("mobilenet_v2-7ebf99e0.pth", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2, 232),
], ids=["v1", "v2"])
def test_official_file_gets_its_own_transform(name, weights, resize, mobilenet_bytes, tmp_path):
    path = tmp_path / name
    path.write_bytes(mobilenet_bytes)
    model = convert("mobilenet_v2", str(path))
    assert model.meta["preprocess"] == preprocess_config("mobilenet_v2", weights)
    assert model.meta["preprocess"]["resize"] == resize
    provenance = model.meta["provenance"]
    assert provenance["weights"] == str(path) and provenance["weights_enum"] == str(weights)
    assert provenance["file_name_matches_sha256"] is False  # random weights under an official name
    assert "preprocess_assumed" not in provenance and assumption_note(model) is None


def test_other_file_says_which_transform_was_assumed(mobilenet_bytes, tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(mobilenet_bytes)
    model = convert("mobilenet_v2", str(path))
    assert model.meta["preprocess"]["resize"] == 232
    assert model.meta["provenance"]["preprocess_assumed"] == "MobileNet_V2_Weights.IMAGENET1K_V2"
    assert assumption_note(model) == (
        f"note: {path} has no model card and no official torchvision file name, so the preprocessing of "
        "MobileNet_V2_Weights.IMAGENET1K_V2 was assumed (resize 232, crop 224); if the weights were trained "
        f"otherwise, write a model card {tmp_path / 'mine.json'} with their 'preprocess' and convert again")
    card = dict(preprocess_config("mobilenet_v2", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1))
    (tmp_path / "mine.json").write_text(json.dumps({"preprocess": card}))
    model = convert("mobilenet_v2", str(path))
    assert model.meta["preprocess"]["resize"] == 256 and assumption_note(model) is None
    assert "preprocess_assumed" not in model.meta["provenance"]

"""Our classification transform equals torchvision's eval transform on real COCO images."""

import numpy as np
import pytest
import torchvision
from PIL import Image

from converters.torchvision_io import preprocess_config
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

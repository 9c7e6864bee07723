"""Converter parity on the bundled real COCO images: convert the three backbones and prove, layer by layer on the bundled real
COCO images, that the Flax ports compute what torchvision computes.

    xprune run --config=configs/parity.py

No download is needed: each torch model gets seeded random weights with BN statistics calibrated on
the images and then randomised. Set ``config.weights.resnet50 = "IMAGENET1K_V2"`` (or a .pth file)
to check real weights.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.experiment = "parity"
    config.archs = ("resnet50", "mobilenet_v2", "shufflenet_v2_x1_0")  # tuples can be overridden on the command line
    config.weights = ml_collections.ConfigDict({arch: "random" for arch in config.archs})
    config.images = ""  # '' = the bundled demo images
    config.seed = 0
    config.precision = "highest"  # the comparison is at full float32
    config.out_dir = ""  # '' = runs/parity-<timestamp>
    return config

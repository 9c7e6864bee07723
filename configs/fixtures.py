"""The honest version of the paper's table, on a network trained here (benchmarks/fixtures/): every
criterion (each grad_x_act reduction, l1, random), the paper's `zero` at 5% of layers, and `remove`
and `shrink` at -10/-20/-30/-50% FLOPs, each with three calibration seeds (other seeds, other
calibration images from the training split), measured on the generated validation split. Plans follow
the paper's layer-wise protocol (`config.pruning.allocation = "layer"`); `xprune prune`'s default global
channel allocation is compared with the peers in configs/peers.py.

    xprune synth --coco=../shared/coco_val2017_subset --out=$HOME/.cache/xprune_jax/shapes --seed=0
    xprune run --config=configs/fixtures.py:yolov8n    (or mobilenet_v2, shufflenet_v2_x1_0, resnet50,
                                                         retinanet_resnet50_fpn, fasterrcnn_resnet50_fpn)

Detectors report pycocotools AP on val2017; classifiers report top-1 accuracy on the object crops.
"""

import os

from xprune_jax.runs import config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = {
    "yolov8n": os.path.join(ROOT, "benchmarks", "fixtures", "yolov8n_shapes.pt"),
    "mobilenet_v2": os.path.join(ROOT, "benchmarks", "fixtures", "mobilenet_v2_shapes.pth"),
    "shufflenet_v2_x1_0": os.path.join(ROOT, "benchmarks", "fixtures", "shufflenet_v2_x1_0_shapes.pth"),
    # too large to commit (94, 130 and 166 MB): made by benchmarks/fixtures/train_{classifier,detector}.py and cached
    "resnet50": os.path.expanduser("~/.cache/xprune_jax/fixtures/resnet50_shapes.pth"),
    "retinanet_resnet50_fpn": os.path.expanduser("~/.cache/xprune_jax/fixtures/retinanet_resnet50_fpn_shapes.pth"),
    "fasterrcnn_resnet50_fpn": os.path.expanduser("~/.cache/xprune_jax/fixtures/fasterrcnn_resnet50_fpn_shapes.pth"),
}
BUDGETS = ("-10%", "-20%", "-30%", "-50%")


def get_config(arch: str = "yolov8n"):
    if arch not in FIXTURES:
        raise ValueError(f"no trained fixture for {arch}; choose one of {', '.join(FIXTURES)}")
    config = config_module(os.path.join(ROOT, "configs", "structural.py")).get_config(arch)
    config.weights = FIXTURES[arch]
    data = os.path.expanduser("~/.cache/xprune_jax/shapes")
    if arch.startswith(("yolov8", "retinanet", "fasterrcnn")):
        config.coco, config.calib_split, config.calib_images = data, "train2017", 32
    else:
        config.image_folder, config.calib_images = os.path.join(data, "classification"), 64
    config.criteria = ("grad_x_act", "grad_x_act:mean", "grad_x_act:signed", "l1", "random")
    config.prunings = ("zero:layers=5%",) + tuple(f"{mode}:flops={b}" for mode in ("remove", "shrink") for b in BUDGETS)
    config.seeds = (0, 1, 2)
    config.batch_size = 16
    config.bench.repeats = 10
    # the paper's protocol, as the committed tables ran it: whole groups ranked by layer score, the label-free
    # objective for detectors, and YOLOv8's Detect head (and its inputs) kept whole
    config.pruning.allocation = "layer"
    if arch.startswith(("yolov8", "retinanet", "fasterrcnn")):
        config.objective = "confidence"
    if arch.startswith("yolov8"):
        config.pruning.protect = ("model.22",)
    return config

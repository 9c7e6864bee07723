"""The README's main job: a small version of the paper's table on the YOLOv8n trained here
(benchmarks/fixtures/yolov8n_shapes.pt) and the synthetic shapes images bundled in the repo.

    xprune run --config=configs/demo.py

It scores every layer with the paper's grad_x_act (sum and mean reductions), the L1 baseline and
the random control (calibrating on the bundled training images), prunes under the paper's `zero`
(5% of layers), `remove` at -10% FLOPs and `shrink` at -20% and -30% FLOPs, then measures
pycocotools AP on the bundled validation images and latency side by side with the unpruned model.
About 2 minutes on 2 CPU cores.
The full table: configs/fixtures.py.
"""

import os

from xprune_jax.runs import config_module

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_SHAPES = os.path.join(os.path.dirname(HERE), "xprune_jax", "data", "demo_shapes")


def get_config():
    config = config_module(os.path.join(HERE, "fixtures.py")).get_config("yolov8n")
    config.coco, config.calib_split, config.calib_images = DEMO_SHAPES, "train2017", 16
    config.criteria = ("grad_x_act", "grad_x_act:mean", "l1", "random")
    config.prunings = ("zero:layers=5%", "remove:flops=-10%", "shrink:flops=-20%", "shrink:flops=-30%")
    config.seeds = (0,)
    config.batch_size = 8
    config.bench.repeats = 10
    return config

"""The paper's protocol on one classifier: score every layer, zero the bottom 5% of layers globally,
no fine-tuning, for each criterion and three calibration seeds. `zero` keeps the graph, so the
measured latency ratio shows timing noise, not a speed-up.

    xprune run --config=configs/paper_protocol.py:resnet50      (or mobilenet_v2, shufflenet_v2_x1_0)
"""

import os

from xprune_jax.runs import config_module


def get_config(arch: str = "resnet50"):
    config = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "structural.py")).get_config(arch)
    config.prunings = ("zero:layers=5%",)
    config.seeds = (0, 1, 2)
    return config

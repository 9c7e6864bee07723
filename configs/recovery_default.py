"""The tool's default after recovery: `xprune prune`'s auto allocation (of shrink:mean, shrink:max,
shrink:lamp and remove+shrink:mean, the plan of lowest calibration loss) on `grad_x_act` scores, at -30%
and -50% FLOPs, three calibration seeds, each pruned model recovered with configs/recovery.py's recipe
on the same trained fixture. Where auto chooses a plan the recovery table already measured, a run given
that table's measurements reuses them.

    xprune run --config=configs/recovery_default.py:mobilenet_v2 \
        "--config.measurements_from=('benchmarks/results/recovery/mobilenet_v2/measurements.json',)"
"""

import os

from xprune_jax.runs import config_module


def get_config(arch: str = "mobilenet_v2"):
    config = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "recovery.py")).get_config(arch)
    config.criteria = ("grad_x_act",)
    config.prunings = ("auto:flops=-30%", "auto:flops=-50%")
    config.seeds = (0, 1, 2)
    return config

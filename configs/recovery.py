"""Recovery after pruning, on a trained fixture: every pruned model measured as cut, after BN
recalibration and after fine-tuning (distillation from the unpruned model; detectors add their task loss
on the training split's boxes), with `xprune prune`'s
defaults (global channel allocation; a detector's training loss as the calibration objective), so
that the criteria are compared where it matters: after recovery.

    xprune run --config=configs/recovery.py:mobilenet_v2     (or shufflenet_v2_x1_0, yolov8n, resnet50,
                                                               retinanet_resnet50_fpn, fasterrcnn_resnet50_fpn)

The fine-tuning budget is fixed per fixture (FINETUNE_STEPS: about one epoch of its training split at
the batch size given) and stated in the report.
"""

import os

from xprune_jax.runs import config_module

# one epoch: classifiers 5,688 training crops at batch 32; detectors 2,000 training images at batch 16
FINETUNE_STEPS = {"mobilenet_v2": 178, "shufflenet_v2_x1_0": 178, "resnet50": 178, "yolov8n": 125,
                  "retinanet_resnet50_fpn": 125, "fasterrcnn_resnet50_fpn": 125}
# AdamW's peak learning rate. The R-CNNs fine-tune at their fixtures' own training rate: at 1e-3 the
# unpruned RetinaNet fine-tuned alike fell from AP 0.567 to 0.332, at 2e-4 it rose to 0.603
# (benchmarks/README.md, "RetinaNet's learning rate")
FINETUNE_LR = {"retinanet_resnet50_fpn": 2e-4, "fasterrcnn_resnet50_fpn": 2e-4}


def get_config(arch: str = "mobilenet_v2"):
    config = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures.py")).get_config(arch)
    detector = arch.startswith(("yolov8", "retinanet", "fasterrcnn"))
    config.pruning.allocation, config.pruning.protect, config.objective = "global", (), ""  # the tool's defaults
    config.criteria = ("grad_x_act", "taylor_weight", "l1", "random")
    config.prunings = ("shrink:flops=-30%", "shrink:flops=-50%", "remove:flops=-30%", "remove+shrink:flops=-50%")
    config.recovery.recalibrate_bn = 256
    config.recovery.finetune.steps = FINETUNE_STEPS[arch]
    config.recovery.finetune.batch_size = 16 if detector else 32
    config.recovery.finetune.lr = FINETUNE_LR.get(arch, 1e-3)
    # detectors: distillation plus the task loss on the training split's boxes (YOLOv8n, `remove` -30%:
    # AP 0.397 with distillation alone, 0.535 with both; benchmarks/README.md, "Recovery objectives")
    config.recovery.finetune.objective = "distill=1,task=1" if detector else "distill=1"
    return config

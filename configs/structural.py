"""Structural pruning of one classifier: every criterion, `remove` and `shrink` at several FLOPs
budgets beside the paper's `zero`, on the bundled demo images.

    xprune run --config=configs/structural.py:resnet50      (or mobilenet_v2, shufflenet_v2_x1_0, ...)

``weights="random"`` needs no download (seeded random weights, BN statistics calibrated then
randomised); the metric is then fidelity to the unpruned model, not accuracy. Point ``weights`` at
a model dir or a torchvision weights name for real networks, and ``coco`` at a COCO root.
"""

import ml_collections

from xprune_jax.pruning.select import CANDIDATES


def get_config(arch: str = "shufflenet_v2_x1_0"):
    config = ml_collections.ConfigDict()
    config.experiment = "prune"
    config.arch = arch
    config.weights = "random"
    config.trust_pickle = False  # YOLOv8 .pt weights: unpickle classes beyond the allow-list (only for trusted files)
    config.coco = ""  # '' = the bundled demo COCO folder
    config.image_folder = ""  # classifiers: an ImageFolder root with train/ (calibration) and val/ (top-1 accuracy)
    config.calib_split = "val2017"  # detectors: the COCO split that calibration images come from
    config.eval_images = 0  # 0 = all evaluation images
    config.criteria = ("grad_x_act", "grad_x_act:mean", "grad_x_act:signed", "l1", "random")
    config.objective = ""
    config.calib_images = 4
    config.batch_size = 4
    config.seeds = (0,)
    config.seed = 0
    config.precision = "highest"  # highest | default | bfloat16 (xprune_jax/precision.py); --precision overrides it
    config.prunings = ("zero:layers=5%", "remove:flops=-10%", "remove:flops=-20%", "shrink:flops=-10%",
                       "shrink:flops=-20%", "shrink:flops=-30%")
    # make_plan's options (xprune prune's flags): shrink allocates channels globally, each group keeping
    # at least `floor` of its width; allocation="layer" is the paper's protocol (whole groups, shrink_ratio each);
    # latency_price > 0 prices the channels by each layer's seconds per FLOP on this backend, measured once
    # per run into out_dir/layer_latency.json (or read from `layer_latency`, a table of `xprune prune`)
    config.pruning = ml_collections.ConfigDict({
        "allocation": "global", "normalize": "mean", "floor": 0.125, "round_to": 8, "shrink_ratio": 0.5,
        "remove_share": 0.5, "protect": (), "latency_price": 0.0, "layer_latency": "",
        # auto:BUDGET chooses among these MODE:NORMALIZE allocations by their loss on the calibration images
        "candidates": CANDIDATES})
    # recovery of every pruned model, each stage measured as the cut is (0 = off): BN statistics re-estimated
    # on `recalibrate_bn` training images, then `finetune.steps` steps distilling from the unpruned model;
    # with resume=True each fine-tuning checkpoints every `checkpoint_every` steps into out_dir/checkpoints/
    # (a stopped run resumes it there; the checkpoints go once its model is measured)
    config.recovery = ml_collections.ConfigDict({"recalibrate_bn": 0, "finetune": ml_collections.ConfigDict({
        "steps": 0, "batch_size": 16, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 1e-4, "objective": "distill=1",
        "checkpoint_every": 25})})
    config.save_models = False
    config.bench = ml_collections.ConfigDict({"batch_size": 1, "repeats": 10, "warmup": 2})
    config.out_dir = ""
    config.resume = False  # True: reuse out_dir's measurements.json (a stopped run goes on where it stopped)
    config.measurements_from = ()  # other runs' measurements.json to reuse (a table split over processes or machines)
    return config

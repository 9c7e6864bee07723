"""Our default ``xprune prune`` against Torch-Pruning (DepGraph, the ``torch-pruning`` package, pinned
1.6.1) on the trained fixtures at equal FLOPs: as cut, and (``recover``) after the same recovery.

    pip install -e ".[dev,peers]"
    xprune synth --coco=../shared/coco_val2017_subset --out=$HOME/.cache/xprune_jax/shapes --seed=0
    python benchmarks/bench_peers.py run --arch=mobilenet_v2     # or shufflenet_v2_x1_0, yolov8n, resnet50
    python benchmarks/bench_peers.py auto --arch=mobilenet_v2    # then: our default (--mode=auto) beside the peer's best
    python benchmarks/bench_peers.py recover --arch=mobilenet_v2 # then: both sides' best, recovered alike
    python benchmarks/bench_peers.py duel --arch=mobilenet_v2    # optional: re-time the latency duel (quiet machine)
    python benchmarks/bench_peers.py price --arch=resnet50       # optional: the shrink default priced by layer latency
    python benchmarks/bench_peers.py table                       # benchmarks/results/peers/table.md

Both sides prune the same torch weights (the fixture file; ours through the converter) with the same
calibration images (64 training crops for classifiers, 32 training images for YOLOv8n, drawn with
seeds 0, 1, 2 as ``configs/fixtures.py`` draws them), and are measured by one evaluator: every pruned
model, Torch-Pruning's included, runs as a JAX model in ``xprune_jax.experiments.prune``'s evaluator
(classifier top-1 on all validation crops; YOLOv8n pycocotools AP on the 200 validation images) and is
timed side by side with the unpruned model by the same runtime (latency ratio, warm-up excluded,
rounds in random order). A Torch-Pruning model comes back as our spec (per-layer widths read off the
pruned torch modules) and its state_dict through the converters' key mapping; its outputs are checked
against the torch module on validation images, and its FLOPs against the torch-side count.

- **Ours**: ``make_plan(model, scores, mode, "flops=-N%")`` with the library's defaults (global channel
  allocation, floor 1/8, round_to 8), for the criteria grad_x_act, grad_x_act:mean, taylor_weight, l1,
  l2, bn_scale and random, the normalisations mean (the default), max and lamp, and remove+shrink.
  Objectives as ``xprune prune`` chooses them: cross-entropy against the labels for classifiers, YOLOv8's
  training ``loss`` against the ground truth for YOLOv8n (``confidence`` reported beside it).
- **Torch-Pruning**: ``MetaPruner`` with ``GroupTaylorImportance`` (the gradient of the same objective
  on the same images, accumulated on the torch model), ``GroupMagnitudeImportance(p=1)`` (L1 magnitude)
  and ``GroupMagnitudeImportance(p=2)`` (group L2), local and global; the pruning ratio is found by
  bisection until the FLOPs ratio is within 1% of the budget. The same structural constraints as ours:
  the same layers are left alone (the stem conv, the classifier, YOLOv8's last Detect convs and DFL),
  ``round_to=8`` and ``max_pruning_ratio=0.875`` (our floor). YOLOv8's C2f is swapped for a split-free
  one (two 1x1 convs instead of one and a chunk, exact), as Torch-Pruning's YOLOv8 example does, since
  DepGraph can't trace Ultralytics 8.4's split.
- **FLOPs** are multiply-accumulates of convs and linear layers, ``xprune_jax.analysis``'s convention,
  counted on the torch side by forward hooks (:func:`torch_macs`), checked equal to ours on the
  unpruned model.

The latency duel (in ``run``, or again with ``duel``) times our shrink default's model and the peer's best of
each seed, all of them and the unpruned model side by side in one run; it reports our time over the
peer's per round and seed, pooled over the seeds.

``auto`` prunes as ``xprune prune`` does unasked (``--mode=auto``): for each seed and budget, every candidate
allocation (shrink with the mean, max and lamp normalisations, remove+shrink) is applied and the one with
the lowest loss on that seed's calibration images is kept. It records every candidate's loss beside the
metric ``run`` measured for it, and times the chosen models, the shrink default's, the peer's best and the
unpruned model side by side (``<arch>.auto.json``); the README's table of who wins reads it.

``price`` prunes as the shrink default does, with the global allocation priced by each layer's measured latency
(``xprune prune --latency_price=N``), and times those models beside the shrink default's and the peer's best
(``<arch>.latency_price.json``, with the layer latency table it used).

``recover`` takes our default (``auto``; ``--ours=shrink``: the shrink default) and Torch-Pruning's best model at
each budget (seed by seed) and recovers
both as ``configs/recovery.py`` does (BN recalibration, then about one epoch of distillation from the
unpruned model, with a detector's task loss), measuring each as cut, recalibrated and fine-tuned
(``<arch>.recovery.json``; where the task loss trains, with the unpruned model recovered alike).

Work is cached under ``~/.cache/xprune_jax/peers/`` keyed by content (converted models, scores,
Torch-Pruning's pruned models, every measurement), so a stopped run goes on where it stopped.
"""

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from xprune_jax.errors import UserError  # noqa: E402  (after the path: the repository's own package)

CACHE = os.path.expanduser("~/.cache/xprune_jax/peers")
RESULTS = os.path.join(HERE, "results", "peers")
DATA = os.path.expanduser("~/.cache/xprune_jax/shapes")
FIXTURES = {
    "mobilenet_v2": os.path.join(HERE, "fixtures", "mobilenet_v2_shapes.pth"),
    "shufflenet_v2_x1_0": os.path.join(HERE, "fixtures", "shufflenet_v2_x1_0_shapes.pth"),
    "resnet50": os.path.expanduser("~/.cache/xprune_jax/fixtures/resnet50_shapes.pth"),
    "yolov8n": os.path.join(HERE, "fixtures", "yolov8n_shapes.pt"),
}
LABELS = {"mobilenet_v2": "MobileNetV2", "shufflenet_v2_x1_0": "ShuffleNetV2 x1.0", "resnet50": "ResNet-50",
          "yolov8n": "YOLOv8n"}
TP_VERSION = "1.6.1"
TP_IMPORTANCES = ("taylor", "l1", "group_l2")
TP_SCOPES = ("local", "global")
TP_SETTINGS = {"round_to": 8, "max_pruning_ratio": 0.875, "flops_tolerance": 0.01, "max_bisection_steps": 24}
CRITERIA = ("grad_x_act", "grad_x_act:mean", "taylor_weight", "l1", "l2", "bn_scale", "random")
NORMALIZATIONS = ("mean", "max", "lamp")
DEFAULT = {"criterion": "grad_x_act", "mode": "shrink", "normalize": "mean"}  # the shrink default (what `price`, `recover` take)
AUTO = {"criterion": "grad_x_act", "mode": "auto"}  # what `xprune prune` does unasked (`auto`)


# ---------------------------------------------------------------------------------------------------
# FLOPs on the torch side


def torch_macs(module, example, skip: tuple[str, ...] = ("dfl",)) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one image, as ``xprune_jax.analysis`` counts
    them (output positions x kernel size x input channels per group; no biases, norms or activations).
    Modules whose path has a part in ``skip`` are left out (Ultralytics' DFL: a constant of our model)."""
    import torch

    total = 0

    def hook(m, inputs, out):
        nonlocal total
        per_output = m.in_features if isinstance(m, torch.nn.Linear) else \
            m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        total += out[0].numel() * per_output

    handles = [m.register_forward_hook(hook) for name, m in module.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not set(name.split(".")) & set(skip)]
    try:
        with torch.no_grad():
            module(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def torch_params(module, skip: tuple[str, ...] = ("dfl",)) -> int:
    """Trainable-layer parameters (buffers excluded), as ``analysis.count_params`` counts ours."""
    return sum(p.numel() for name, p in module.named_parameters() if not set(name.split(".")) & set(skip))


# ---------------------------------------------------------------------------------------------------
# The torch models: the fixtures, YOLOv8's split-free C2f, and pruned widths back into our spec


def split_free_c2f(module):
    """Ultralytics' ``C2f`` as Torch-Pruning's YOLOv8 example rewrites it: ``cv1`` (one conv whose output
    is chunked in two) becomes ``cv0`` and ``cv1``, one conv each half, with the same weights: exact."""
    import torch
    from ultralytics.nn.modules import C2f, Conv

    class SplitFreeC2f(torch.nn.Module):
        def __init__(self, old):
            super().__init__()
            self.c, c1 = old.c, old.cv1.conv.in_channels
            self.cv0, self.cv1 = Conv(c1, self.c, 1, 1), Conv(c1, self.c, 1, 1)
            for half, part in ((self.cv0, slice(0, self.c)), (self.cv1, slice(self.c, 2 * self.c))):
                half.conv.weight.data = old.cv1.conv.weight.data[part].clone()
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(half.bn, key).data = getattr(old.cv1.bn, key).data[part].clone()
                half.bn.eps, half.bn.momentum = old.cv1.bn.eps, old.cv1.bn.momentum
            self.cv2, self.m = old.cv2, old.m
            for attribute in ("i", "f", "type", "np"):  # what Ultralytics' forward and printing read
                if hasattr(old, attribute):
                    setattr(self, attribute, getattr(old, attribute))

        def forward(self, x):
            y = [self.cv0(x), self.cv1(x)]
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    for i, layer in enumerate(module.model):
        if isinstance(layer, C2f):
            module.model[i] = SplitFreeC2f(layer)
    return module.eval()


def torch_fixture(arch: str, path: str, num_classes: int):
    """The fixture as a torch module in eval mode (YOLOv8 with the split-free C2f)."""
    import torch
    import torchvision

    if arch.startswith("yolov8"):
        # the committed fixture: a whole pickled DetectionModel as Ultralytics saves it (the converter reads it alike)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return split_free_c2f((checkpoint.get("ema") or checkpoint["model"]).float())
    module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return module.eval()


def spec_from_torch(spec, module):
    """Our spec with the layer widths of ``module`` (a pruned copy of the model ``spec`` describes), as
    edits. YOLOv8: a neck bottleneck's output may come out narrower or wider than its C2f's chain width
    (the peer prunes it apart; our spec ties them), so the chain takes the widest and
    :func:`yolo_state_dict` pads the others with channels that are exactly zero."""
    import torch

    from xprune_jax.models.layers import Edits
    from xprune_jax.models.yolov8 import YOLOv8Spec

    widths = {name: m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
              for name, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    channels = {}
    if isinstance(spec, YOLOv8Spec):
        widths.pop(f"{spec.detect.name}.dfl.conv")
        for c in spec.c2fs:
            first = widths.pop(f"{c.name}.cv0.conv")
            hidden = max([widths[f"{c.name}.cv1.conv"]] + [widths[f"{c.name}.{b.name}.cv2.conv"] for b in c.bottlenecks])
            widths[f"{c.name}.cv1.conv"] = first + hidden
            widths.update({f"{c.name}.{b.name}.cv2.conv": hidden for b in c.bottlenecks})
            channels[f"{c.name}.first"], channels[f"{c.name}.second"] = range(first), range(first, first + hidden)
    return dataclasses.replace(spec, edits=Edits(tuple(sorted(widths.items())),
                                                 tuple(sorted((k, tuple(v)) for k, v in channels.items()))))


def _padded(array, width: int, axis: int, fill: float = 0.0):
    extra = width - array.shape[axis]
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, extra)
    return np.pad(array, pad, constant_values=fill) if extra else array


def yolo_state_dict(state_dict: dict, spec) -> tuple[dict, int]:
    """A split-free YOLOv8's state_dict in Ultralytics' own layout for ``spec`` (from
    :func:`spec_from_torch`): each C2f's ``cv0`` and ``cv1`` joined into ``cv1``, and a chain narrower
    than the spec's padded with exactly-zero channels (zero kernel rows, BN scale and shift 0: SiLU(0) =
    0; zero kernel columns where they are read). Also returns how many channels were padded."""
    sd, padded = dict(state_dict), 0
    bn = ("weight", "bias", "running_mean", "running_var")
    channels = dict(spec.edits.channels)
    for c in spec.c2fs:
        p, width, first = c.name, len(channels[f"{c.name}.second"]), len(channels[f"{c.name}.first"])
        chain = [sd[f"{p}.cv1.conv.weight"].shape[0]] + [sd[f"{p}.{b.name}.cv2.conv.weight"].shape[0] for b in c.bottlenecks]
        padded += sum(width - w for w in chain)
        sd[f"{p}.cv1.conv.weight"] = np.concatenate([sd.pop(f"{p}.cv0.conv.weight"), _padded(sd[f"{p}.cv1.conv.weight"], width, 0)])
        for k in bn:
            sd[f"{p}.cv1.bn.{k}"] = np.concatenate([sd.pop(f"{p}.cv0.bn.{k}"), _padded(
                sd[f"{p}.cv1.bn.{k}"], width, 0, 1.0 if k == "running_var" else 0.0)])
        sd.pop(f"{p}.cv0.bn.num_batches_tracked", None)
        for b in c.bottlenecks:
            sd[f"{p}.{b.name}.cv1.conv.weight"] = _padded(sd[f"{p}.{b.name}.cv1.conv.weight"], width, 1)
            sd[f"{p}.{b.name}.cv2.conv.weight"] = _padded(sd[f"{p}.{b.name}.cv2.conv.weight"], width, 0)
            for k in bn:
                sd[f"{p}.{b.name}.cv2.bn.{k}"] = _padded(sd[f"{p}.{b.name}.cv2.bn.{k}"], width, 0,
                                                         1.0 if k == "running_var" else 0.0)
        kernel = sd[f"{p}.cv2.conv.weight"]  # reads [cv0 | cv1 | m.0 | m.1 ...]
        bounds = np.cumsum([first] + chain)[:-1]
        pieces = np.split(kernel, bounds, axis=1)
        sd[f"{p}.cv2.conv.weight"] = np.concatenate([pieces[0]] + [_padded(x, width, 1) for x in pieces[1:]], axis=1)
    return sd, padded


def model_from_torch(base, module, what: str):
    """The pruned torch ``module`` as our :class:`Model` (spec from its widths, variables from its
    state_dict) and the number of zero channels padded in (YOLOv8 only)."""
    from converters.mapping import state_dict_to_variables
    from converters.ultralytics_io import DFL_KEY
    from xprune_jax import models
    from xprune_jax.checkpoint import Model

    spec = spec_from_torch(base.spec, module)
    state_dict, padded = {k: v.detach().numpy() for k, v in module.state_dict().items()}, 0
    if base.arch.startswith("yolov8"):
        state_dict.pop(DFL_KEY)
        state_dict, padded = yolo_state_dict(state_dict, spec)
    variables = state_dict_to_variables(state_dict, models.variable_shapes(base.arch, spec), what=what)
    return Model(base.arch, spec, variables, {**base.meta, "pruned_by": what}), padded


# ---------------------------------------------------------------------------------------------------
# Inputs both sides share


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Fixture:
    """One fixture: the torch module, our converted model, the evaluator, and the data both sides use."""

    def __init__(self, arch: str, bench_repeats: int, results: dict | None = None):
        import ml_collections
        import torch

        from xprune_jax.experiments import prune as experiment
        from xprune_jax.fileio import file_sha256

        path = FIXTURES[arch]
        if not os.path.isfile(path):
            raise UserError(f"no fixture {path}; make it first (benchmarks/fixtures/README.md)")
        if not os.path.isdir(os.path.join(DATA, "train2017")):
            raise UserError(f"no dataset in {DATA}; run `xprune synth --coco=../shared/coco_val2017_subset "
                            f"--out={DATA} --seed=0`")
        self.arch, self.detector = arch, arch.startswith("yolov8")
        self.sha256 = file_sha256(path)
        if results is not None and results["weights_sha256"] != self.sha256:
            raise UserError(f"the results for {arch} were made from another {path} (sha256 {results['weights_sha256'][:12]}, "
                            f"the file now {self.sha256[:12]}); re-run `python benchmarks/bench_peers.py run --arch={arch}`")
        self.model = self._converted(arch, path)
        self.torch = torch_fixture(arch, path, len(self.model.meta["categories"]))
        size = self.size = int(self.model.meta["preprocess"].get("crop") or self.model.meta["preprocess"]["imgsz"])
        self.example = torch.zeros(1, 3, size, size)
        config = ml_collections.ConfigDict({
            "coco": DATA, "image_folder": "" if self.detector else os.path.join(DATA, "classification"),
            "calib_split": "train2017", "calib_images": 32 if self.detector else 64, "eval_images": 0,
            "objective": "", "batch_size": 16, "seed": 0,
            "bench": {"batch_size": 1, "repeats": bench_repeats, "warmup": 2}})
        self.config = config
        self.evaluator = (experiment._DetectionEval if self.detector else experiment._ClassifierEval)(config, DATA, self.model)

    @staticmethod
    def _converted(arch: str, path: str):
        from xprune_jax.checkpoint import load_model, save_model
        from xprune_jax.fileio import file_sha256

        folder = os.path.join(CACHE, "models", f"{arch}-{file_sha256(path)[:16]}")
        if os.path.isfile(os.path.join(folder, "model.json")):
            return load_model(folder)
        if arch.startswith("yolov8"):
            from converters import ultralytics_io
            model = ultralytics_io.convert(arch, path)
        else:
            from converters import torchvision_io
            model = torchvision_io.convert(arch, path)
        save_model(model, folder, overwrite=True)
        return model

    def calibration(self, seed: int):
        return self.evaluator.calibration(seed)

    def val_inputs(self, n: int | None = None) -> np.ndarray:
        """Validation images as the evaluator feeds them (NHWC): classifier crops, or YOLOv8's letterbox."""
        from xprune_jax.attribution.score import calibration_loader

        paths = self.evaluator.paths[:n]
        return np.stack([calibration_loader(self.model)(p) for p in paths])


def torch_top1(module, fixture: Fixture) -> float:
    """Top-1 of a torch classifier on the evaluator's validation crops, transformed exactly as ours."""
    import torch

    x = fixture.__dict__.setdefault("_val_nhwc", fixture.val_inputs())
    predicted = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            predicted.append(module(torch.from_numpy(x[i:i + 64].transpose(0, 3, 1, 2).copy())).argmax(1).numpy())
    return float(np.mean(np.concatenate(predicted) == fixture.evaluator.labels))


def output_error(module, model, fixture: Fixture, n: int = 4) -> float:
    """max |JAX - torch| / max |torch| of the network outputs (logits; YOLOv8's decoded boxes and scores)
    on ``n`` validation images."""
    import torch

    x = fixture.val_inputs(n)
    with torch.no_grad():
        want = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    got = np.asarray(model.module.apply(model.variables, x))
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------------------------------
# Torch-Pruning


def tp_importance(name: str):
    import torch_pruning as tp

    return {"taylor": lambda: tp.importance.GroupTaylorImportance(),
            "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "group_l2": lambda: tp.importance.GroupMagnitudeImportance(p=2)}[name]()


def objective_gradients(fixture: Fixture, seed: int) -> dict:
    """dL/dparams of the torch model, summed over the calibration images of ``seed``, for the same
    objective our scores explain: cross-entropy against the labels (summed), or YOLOv8's
    ``v8DetectionLoss`` against the ground truth, each image as a batch of one (summed)."""
    import torch

    module = copy.deepcopy(fixture.torch)
    for p in module.parameters():
        p.requires_grad_(True)
        p.grad = None
    paths, truth = fixture.calibration(seed)
    if not fixture.detector:
        from xprune_jax.attribution.score import calibration_loader

        x = np.stack([calibration_loader(fixture.model)(p) for p in paths])
        labels = torch.from_numpy(np.asarray(truth, np.int64))
        for i in range(0, len(x), fixture.config.batch_size):
            logits = module(torch.from_numpy(x[i:i + fixture.config.batch_size].transpose(0, 3, 1, 2).copy()))
            torch.nn.functional.cross_entropy(logits, labels[i:i + fixture.config.batch_size], reduction="sum").backward()
    else:
        from ultralytics.cfg import get_cfg
        from ultralytics.utils.loss import v8DetectionLoss

        from xprune_jax.attribution.score import _example_loader

        module.args = get_cfg()  # default.yaml's gains: box 7.5, cls 0.5, dfl 1.5, as our port uses
        criterion = v8DetectionLoss(module)
        load = _example_loader(fixture.model, paths, truth)
        for i in range(len(paths)):
            example = load(i)
            image = example["images"]
            height, width = image.shape[:2]
            boxes = example["gt_boxes"][example["gt_mask"]].astype(np.float64)
            centre_size = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
            batch = {"batch_idx": torch.zeros(len(boxes)),
                     "cls": torch.from_numpy(example["gt_classes"][example["gt_mask"]].astype(np.float32)).view(-1, 1),
                     "bboxes": torch.from_numpy((centre_size / [width, height, width, height]).astype(np.float32))}
            _, raw = module(torch.from_numpy(image.transpose(2, 0, 1)[None].copy()))
            criterion(raw, batch)[0].sum().backward()
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def tp_prune(fixture: Fixture, importance: str, scope: str, target: float, ignored: list[str], gradients=None):
    """Torch-Pruning's one-shot pruning of a copy of the fixture, its pruning ratio bisected until the
    FLOPs ratio (torch-side count) is within ``flops_tolerance`` of ``target``: ``(module, record)``.
    With ``round_to=8`` local pruning moves every group of a width at the same ratio, so its FLOPs jump
    (YOLOv8n: from 0.72 to 0.59 at ratio 1/8); where no ratio lands within the tolerance, the bisection
    is redone with Torch-Pruning's default ``round_to=None`` (one channel at a time)."""
    import torch_pruning as tp

    base = torch_macs(fixture.torch, fixture.example)

    def trial(ratio, round_to):
        module = copy.deepcopy(fixture.torch)
        for name, p in module.named_parameters():
            p.requires_grad_(True)
            p.grad = gradients[name].clone() if gradients and name in gradients else None
        pruner = tp.pruner.MetaPruner(
            module, fixture.example, importance=tp_importance(importance), pruning_ratio=ratio,
            global_pruning=scope == "global", ignored_layers=[module.get_submodule(n) for n in ignored],
            round_to=round_to, max_pruning_ratio=TP_SETTINGS["max_pruning_ratio"])
        pruner.step()
        for p in module.parameters():
            p.grad = None
        return module.eval(), torch_macs(module, fixture.example) / base

    steps, best = [], None
    for round_to in (TP_SETTINGS["round_to"], None):
        low, high = 0.0, TP_SETTINGS["max_pruning_ratio"]
        for _ in range(TP_SETTINGS["max_bisection_steps"]):
            ratio = (low + high) / 2
            module, flops = trial(ratio, round_to)
            steps.append([ratio, flops, round_to])
            if best is None or abs(flops - target) < abs(best[2] - target):
                best = (module, ratio, flops, round_to)
            if abs(flops / target - 1) <= TP_SETTINGS["flops_tolerance"] or high - low < 1e-4:
                break
            low, high = (ratio, high) if flops > target else (low, ratio)
        if abs(best[2] / target - 1) <= TP_SETTINGS["flops_tolerance"]:
            break
    module, ratio, flops, round_to = best
    return module, {"pruning_ratio": ratio, "round_to": round_to, "flops_ratio": flops, "bisection": steps,
                    "within_tolerance": abs(flops / target - 1) <= TP_SETTINGS["flops_tolerance"],
                    "params_ratio": torch_params(module) / torch_params(fixture.torch)}


def tp_failure(fixture: Fixture, ignored: list[str]) -> dict | None:
    """What Torch-Pruning does with the fixture: None when DepGraph builds, else the exception it raises
    (ShuffleNetV2's channel shuffle)."""
    import torch_pruning as tp

    module = copy.deepcopy(fixture.torch)
    try:
        tp.pruner.MetaPruner(module, fixture.example, importance=tp_importance("l1"), pruning_ratio=0.3,
                             ignored_layers=[module.get_submodule(n) for n in ignored], round_to=8)
    except Exception as e:  # whatever DepGraph raises is the finding
        frames = traceback.extract_tb(e.__traceback__)
        return {"exception": type(e).__name__, "message": str(e),
                "where": f"{os.path.relpath(frames[-1].filename, os.path.dirname(os.path.dirname(tp.__file__)))}"
                         f":{frames[-1].lineno} ({frames[-1].name})",
                "during": "tp.pruner.MetaPruner(...) building the DependencyGraph"}
    return None


def tp_ignored(fixture: Fixture, seed: int) -> list[str]:
    """The torch modules Torch-Pruning leaves alone: those our plans protect (the stem, the classifier,
    YOLOv8's Detect convs), and YOLOv8's DFL."""
    from xprune_jax.pruning.plan import make_plan

    probe = make_plan(fixture.model, _single(_scores(fixture, ["l1"], "", seed), "l1"), "shrink", "flops=-10%")
    ignored = sorted({n.removesuffix(".conv") if fixture.detector else n for n in probe.protected})
    return ignored + ([f"{fixture.model.spec.detect.name}.dfl"] if fixture.detector else [])


def tp_key(fixture: Fixture, ignored: list[str], importance: str, scope: str, budget: float, seed: int) -> str:
    """The content key of Torch-Pruning's model for one cell; it is cached under ``tp/<arch>-<key>`` (a row's ``record``)."""
    calibration = [os.path.basename(p) for p in fixture.calibration(seed)[0]] if importance == "taylor" else None
    return "tp-" + _sha([fixture.sha256, TP_VERSION, TP_SETTINGS, ignored, importance, scope, budget, calibration])


def tp_model(fixture: Fixture, ignored: list[str], importance: str, scope: str, budget: float, seed: int,
             gradients: dict) -> tuple[str, dict, object]:
    """Torch-Pruning's model for one cell, as our model, made or taken from the cache: ``(key, record, model)``.
    ``gradients`` caches the objective's gradients per seed (Taylor's only)."""
    from xprune_jax.checkpoint import load_model, save_model, write_json_atomic
    from xprune_jax.spec import spec_to_dict

    key = tp_key(fixture, ignored, importance, scope, budget, seed)
    folder = os.path.join(CACHE, "tp", f"{fixture.arch}-{key}")
    if os.path.isfile(os.path.join(folder, "record.json")):
        with open(os.path.join(folder, "record.json")) as f:
            return key, json.load(f), load_model(os.path.join(folder, "model"))
    if importance == "taylor" and seed not in gradients:
        gradients[seed] = objective_gradients(fixture, seed)
    module, record = tp_prune(fixture, importance, scope, 1 - budget / 100, ignored,
                              gradients.get(seed) if importance == "taylor" else None)
    pruned, padded = model_from_torch(fixture.model, module, f"torch-pruning {importance} {scope}")
    record.update({
        "padded_channels": padded,
        "xprune_jax_flops_ratio": _flops(pruned) / _flops(fixture.model),
        "output_relative_error": output_error(module, pruned, fixture),
        **({} if fixture.detector else {"torch_metric": torch_top1(module, fixture)}),
        "spec": json.loads(json.dumps(spec_to_dict(pruned.spec)))})
    save_model(pruned, os.path.join(folder, "model"), overwrite=True)
    write_json_atomic(os.path.join(folder, "record.json"), record)
    return key, record, pruned


# ---------------------------------------------------------------------------------------------------
# The run


def _scores(fixture: Fixture, criteria: list[str], objective: str, seed: int) -> dict:
    """Every criterion's scores on the calibration images of ``seed`` (cached by content: the model's
    fingerprint, which ``make_plan`` checks, the criteria and the images)."""
    from xprune_jax.attribution.score import score_model
    from xprune_jax.checkpoint import model_fingerprint, write_json_atomic

    paths, truth = fixture.calibration(seed)
    key = _sha([model_fingerprint(fixture.model), criteria, objective, [os.path.basename(p) for p in paths],
                truth if isinstance(truth, str) else np.asarray(truth).tolist(), fixture.config.batch_size, seed])
    path = os.path.join(CACHE, "scores", f"{fixture.arch}-{key}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    scores = score_model(fixture.model, criteria, objective, calibration=(paths, truth),
                         batch_size=fixture.config.batch_size, seed=seed, progress=False, all_channel_scores=True)
    write_json_atomic(path, scores)
    return scores


def _single(scores: dict, criterion: str) -> dict:
    """The scores of one criterion, as ``make_plan`` reads them (what the prune experiment does)."""
    return {**scores, "criterion": criterion, "layers": [
        {**l, "score": l["scores"][criterion], "channel_scores": l["channel_scores_by"][criterion],
         "input_channel_scores": l["input_channel_scores_by"][criterion]} for l in scores["layers"]]}


def our_grid(arch: str, norm_criteria: tuple[str, ...]) -> list[dict]:
    """Our cells (each at every budget and seed): every criterion with the default normalisation; the
    other normalisations for ``norm_criteria``; remove+shrink for the two grad_x_act forms; YOLOv8n's
    ``confidence`` objective for grad_x_act."""
    cells = [{"criterion": c, "mode": "shrink", "normalize": "mean", "objective": ""} for c in CRITERIA]
    cells += [{"criterion": c, "mode": "shrink", "normalize": n, "objective": ""}
              for n in NORMALIZATIONS[1:] for c in norm_criteria]
    cells += [{"criterion": c, "mode": "remove+shrink", "normalize": "mean", "objective": ""}
              for c in ("grad_x_act", "grad_x_act:mean")]
    if arch.startswith("yolov8"):
        cells += [{"criterion": "grad_x_act", "mode": "shrink", "normalize": "mean", "objective": "confidence"}]
    return cells


def run(args) -> None:
    import torch

    from xprune_jax import runs
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.experiments.prune import Measurements, plan_key
    from xprune_jax.pruning.plan import apply_plan, make_plan
    from xprune_jax.spec import spec_to_dict

    torch.set_num_threads(1)
    start = time.time()
    fixture = Fixture(args.arch, args.repeats)
    model, evaluator, metric = fixture.model, fixture.evaluator, fixture.evaluator.metric
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    log = functools.partial(print, f"[{args.arch}]", flush=True)

    # the unpruned model, measured both ways
    unpruned = evaluator(model)
    ours_flops = _flops(model)
    from xprune_jax.analysis import count_params
    checks = {"flops": {"torch_hooks": torch_macs(fixture.torch, fixture.example), "xprune_jax_analysis": ours_flops},
              "params": {"torch": torch_params(fixture.torch), "xprune_jax": count_params(model.arch, model.spec)},
              "output_relative_error": output_error(fixture.torch, model, fixture),
              "metric": {"xprune_jax": unpruned.metrics[metric]}}
    if not fixture.detector:
        checks["metric"]["torch"] = torch_top1(fixture.torch, fixture)
    log("unpruned:", json.dumps(checks))
    if checks["flops"]["torch_hooks"] != ours_flops:
        raise UserError(f"the torch FLOPs count {checks['flops']['torch_hooks']} differs from ours {ours_flops}")

    context = {"arch": args.arch, "weights_sha256": fixture.sha256, "spec": json.loads(json.dumps(spec_to_dict(model.spec))),
               "bench": fixture.config.bench.to_dict(), "unpruned_metrics": unpruned.metrics, "eval_images": 0}
    measurements = Measurements(os.path.join(CACHE, "measurements", f"{args.arch}-{fixture.sha256[:16]}.json"),
                                context, resume=True)

    def measure(key, pruned):  # pruned: () -> the pruned model, made only when not measured yet
        measured = measurements.get(key)
        if measured is None:
            metrics, latency = evaluator(pruned(), timed_against=unpruned)
            measured = measurements.put(key, {"metrics": metrics, "latency": latency})
        return measured

    rows = []
    # ours
    cells = our_grid(args.arch, tuple(args.norm_criteria.split(",")) if args.norm_criteria else CRITERIA[:-1])
    for seed in seeds:
        by_objective = {}
        for objective in sorted({c["objective"] for c in cells}):
            wanted = sorted({c["criterion"] for c in cells if c["objective"] == objective}, key=CRITERIA.index)
            t = time.time()
            by_objective[objective] = _scores(fixture, wanted, objective, seed)
            log(f"scores seed {seed} objective {by_objective[objective]['objective']}: {time.time() - t:.0f} s")
        for cell in cells:
            scores = by_objective[cell["objective"]]
            for budget in budgets:
                row = {"side": "ours", **cell, "objective": scores["objective"], "budget": budget, "seed": seed}
                try:
                    plan = make_plan(model, _single(scores, cell["criterion"]), cell["mode"], f"flops=-{budget:g}%",
                                     normalize=cell["normalize"])
                except UserError as e:
                    rows.append({**row, "infeasible": str(e)})
                    continue
                t = time.time()
                measured = measure(plan_key(cell["mode"], plan), lambda: apply_plan(model, plan))
                rows.append({**row, "metric": measured["metrics"][metric], "flops_ratio": plan.flops_after / plan.flops_before,
                             "params_ratio": plan.params_after / plan.params_before,
                             "latency_ratio": measured["latency"]["ratio_median"],
                             "latency_ratio_iqr": measured["latency"]["ratio_iqr"]})
                log(f"ours {cell['criterion']} {cell['mode']} {cell['normalize']} {row['objective']} -{budget:g}% seed {seed}: "
                    f"{metric} {rows[-1]['metric']:.4f} FLOPs {rows[-1]['flops_ratio']:.3f} latency "
                    f"{rows[-1]['latency_ratio']:.3f} ({time.time() - t:.0f} s)")

    # Torch-Pruning
    ignored = tp_ignored(fixture, seeds[0])
    failure = tp_failure(fixture, ignored)
    tp_record = {"version": _tp_version(), "settings": TP_SETTINGS, "ignored_layers": ignored, "failure": failure}
    if failure:
        log("Torch-Pruning fails:", json.dumps(failure))
    gradients = {}
    for importance in TP_IMPORTANCES if not failure else ():
        for scope in TP_SCOPES:
            for budget in budgets:
                for seed in seeds if importance == "taylor" else seeds[:1]:
                    t = time.time()
                    key, record, pruned = tp_model(fixture, ignored, importance, scope, budget, seed, gradients)
                    measured = measure(key, lambda: pruned)
                    for s in seeds if importance != "taylor" else (seed,):  # magnitudes use no calibration images
                        rows.append({"side": "torch-pruning", "importance": importance, "scope": scope, "budget": budget,
                                     "seed": s, "metric": measured["metrics"][metric], "flops_ratio": record["flops_ratio"],
                                     "params_ratio": record["params_ratio"], "latency_ratio": measured["latency"]["ratio_median"],
                                     "latency_ratio_iqr": measured["latency"]["ratio_iqr"],
                                     "pruning_ratio": record["pruning_ratio"], "round_to": record["round_to"], "bisection_steps": len(record["bisection"]),
                                     "record": f"{args.arch}-{key}"})
                    log(f"tp {importance} {scope} -{budget:g}% seed {seed}: {metric} {rows[-1]['metric']:.4f} FLOPs "
                        f"{record['flops_ratio']:.3f} (ratio {record['pruning_ratio']:.4f}, {len(record['bisection'])} steps) "
                        f"latency {rows[-1]['latency_ratio']:.3f} err {record['output_relative_error']:.1e} "
                        f"pad {record['padded_channels']} ({time.time() - t:.0f} s)")
                    tp_record.setdefault("models", {})[f"{args.arch}-{key}"] = {
                        k: record[k] for k in ("pruning_ratio", "round_to", "flops_ratio", "xprune_jax_flops_ratio", "params_ratio",
                                               "within_tolerance", "bisection", "padded_channels", "output_relative_error",
                                               "torch_metric") if k in record}

    results = {
        "arch": args.arch, "label": LABELS[args.arch], "weights": os.path.relpath(FIXTURES[args.arch], ROOT)
        if FIXTURES[args.arch].startswith(ROOT) else FIXTURES[args.arch].replace(os.path.expanduser("~"), "~"),
        "weights_sha256": fixture.sha256, "metric": metric, "metric_description": evaluator.description,
        "unpruned": {"metrics": unpruned.metrics}, "checks": checks,
        "protocol": {"seeds": seeds, "budgets": budgets, "calib_images": fixture.config.calib_images,
                     "calib_split": "train", "evaluation": "all validation images", "bench": fixture.config.bench.to_dict(),
                     "ours": {"defaults": "make_plan library defaults (allocation global, floor 0.125, round_to 8)",
                              "default_cell": DEFAULT},
                     "evaluated_by": "xprune_jax.experiments.prune's evaluator, both sides (TP models converted to our spec)"},
        "torch_pruning": tp_record, "rows": rows,
        "command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]),
        "wall_seconds": time.time() - start, "environment": runs.environment(),
    }
    results["summary"] = summarize(rows)
    results["latency_duel"] = latency_duels(fixture, results, args.duel_repeats, log) if not failure else {}
    os.makedirs(RESULTS, exist_ok=True)
    write_json_atomic(args.out or os.path.join(RESULTS, f"{args.arch}.json"), results)
    log(f"done in {time.time() - start:.0f} s")


# ---------------------------------------------------------------------------------------------------
# After recovery


def recovery_recipe(arch: str):
    """``configs/recovery.py``'s recovery (BN recalibration, fine-tuning) for ``arch``: the recovery tables' own."""
    from xprune_jax.runs import config_module

    return config_module(os.path.join(ROOT, "configs", "recovery.py")).get_config(arch).recovery


def run_results(arch: str) -> tuple[str, dict]:
    """``run``'s results for ``arch`` (its path and content), which must have a Torch-Pruning model."""
    path = os.path.join(RESULTS, f"{arch}.json")
    if not os.path.isfile(path):
        raise UserError(f"no {path}; run `python benchmarks/bench_peers.py run --arch={arch}` first")
    with open(path) as f:
        results = json.load(f)
    if not any(h["peer"] for h in head_to_head(results)):
        raise UserError(f"{path} has no Torch-Pruning model (Torch-Pruning can't prune {arch}); there is nothing to compare")
    return path, results


def default_and_peer(fixture: Fixture, results: dict, head: dict, seed: int):
    """Our shrink default's plan and the name of the peer's model (its ``record``) for one head-to-head budget and
    seed of ``results``, checked to be what its rows measured: ``(plan, peer row)``."""
    from xprune_jax.pruning.plan import make_plan

    budget, peer_cell = head["budget"], (head["peer"]["importance"], head["peer"]["scope"])
    plan = make_plan(fixture.model, _single(_scores(fixture, list(CRITERIA), "", seed), DEFAULT["criterion"]),
                     DEFAULT["mode"], f"flops=-{budget:g}%", normalize=DEFAULT["normalize"])
    row = next(r for r in results["rows"] if r["side"] == "ours" and r["budget"] == budget and r["seed"] == seed
               and all(r[k] == v for k, v in DEFAULT.items()) and r["objective"] != "confidence")
    peer_row = next(r for r in results["rows"] if r["side"] == "torch-pruning" and r["budget"] == budget and r["seed"] == seed
                    and (r["importance"], r["scope"]) == peer_cell)
    key = tp_key(fixture, results["torch_pruning"]["ignored_layers"], *peer_cell, budget, seed)
    if (plan.params_after / plan.params_before, plan.flops_after / plan.flops_before) != (row["params_ratio"], row["flops_ratio"]) \
            or f"{fixture.arch}-{key}" != peer_row["record"]:
        raise UserError(f"the -{budget:g}% seed {seed} models made now differ from those the results measured; "
                        f"re-run `python benchmarks/bench_peers.py run --arch={fixture.arch}` with this code")
    return plan, peer_row


def peer_model(fixture: Fixture, results: dict, peer_row: dict, gradients: dict):
    """The model ``peer_row`` measured (from the cache, or pruned again and checked to be the same)."""
    _, record, model = tp_model(fixture, results["torch_pruning"]["ignored_layers"], peer_row["importance"],
                                peer_row["scope"], peer_row["budget"], peer_row["seed"], gradients)
    if record["pruning_ratio"] != peer_row["pruning_ratio"]:
        raise UserError(f"Torch-Pruning's {cell_name(peer_row)} -{peer_row['budget']:g}% model made now (pruning ratio "
                        f"{record['pruning_ratio']}) differs from the one the results measured ({peer_row['pruning_ratio']}); "
                        f"re-run `python benchmarks/bench_peers.py run --arch={fixture.arch}`")
    return model


def recover(args) -> None:
    """Our model (``--ours``: the default auto, or the shrink default) and Torch-Pruning's best model at each
    budget of ``run``'s results, seed by seed, recovered alike (``recovery_recipe``) and evaluated as cut,
    after BN recalibration and after fine-tuning. A model met twice (a magnitude importance prunes alike
    for every seed, auto may choose the shrink default's plan) recovers once."""
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.experiments.prune import Measurements, Recovery, plan_key, recovery_settings, reference_recovery
    from xprune_jax.pruning.plan import apply_plan
    from xprune_jax.spec import spec_to_dict

    path, results = run_results(args.arch)
    heads = [h for h in head_to_head(results) if h["peer"]]
    seeds = args.seeds.split(",") if args.seeds else results["protocol"]["seeds"]
    if not set(map(str, seeds)) <= set(map(str, results["protocol"]["seeds"])):
        raise UserError(f"--seeds={args.seeds} is not among the seeds of {path} "
                        f"({','.join(map(str, results['protocol']['seeds']))}); choose from those")
    seeds = [int(s) for s in seeds]
    fixture = Fixture(args.arch, bench_repeats=2, results=results)
    start, metric, model = time.time(), results["metric"], fixture.model
    unpruned = fixture.evaluator.metrics(model)  # first: the classifier's agreement is measured against it
    if abs(unpruned[metric] - results["unpruned"]["metrics"][metric]) > 1e-6:
        raise UserError(f"the unpruned {metric} is {unpruned[metric]:.4f} here but {results['unpruned']['metrics'][metric]:.4f} "
                        f"in {path}; re-run `python benchmarks/bench_peers.py run --arch={args.arch}` with this code")
    fixture.config.recovery = recovery_recipe(args.arch)
    recovery = Recovery(fixture.config, model, fixture.evaluator)
    context = {"arch": args.arch, "weights_sha256": fixture.sha256, "spec": json.loads(json.dumps(spec_to_dict(model.spec))),
               "recovery": recovery_settings(fixture.config.recovery.to_dict()), "seed": fixture.config.seed,
               "unpruned_metrics": results["unpruned"]["metrics"]}
    done = Measurements(os.path.join(CACHE, "recovery", f"{args.arch}-{_sha(context)}.json"), context, resume=True)
    log = functools.partial(print, f"[{args.arch}]", flush=True)
    reference = reference_recovery(recovery, model, done, say=lambda _: log("recovering the unpruned model alike"))
    if reference:  # the task loss trains the unpruned model too
        log(f"the unpruned model recovered alike: {metric} {reference['finetuned']['metrics'][metric]:.4f}")
    work = []  # (head, seed, side, model key, the pruned model when it must be made)
    gradients = {}
    for h in heads:
        for seed in seeds:
            plan, peer_row = default_and_peer(fixture, results, h, seed)
            if args.ours == "auto":
                plan = measured_auto_plan(fixture, h["budget"], seed)
            work.append((h, seed, "ours", plan_key(plan.mode, plan), functools.partial(apply_plan, model, plan)))
            work.append((h, seed, "torch-pruning", peer_row["record"],
                         functools.partial(peer_model, fixture, results, peer_row, gradients)))
    todo = len({key for *_, key, _ in work if key not in done})
    log(f"{len(work)} models ({len({key for *_, key, _ in work})} distinct), {todo} to recover, the rest cached")
    rows, recovered, began = [], 0, time.time()
    for h, seed, side, key, pruned in work:
        cell, budget = "grad_x_act auto" if side == "ours" and args.ours == "auto" else h["ours" if side == "ours" else "peer"]["cell"], h["budget"]
        t = time.time()
        measured = done.get(key)
        if measured is None:
            eta = f", about {(time.time() - began) / recovered * (todo - recovered) / 60:.0f} min left" if recovered else ""
            log(f"recovering {recovered + 1}/{todo}: {cell} -{budget:g}% seed {seed}{eta}")
            cut = pruned()
            measured = done.put(key, {"as_cut": fixture.evaluator.metrics(cut), **recovery(cut, key)})
            recovered += 1
        stages = {"as_cut": measured["as_cut"][metric],
                  **{stage: measured[stage]["metrics"][metric] for stage in ("recalibrated", "finetuned")}}
        rows.append({"side": side, "cell": cell, "budget": budget, "seed": seed, "model": key, **stages,
                     "seconds": sum(measured[s]["seconds"] for s in ("recalibrated", "finetuned"))})
        log(f"{cell} -{budget:g}% seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in stages.items())
            + f" ({time.time() - t:.0f} s)")
    out = {"arch": args.arch, "label": results["label"], "metric": metric, "weights_sha256": fixture.sha256,
           "unpruned": {**results["unpruned"], **({"recovery": reference} if reference else {})},
           "recovery": context["recovery"], "recovery_seed": context["seed"], "rows": rows,
           "command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]), "wall_seconds": time.time() - start}
    write_json_atomic(os.path.join(RESULTS, f"{args.arch}.{RECOVERY_KINDS[args.ours]}.json"), out)
    log(f"done in {time.time() - start:.0f} s")


def _timed_call(fixture: Fixture, model):
    """A zero-argument call of the model as the evaluator times it: a classifier at its crop size, a
    detector end to end on the evaluator's preprocessed batch of real images."""
    import jax

    if fixture.detector:
        from xprune_jax.evaluation.coco import pipeline_for

        forward, x = jax.jit(pipeline_for(model).forward), fixture.evaluator.bench_batch
    else:
        forward = jax.jit(model.module.apply)
        x = np.random.default_rng(0).standard_normal((1, fixture.size, fixture.size, 3), np.float32)
    variables, x = jax.device_put(model.variables), jax.device_put(x)
    return lambda: forward(variables, x)


def latency_duels(fixture: Fixture, results: dict, repeats: int, log) -> dict:
    """Per budget with a peer: our shrink default against the peer's best cell, every seed's pair of models
    timed side by side in one run (:func:`latency_duel`). The models are made again (from cached scores
    and Torch-Pruning models, or anew) and checked to be those ``results``' rows measured."""
    from xprune_jax.pruning.plan import apply_plan

    gradients, duels = {}, {}
    for h in head_to_head(results):
        if not h["peer"]:
            continue
        pairs = {}
        for seed in results["protocol"]["seeds"]:
            plan, peer_row = default_and_peer(fixture, results, h, seed)
            pairs[seed] = (apply_plan(fixture.model, plan), peer_model(fixture, results, peer_row, gradients))
        duel = latency_duel(fixture, fixture.model, pairs, repeats)
        duels[str(h["budget"])] = {"peer": cell_name(peer_row), **duel}
        log(f"latency at -{h['budget']:g}%: ours / {cell_name(peer_row)} = {duel['ours']['ratio_median']:.3f} "
            f"[{duel['ours']['ratio_iqr'][0]:.3f}, {duel['ours']['ratio_iqr'][1]:.3f}] over seeds "
            + ", ".join(f"{s}: {d['ratio_median']:.3f}" for s, d in duel["seeds"].items()))
    return duels


def latency_duel(fixture: Fixture, unpruned, pairs: dict, repeats: int) -> dict:
    """``pairs``: per seed, our model and the peer's. All of them and the unpruned model timed side by
    side in one run (rounds in random order); per round and seed, our time over the peer's. ``ours``:
    those ratios pooled over the seeds (median, IQR); ``seeds``: each seed's, with both models' median ms."""
    from xprune_jax import timing

    calls = {"unpruned": _timed_call(fixture, unpruned)}
    for seed, (ours, peer) in pairs.items():
        calls[f"ours {seed}"], calls[f"peer {seed}"] = _timed_call(fixture, ours), _timed_call(fixture, peer)
    times = {name: np.asarray(t) for name, t in timing.time_side_by_side(calls, repeats, 3, 0).items()}
    ratios = {seed: times[f"ours {seed}"] / times[f"peer {seed}"] for seed in pairs}
    return {"ours": _ratio_stats(np.concatenate(list(ratios.values()))), "unpruned_ms": float(np.median(times["unpruned"]) * 1e3),
            "seeds": {str(seed): {**_ratio_stats(ratios[seed]), "ours_ms": float(np.median(times[f"ours {seed}"]) * 1e3),
                                  "peer_ms": float(np.median(times[f"peer {seed}"]) * 1e3)} for seed in pairs}}


def _ratio_stats(ratios: np.ndarray) -> dict:
    return {"ratio_median": float(np.median(ratios)),
            "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))], "n": int(len(ratios))}


def duel(args) -> None:
    """``run``'s latency duels timed again on its results' own models (a quieter machine, more rounds),
    written into those results."""
    from xprune_jax import runs
    from xprune_jax.checkpoint import write_json_atomic

    path, results = run_results(args.arch)
    fixture = Fixture(args.arch, bench_repeats=2, results=results)
    start = time.time()
    results["latency_duel"] = latency_duels(fixture, results, args.duel_repeats, functools.partial(print, f"[{args.arch}]", flush=True))
    results["latency_duel_made_by"] = {"command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]),
                                       "wall_seconds": time.time() - start, "environment": runs.environment()}
    write_json_atomic(path, results)


def price(args) -> None:
    """At each budget of ``run``'s results with a peer, every seed: our shrink default's plan priced by the measured
    layer latency at each exponent (0: that default itself, as ``run`` measured it), its metric, and all of
    those models, the peer's best and the unpruned one timed side by side; ratios over the peer's per round."""
    from xprune_jax import runs, timing
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.pruning.latency import layer_latency
    from xprune_jax.pruning.plan import apply_plan, make_plan

    path, results = run_results(args.arch)
    exponents = sorted({0.0, *(float(x) for x in args.prices.split(","))})
    fixture = Fixture(args.arch, bench_repeats=2, results=results)
    log, start = functools.partial(print, f"[{args.arch}]", flush=True), time.time()
    table = layer_latency(fixture.model, 1, args.layer_repeats)
    log(f"layer latency measured ({len(table['layers'])} layers, {time.time() - start:.0f} s)")
    agreement = price_agreement(fixture.model, table, layer_latency(fixture.model, 1, args.layer_repeats, seed=1))
    log(f"a second table's prices: log correlation {agreement['log_correlation']:.3f}, at most "
        f"{agreement['max_ratio']:.2f}x apart")
    rows, duels, gradients = [], {}, {}
    for h in head_to_head(results):
        if not h["peer"]:
            continue
        budget, calls = h["budget"], {"unpruned": _timed_call(fixture, fixture.model)}
        for seed in results["protocol"]["seeds"]:
            default, peer_row = default_and_peer(fixture, results, h, seed)
            calls[f"peer {seed}"] = _timed_call(fixture, peer_model(fixture, results, peer_row, gradients))
            scores = _single(_scores(fixture, list(CRITERIA), "", seed), DEFAULT["criterion"])
            for exponent in exponents:
                plan = default if not exponent else make_plan(
                    fixture.model, scores, DEFAULT["mode"], f"flops=-{budget:g}%", normalize=DEFAULT["normalize"],
                    latency_price=exponent, layer_latency=table)
                model = apply_plan(fixture.model, plan)
                metric = fixture.evaluator.metrics(model)[results["metric"]] if exponent else next(
                    r["metric"] for r in results["rows"] if r["side"] == "ours" and r["budget"] == budget and r["seed"] == seed
                    and all(r[k] == v for k, v in DEFAULT.items()) and r["objective"] != "confidence")
                rows.append({"budget": budget, "seed": seed, "latency_price": exponent, "metric": metric,
                             "flops_ratio": plan.flops_after / plan.flops_before, "params_ratio": plan.params_after / plan.params_before})
                calls[f"{exponent} {seed}"] = _timed_call(fixture, model)
                log(f"-{budget:g}% seed {seed} latency_price {exponent:g}: {results['metric']} {metric:.4f}, "
                    f"params {rows[-1]['params_ratio']:.3f}")
        times = {name: np.asarray(t) for name, t in timing.time_side_by_side(calls, args.duel_repeats, 3, 0).items()}
        seeds = results["protocol"]["seeds"]
        duels[str(budget)] = {"peer": cell_name(peer_row), "unpruned_ms": float(np.median(times["unpruned"]) * 1e3), **{
            f"{exponent:g}": {**_ratio_stats(np.concatenate([times[f"{exponent} {s}"] / times[f"peer {s}"] for s in seeds])),
                              "seeds": {str(s): float(np.median(times[f"{exponent} {s}"] / times[f"peer {s}"])) for s in seeds}}
            for exponent in exponents}}
        log(f"-{budget:g}%: ours / {cell_name(peer_row)} " + ", ".join(
            f"latency_price {e}: {duels[str(budget)][f'{e:g}']['ratio_median']:.3f}" for e in exponents))
    write_json_atomic(os.path.join(RESULTS, f"{args.arch}.latency_price.json"), {
        "arch": args.arch, "weights_sha256": fixture.sha256, "metric": results["metric"], "exponents": exponents,
        "rows": rows, "latency_duel": duels, "layer_latency": table, "table_agreement": agreement, "duel_repeats": args.duel_repeats,
        "command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]), "wall_seconds": time.time() - start,
        "environment": runs.environment()})


def auto(args) -> None:
    """``xprune prune``'s default, ``--mode=auto``, at each budget of ``run``'s results and every seed: the
    candidate allocation the calibration loss chose and every candidate's loss beside the metric ``run``
    measured for it; where Torch-Pruning prunes, the chosen models, the shrink default's, the peer's best
    and the unpruned one timed side by side, ratios over the peer's per round."""
    from xprune_jax import runs, timing
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.pruning.plan import apply_plan
    from xprune_jax.pruning.select import CANDIDATES

    path = os.path.join(RESULTS, f"{args.arch}.json")
    if not os.path.isfile(path):
        raise UserError(f"no {path}; run `python benchmarks/bench_peers.py run --arch={args.arch}` first")
    with open(path) as f:
        results = json.load(f)
    fixture = Fixture(args.arch, bench_repeats=2, results=results)
    log, start, metric = functools.partial(print, f"[{args.arch}]", flush=True), time.time(), results["metric"]
    rows, duels, gradients = [], {}, {}
    for h in head_to_head(results):
        budget, calls = h["budget"], {"unpruned": _timed_call(fixture, fixture.model)}
        for seed in results["protocol"]["seeds"]:
            plan, objective = auto_plan(fixture, budget, seed)
            candidates = []
            for c in plan.selection["candidates"]:  # each with the metric `run` measured for that very plan
                row = next((r for r in results["rows"] if r["side"] == "ours" and r["budget"] == budget and r["seed"] == seed
                            and r["criterion"] == AUTO["criterion"] and (r["mode"], r["normalize"]) == (c["mode"], c["normalize"])
                            and r["objective"] == objective), None)
                if row is None:
                    raise UserError(f"{path} has no {AUTO['criterion']} {c['mode']} {c['normalize']} cell to compare auto's "
                                    f"candidate with; re-run `run --arch={args.arch}` with grad_x_act in --norm_criteria")
                if (row.get("flops_ratio"), row.get("params_ratio")) != (c.get("flops_ratio"), c.get("params_ratio")):
                    raise UserError(f"the -{budget:g}% seed {seed} {c['mode']}:{c['normalize']} plan made now differs from "
                                    f"the one the results measured; re-run `python benchmarks/bench_peers.py run --arch={args.arch}`")
                candidates.append({**c, "metric": row.get("metric")})
            chosen = next(c for c in candidates if (c["mode"], c["normalize"]) == (plan.mode, plan.normalize))
            rows.append({"budget": budget, "seed": seed, "chosen": f"{plan.mode}:{plan.normalize}", "metric": chosen["metric"],
                         "flops_ratio": chosen["flops_ratio"], "params_ratio": chosen["params_ratio"], "candidates": candidates})
            log(f"-{budget:g}% seed {seed}: chose {rows[-1]['chosen']}, {metric} {chosen['metric']:.4f} (" + ", ".join(
                f"{c['mode']}:{c['normalize']} " + ("infeasible" if "infeasible" in c else
                                                    f"loss {c['loss']:.3f} {metric} {c['metric']:.4f}") for c in candidates) + ")")
            if h["peer"]:
                shrink, peer_row = default_and_peer(fixture, results, h, seed)
                calls[f"auto {seed}"] = _timed_call(fixture, apply_plan(fixture.model, plan))
                calls[f"shrink {seed}"] = _timed_call(fixture, apply_plan(fixture.model, shrink))
                calls[f"peer {seed}"] = _timed_call(fixture, peer_model(fixture, results, peer_row, gradients))
        if h["peer"]:
            times = {name: np.asarray(t) for name, t in timing.time_side_by_side(calls, args.duel_repeats, 3, 0).items()}
            seeds = results["protocol"]["seeds"]
            duels[str(budget)] = {"peer": cell_name(h["peer"]), "unpruned_ms": float(np.median(times["unpruned"]) * 1e3), **{
                side: {**_ratio_stats(np.concatenate([times[f"{side} {s}"] / times[f"peer {s}"] for s in seeds])),
                       "seeds": {str(s): float(np.median(times[f"{side} {s}"] / times[f"peer {s}"])) for s in seeds}}
                for side in ("auto", "shrink")}}
            log(f"-{budget:g}%: latency over {cell_name(h['peer'])}: auto {duels[str(budget)]['auto']['ratio_median']:.3f}, "
                f"shrink default {duels[str(budget)]['shrink']['ratio_median']:.3f}")
    write_json_atomic(os.path.join(RESULTS, f"{args.arch}.auto.json"), {
        "arch": args.arch, "label": LABELS[args.arch], "weights_sha256": fixture.sha256, "metric": metric,
        "cell": {**AUTO, "candidates": list(CANDIDATES)}, "rows": rows, "latency_duel": duels,
        "duel_repeats": args.duel_repeats, "command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]),
        "wall_seconds": time.time() - start, "environment": runs.environment()})


def auto_plan(fixture: Fixture, budget: float, seed: int):
    """``xprune prune``'s default plan at ``-budget%`` FLOPs on the calibration images of ``seed``: ``(plan, objective)``."""
    from xprune_jax.attribution.score import selection_loss
    from xprune_jax.pruning.select import CANDIDATES, select_plan

    scores = _scores(fixture, list(CRITERIA), "", seed)
    loss = selection_loss(fixture.model, scores["objective"], fixture.calibration(seed), fixture.config.batch_size, seed)
    return select_plan(fixture.model, _single(scores, AUTO["criterion"]), f"flops=-{budget:g}%", loss, CANDIDATES), scores["objective"]


def measured_auto_plan(fixture: Fixture, budget: float, seed: int):
    """:func:`auto_plan`, checked to be the plan ``<arch>.auto.json`` measured."""
    path = os.path.join(RESULTS, f"{fixture.arch}.auto.json")
    if not os.path.isfile(path):
        raise UserError(f"no {path}; run `python benchmarks/bench_peers.py auto --arch={fixture.arch}` first")
    with open(path) as f:
        row = next((r for r in json.load(f)["rows"] if r["budget"] == budget and r["seed"] == seed), None)
    plan, _ = auto_plan(fixture, budget, seed)
    if row is None or (row["chosen"], row["flops_ratio"], row["params_ratio"]) != (
            f"{plan.mode}:{plan.normalize}", plan.flops_after / plan.flops_before, plan.params_after / plan.params_before):
        raise UserError(f"the -{budget:g}% seed {seed} auto plan made now differs from the one {path} measured; run "
                        f"`python benchmarks/bench_peers.py auto --arch={fixture.arch}` again")
    return plan


def auto_summary(auto_results: dict, budget: float) -> dict:
    """``auto``'s metric over the seeds at ``budget`` as :func:`summarize` gives a cell's, with what it chose."""
    here = [r for r in auto_results["rows"] if r["budget"] == budget]
    values = np.asarray([r["metric"] for r in here])
    return {"cell": "grad_x_act auto", "metric_mean": float(values.mean()),
            "metric_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "params_ratio": float(np.mean([r["params_ratio"] for r in here])),
            "chosen": [r["chosen"] for r in here]}


def price_agreement(model, table: dict, again: dict) -> dict:
    """How far two layer latency tables of ``model`` agree on the price of each channel group's channel
    (``latency_priced`` at exponent 1): the correlation of the log prices, and the largest ratio between
    a group's two prices once the tables' overall shift is taken out."""
    from xprune_jax import analysis
    from xprune_jax.pruning.plan import latency_priced
    from xprune_jax.pruning.surgery import graph_of

    by_layer = {l.name: l for l in analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))}
    groups = {g.name: g for g in graph_of(model.arch, model.spec).groups
              if all(s.layer in table["layers"] for s in g.producers + g.depthwise + g.consumers)}
    ones = {n: np.ones(1) for n in groups}
    log_price = []
    for t in (table, again):
        priced = latency_priced(groups, ones, 1.0, t["layers"], by_layer, model.variables["params"])
        log_price.append(-np.log([priced[n][0] for n in groups]))
    shift = log_price[1] - log_price[0]
    return {"groups": len(groups), "log_correlation": float(np.corrcoef(*log_price)[0, 1]),
            "max_ratio": float(np.exp(np.abs(shift - np.median(shift)).max()))}


def price_table(folder: str = RESULTS) -> list[str]:
    """Each ``price`` result: per budget and exponent, the metric over the seeds, params, and latency over the peer's best."""
    lines = ["| fixture | FLOPs | `--latency_price` | metric (mean ± sample sd over seeds) | params | latency / TP's best (side by side) |",
             "|---|---|---|---|---|---|"]
    for results in load_results(folder, "latency_price"):
        arch = results["arch"]
        for budget, duel in results["latency_duel"].items():
            for exponent in results["exponents"]:
                here = [r for r in results["rows"] if str(r["budget"]) == budget and r["latency_price"] == exponent]
                values = np.asarray([r["metric"] for r in here])
                d = duel[f"{exponent:g}"]
                lines.append(f"| {LABELS[arch]} | -{float(budget):g}% | {exponent:g}{' (default)' if not exponent else ''} | "
                             f"{_fmt(results['metric'], values.mean())} ± {_fmt(results['metric'], values.std(ddof=1))} | "
                             f"{np.mean([r['params_ratio'] for r in here]):.2f} | {d['ratio_median']:.2f} "
                             f"[{d['ratio_iqr'][0]:.2f}, {d['ratio_iqr'][1]:.2f}] ({duel['peer']}) |")
    return lines if len(lines) > 2 else []


def _flops(model) -> int:
    return sum(l.flops for l in _layers(model) if l.kind != "block")


def _layers(model):
    from xprune_jax import analysis

    return analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))


def _tp_version() -> str:
    from importlib.metadata import version

    found = version("torch-pruning")
    if found != TP_VERSION:
        raise UserError(f"torch-pruning {found} is installed; this benchmark pins {TP_VERSION}: "
                        f"pip install torch-pruning=={TP_VERSION}")
    return found


# ---------------------------------------------------------------------------------------------------
# Summaries and tables


def cell_name(row: dict) -> str:
    if row["side"] == "torch-pruning":
        return f"TP {row['importance']} {row['scope']}"
    name = f"{row['criterion']} {row['mode']} {row['normalize']}"
    return name + (" (confidence)" if row.get("objective") == "confidence" else "")


def summarize(rows: list[dict]) -> list[dict]:
    """Per cell and budget: the metric over seeds (mean, sample std, n), FLOPs and params ratios
    (mean), latency ratio (median over seeds)."""
    groups = {}
    for r in rows:
        groups.setdefault((cell_name(r), r["budget"]), []).append(r)
    out = []
    for (name, budget), group in sorted(groups.items()):
        done = [r for r in group if "infeasible" not in r]
        entry = {"cell": name, "budget": budget, "side": group[0]["side"], "n": len(done),
                 **{k: group[0][k] for k in ("criterion", "mode", "normalize", "objective", "importance", "scope") if k in group[0]}}
        if not done:
            out.append({**entry, "infeasible": group[0]["infeasible"]})
            continue
        values = np.array([r["metric"] for r in done])
        entry.update({"metric_mean": float(values.mean()), "metric_std": float(values.std(ddof=1)) if len(done) > 1 else 0.0,
                      "flops_ratio": float(np.mean([r["flops_ratio"] for r in done])),
                      "params_ratio": float(np.mean([r["params_ratio"] for r in done])),
                      "latency_ratio": float(np.median([r["latency_ratio"] for r in done]))})
        if "pruning_ratio" in done[0]:
            entry["pruning_ratio"] = float(np.mean([r["pruning_ratio"] for r in done]))
        out.append(entry)
    return out


def _fmt(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric.startswith("top1") else f"{value:.3f}"


def _value(metric, s) -> str:
    text = _fmt(metric, s["metric_mean"])
    return text + (f" ± {_fmt(metric, s['metric_std'])}" if _fmt(metric, s["metric_std"]) != _fmt(metric, 0.0) else "")


def verdict(ours: dict, peer: dict) -> str:
    """``wins`` / ``loses`` when the gap exceeds the larger of the two seeds' standard deviations, else ``ties``."""
    gap = ours["metric_mean"] - peer["metric_mean"]
    spread = max(ours["metric_std"], peer["metric_std"])
    return "ties" if abs(gap) <= spread else "wins" if gap > 0 else "loses"


def head_to_head(results: dict) -> list[dict]:
    """Per budget: our shrink default against Torch-Pruning's best importance and scope (by mean)."""
    summary = [s for s in results["summary"] if "infeasible" not in s]
    out = []
    for budget in results["protocol"]["budgets"]:
        here = [s for s in summary if s["budget"] == budget]
        ours = next((s for s in here if s["side"] == "ours" and s.get("criterion") == DEFAULT["criterion"]
                     and s.get("mode") == DEFAULT["mode"] and s.get("normalize") == DEFAULT["normalize"]
                     and s.get("objective") != "confidence"), None)
        best_ours = max((s for s in here if s["side"] == "ours"), key=lambda s: s["metric_mean"], default=None)
        peers = [s for s in here if s["side"] == "torch-pruning"]
        peer = max(peers, key=lambda s: s["metric_mean"], default=None)
        out.append({"budget": budget, "ours": ours, "best_ours": best_ours, "peer": peer,
                    "verdict": verdict(ours, peer) if ours and peer else None})
    return out


COMMANDS = {"latency_price": "price", "recovery": "recover", "recovery_shrink": "recover --ours=shrink", "auto": "auto"}
RECOVERY_KINDS = {"auto": "recovery", "shrink": "recovery_shrink"}  # recover --ours=X writes <arch>.<kind>.json  # the command that writes each kind of results file


def load_results(folder: str = RESULTS, kind: str = "") -> list[dict]:
    """Every fixture's results in ``folder`` (``<arch>.json``, or ``<arch>.<kind>.json``), in FIXTURES order.
    A ``kind`` file must come from the same fixture weights as the ``<arch>.json`` beside it, if any."""
    found = []
    for arch in FIXTURES:
        path = os.path.join(folder, f"{arch}.{kind}.json" if kind else f"{arch}.json")
        if os.path.isfile(path):
            with open(path) as f:
                found.append(json.load(f))
            run_path = os.path.join(folder, f"{arch}.json")
            if kind and os.path.isfile(run_path):
                with open(run_path) as f:
                    made_from = json.load(f).get("weights_sha256")
                if found[-1].get("weights_sha256") != made_from:
                    raise UserError(f"{path} was made from other weights ({str(found[-1].get('weights_sha256'))[:12]}) than "
                                    f"{os.path.basename(run_path)} ({str(made_from)[:12]}); run `{COMMANDS.get(kind, kind)} "
                                    f"--arch={arch}` again")
    return found


def readme_table(all_results: list[dict], folder: str = RESULTS) -> list[str]:
    """The short table for README.md: who wins at each budget, our default (``auto``, from ``<arch>.auto.json``)
    against the peer's best, and the two models' latency timed side by side."""
    autos = {a["arch"]: a for a in load_results(folder, "auto")}
    lines = ["| fixture (unpruned) | FLOPs | ours: default `xprune prune` (auto) | Torch-Pruning's best | who wins | "
             "latency, ours / TP's (side by side) |", "|---|---|---|---|---|---|"]
    for results in all_results:
        metric = results["metric"]
        if results["arch"] not in autos:
            raise UserError(f"no {results['arch']}.auto.json beside {results['arch']}.json; run "
                            f"`python benchmarks/bench_peers.py auto --arch={results['arch']}`")
        name = f"{results['label']} ({'top-1' if metric == 'top1' else metric} {_fmt(metric, results['unpruned']['metrics'][metric])})"
        for h in head_to_head(results):
            ours, peer = auto_summary(autos[results["arch"]], h["budget"]), h["peer"]
            if peer is None:
                failure = results["torch_pruning"].get("failure")
                lines.append(f"| {name} | -{h['budget']:g}% | {_value(metric, ours)} | "
                             f"{'fails (channel shuffle: ' + failure['exception'] + ')' if failure else 'not run'} | "
                             f"ours (TP can't prune it) | - |")
            else:
                who = {"wins": "**ours**", "loses": "**Torch-Pruning**", "ties": "tie (within the seeds' spread)"}[verdict(ours, peer)]
                duel = autos[results["arch"]]["latency_duel"][str(h["budget"])]["auto"]
                lines.append(f"| {name} | -{h['budget']:g}% | {_value(metric, ours)} | {_value(metric, peer)} "
                             f"({peer['importance'].replace('_', '-')}, {peer['scope']}) | {who} | "
                             f"{duel['ratio_median']:.2f} [{duel['ratio_iqr'][0]:.2f}, {duel['ratio_iqr'][1]:.2f}] |")
            name = ""
    return lines


def auto_table(folder: str = RESULTS) -> list[str]:
    """Each ``auto`` result: per budget, what the calibration loss chose for each seed, the metric of the
    choice against the shrink default's and the best candidate's (by the evaluation, which auto never
    sees), and both models' latency over the peer's best."""
    lines = ["| fixture | FLOPs | chosen (seeds 0, 1, 2) | auto | shrink default (mean) | best candidate | "
             "latency / TP's best: auto, shrink default |", "|---|---|---|---|---|---|---|"]
    for results in load_results(folder, "auto"):
        metric = results["metric"]
        for budget in sorted({r["budget"] for r in results["rows"]}):
            here = [r for r in results["rows"] if r["budget"] == budget]
            by_candidate = {}
            for r in here:
                for c in r["candidates"]:
                    by_candidate.setdefault(f"{c['mode']}:{c['normalize']}", []).append(c["metric"])
            default = by_candidate["shrink:mean"]
            best, values = max(by_candidate.items(), key=lambda kv: np.mean(kv[1]))
            duel = results["latency_duel"].get(str(budget))
            latency = (f"{duel['auto']['ratio_median']:.2f} [{duel['auto']['ratio_iqr'][0]:.2f}, {duel['auto']['ratio_iqr'][1]:.2f}], "
                       f"{duel['shrink']['ratio_median']:.2f} ({duel['peer']})" if duel else "- (no peer)")
            lines.append(f"| {results['label']} | -{budget:g}% | {', '.join(r['chosen'] for r in here)} | "
                         f"{_value(metric, auto_summary(results, budget))} | {_fmt(metric, np.mean(default))} | "
                         f"{_fmt(metric, np.mean(values))} ({best}) | {latency} |")
    return lines if len(lines) > 2 else []


def duel_table(all_results: list[dict]) -> list[str]:
    """Each latency duel: the peer's cell, the pooled ratio and each seed's."""
    lines = ["| fixture | FLOPs | peer | ours / peer, pooled | per seed |", "|---|---|---|---|---|"]
    for results in all_results:
        name = results["label"]
        for budget, duel in results.get("latency_duel", {}).items():
            ours, seeds = duel["ours"], duel.get("seeds", {})
            lines.append(f"| {name} | -{float(budget):g}% | {duel['peer']} | {ours['ratio_median']:.2f} "
                         f"[{ours['ratio_iqr'][0]:.2f}, {ours['ratio_iqr'][1]:.2f}] | "
                         + ", ".join(f"{s}: {d['ratio_median']:.2f}" for s, d in seeds.items()) + " |")
            name = ""
    return lines


def full_tables(all_results: list[dict]) -> list[str]:
    lines = []
    for results in all_results:
        metric, label = results["metric"], results["label"]
        summary = [s for s in results["summary"]]
        budgets = results["protocol"]["budgets"]
        checks = results["checks"]
        lines += [f"### {label}", "",
                  f"Unpruned {metric} {_fmt(metric, results['unpruned']['metrics'][metric])}"
                  + (f" (torch, same crops and transform: {_fmt(metric, checks['metric']['torch'])})" if "torch" in checks["metric"] else "")
                  + f"; FLOPs {checks['flops']['xprune_jax_analysis']:,} (torch hooks: {checks['flops']['torch_hooks']:,}); "
                  f"params {checks['params']['xprune_jax']:,} (torch: {checks['params']['torch']:,}); output relative error "
                  f"JAX vs torch {checks['output_relative_error']:.1e}. Run: {results['wall_seconds'] / 60:.0f} min.", ""]
        failure = results["torch_pruning"].get("failure")
        if failure:
            lines += [f"Torch-Pruning {results['torch_pruning']['version']} cannot prune it: `{failure['during']}` raises "
                      f"`{failure['exception']}: {failure['message']}` at `{failure['where']}`.", ""]
        lines += ["| side | cell | " + " | ".join(f"-{b:g}%: {metric}" for b in budgets) + " | FLOPs | params | latency |",
                  "|---|---|" + "---|" * len(budgets) + "---|---|---|"]
        cells = [(s["side"], s["cell"]) for s in sorted(summary, key=_cell_order)]
        cells = list(dict.fromkeys(cells))
        best = {b: max(s["metric_mean"] for s in summary if s["budget"] == b and "infeasible" not in s) for b in budgets}
        for side, cell in cells:
            row = {s["budget"]: s for s in summary if s["cell"] == cell}
            values, ratios = [], []
            for b in budgets:
                s = row.get(b)
                if s is None:
                    values.append("not run")
                elif "infeasible" in s:
                    values.append("infeasible")
                else:
                    text = _value(metric, s)
                    values.append(f"**{text}**" if s["metric_mean"] == best[b] else text)
                    ratios.append(s)
            fmt = lambda key: " / ".join(f"{s[key]:.3f}" for s in ratios)  # noqa: E731
            lines.append(f"| {'TP' if side == 'torch-pruning' else 'ours'} | {cell.removeprefix('TP ')} | {' | '.join(values)} | "
                         f"{fmt('flops_ratio')} | {fmt('params_ratio')} | {fmt('latency_ratio')} |")
        lines.append("")
    return lines


def _cell_order(s: dict) -> tuple:
    """Our default first, then our criteria (as CRITERIA lists them) by normalisation, remove+shrink and
    the confidence objective; then Torch-Pruning by importance and scope."""
    if s["side"] == "torch-pruning":
        return (1, TP_IMPORTANCES.index(s["importance"]), TP_SCOPES.index(s["scope"]), 0, 0)
    default = all(s.get(k) == v for k, v in DEFAULT.items()) and s.get("objective") != "confidence"
    return (0, not default, s.get("objective") == "confidence", s["mode"] != "shrink",
            NORMALIZATIONS.index(s["normalize"]), CRITERIA.index(s["criterion"]))


def normalisation_table(all_results: list[dict]) -> list[str]:
    """Which normalisation wins: per fixture, budget and criterion, the best of mean/max/lamp."""
    lines = ["| fixture | budget | " + " | ".join(NORMALIZATIONS) + " | criteria compared |", "|---|---|---|---|---|---|"]
    total = dict.fromkeys(NORMALIZATIONS, 0)
    for results in all_results:
        summary = [s for s in results["summary"] if s["side"] == "ours" and s.get("mode") == "shrink"
                   and s.get("objective") != "confidence" and "infeasible" not in s]
        for budget in results["protocol"]["budgets"]:
            wins, compared = dict.fromkeys(NORMALIZATIONS, 0), 0
            for criterion in CRITERIA:
                group = {s["normalize"]: s for s in summary if s["criterion"] == criterion and s["budget"] == budget}
                if set(group) != set(NORMALIZATIONS):
                    continue
                compared += 1
                top = max(s["metric_mean"] for s in group.values())
                for n, s in group.items():
                    wins[n] += s["metric_mean"] == top
            for n in NORMALIZATIONS:
                total[n] += wins[n]
            lines.append(f"| {results['label']} | -{budget:g}% | " + " | ".join(str(wins[n]) for n in NORMALIZATIONS) + f" | {compared} |")
    lines.append("| all | | " + " | ".join(f"**{total[n]}**" for n in NORMALIZATIONS) + " | |")
    return lines


RECOVERY_STAGES = {"as_cut": "as cut", "recalibrated": "BN recalibrated", "finetuned": "fine-tuned"}


def recovery_table(folder: str = RESULTS, kind: str = "recovery") -> list[str]:
    """Our model against Torch-Pruning's best, both recovered alike (``recover``'s JSON files of ``kind``): each
    stage's metric over seeds, and who wins after fine-tuning (the gap against the seeds' spread)."""
    from xprune_jax.experiments.prune import unpruned_label

    lines = ["| fixture (unpruned) | FLOPs | side, cell | " + " | ".join(RECOVERY_STAGES.values())
             + " | of unpruned | who wins, fine-tuned |", "|---|---|---|---|---|---|---|---|"]
    for results in load_results(folder, kind):
        metric, unpruned = results["metric"], results["unpruned"]["metrics"][results["metric"]]
        name = unpruned_label(results["label"], metric, results["unpruned"])
        for budget in sorted({r["budget"] for r in results["rows"]}):
            cells = {}
            for side in ("ours", "torch-pruning"):
                group = [r for r in results["rows"] if r["budget"] == budget and r["side"] == side]
                models = len({r["model"] for r in group})  # a magnitude importance prunes alike for every seed
                cells[side] = {"cell": group[0]["cell"], "n": f"{len(group)} seeds" if models == len(group)
                               else f"{models} model{'s' if models > 1 else ''}, {len(group)} seeds", **{stage: {
                    "metric_mean": float(np.mean([r[stage] for r in group])),
                    "metric_std": float(np.std([r[stage] for r in group], ddof=1)) if len(group) > 1 else 0.0}
                    for stage in RECOVERY_STAGES}}
            who = {"wins": "**ours**", "loses": "**Torch-Pruning**", "ties": "tie (within the seeds' spread)"}[
                verdict(cells["ours"]["finetuned"], cells["torch-pruning"]["finetuned"])]
            for side, c in cells.items():
                lines.append(f"| {name} | {f'-{budget:g}%' if side == 'ours' else ''} | {'ours' if side == 'ours' else 'TP'}, "
                             f"{c['cell'].removeprefix('TP ')} ({c['n']}) | "
                             + " | ".join(_value(metric, c[stage]) for stage in RECOVERY_STAGES)
                             + f" | {c['finetuned']['metric_mean'] / unpruned:.1%} | {who if side == 'ours' else ''} |")
                name = ""
    return lines if len(lines) > 2 else []


def table(args) -> None:
    from xprune_jax.fileio import atomic_path

    all_results = load_results(args.results)
    if not all_results:
        raise UserError(f"no results in {args.results}; run `python benchmarks/bench_peers.py run --arch=...` first")
    lines = ["# Against Torch-Pruning: every cell", "",
             "Made by `python benchmarks/bench_peers.py table` from the JSON files beside it. Mean over calibration "
             "seeds ± standard deviation (no ± where the seeds agreed); FLOPs and params ratios per budget "
             "(`-30% / -50%`), latency the median per-round ratio to the unpruned model (median over seeds). "
             "Best per budget in bold.", "", "## Who wins", ""] + readme_table(all_results, args.results)
    lines += ["", "## Latency duels", "",
              "Our shrink default's model (`--mode=shrink`, the default before auto; auto's duels are in the section "
              "above) and the peer's best of every seed, all timed side by side in one run with the unpruned "
              "model (`run`, or again `python benchmarks/bench_peers.py duel --arch=ARCH`): our time over the peer's per "
              "round and seed, pooled over the seeds (median [IQR]), and each seed's median.", ""] + duel_table(all_results)
    sections = [  # (title, what it shows, its rows), each written where its results exist
        ("The default, auto: what the calibration loss chose",
         "`xprune prune`'s default (`--mode=auto`) prunes with each candidate allocation (shrink with the mean, max "
         "and lamp normalisations, and remove+shrink) and keeps the one whose pruned model has the lowest loss on "
         "the calibration images (`python benchmarks/bench_peers.py auto --arch=ARCH`). Its metric against the "
         "shrink default's and the best candidate's by the evaluation (which auto never sees); latency: every "
         "seed's auto and shrink-default models timed side by side with the peer's best (median [IQR] of the "
         "per-round ratios).", auto_table(args.results)),
        ("Priced by layer latency",
         "Our shrink default with the global allocation priced by its layers' measured seconds per FLOP "
         "(`xprune prune --latency_price=N`; `python benchmarks/bench_peers.py price --arch=ARCH`): the metric as "
         "cut, and every seed's model timed side by side with the unpruned model and the peer's best, our time "
         "over the peer's per round and seed, pooled (median [IQR]).", price_table(args.results)),
        ("Which normalisation wins (number of criteria for which it is best, shrink)", "",
         normalisation_table(all_results)),
        ("After recovery",
         "Our model (the cell says which: the default `auto` where `recover --arch=ARCH` has run since it became "
         "the default, else the shrink default) and Torch-Pruning's best model per budget (seed by seed), each "
         "recovered as `configs/recovery.py` recovers (BN recalibration, then distillation from the unpruned model "
         "for about one epoch, a detector's task loss beside it): `python benchmarks/bench_peers.py recover "
         "--arch=ARCH`. Mean over calibration seeds ± standard deviation. Where the task loss trains, the unpruned "
         "model recovered alike is given beside the unpruned one.", recovery_table(args.results)),
        ("After recovery: the shrink default",
         "As above, with our shrink default (`xprune prune --mode=shrink`, the default before auto) where auto's "
         "models were recovered too: `python benchmarks/bench_peers.py recover --arch=ARCH --ours=shrink`.",
         recovery_table(args.results, "recovery_shrink")),
    ]
    for title, text, rows in sections:
        if rows:
            lines += ["", f"## {title}", ""] + ([text, ""] if text else []) + rows
    lines += ["", "## Every cell", ""] + full_tables(all_results)
    text = "\n".join(lines) + "\n"
    with atomic_path(os.path.join(args.results, "table.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="prune one fixture both ways and measure every cell")
    p.add_argument("--arch", required=True, choices=sorted(FIXTURES))
    p.add_argument("--budgets", default="30,50", help="FLOPs reductions in percent, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--norm_criteria", default="", help="criteria also run with the max and lamp normalisations "
                   "(default: all but random)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per pruned model, side by side with the unpruned")
    p.add_argument("--duel_repeats", type=int, default=60, help="rounds timing our default against the peer's best")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/peers/<arch>.json)")
    r = commands.add_parser("recover", help="our default and Torch-Pruning's best model recovered alike (after `run`)")
    r.add_argument("--arch", required=True, choices=sorted(FIXTURES))
    r.add_argument("--seeds", default="", help="calibration seeds (default: those of the run)")
    r.add_argument("--ours", default="auto", choices=sorted(RECOVERY_KINDS), help="our model: the default (auto, after "
                   "`auto`) or the shrink default; written to <arch>.recovery.json or <arch>.recovery_shrink.json")
    d = commands.add_parser("duel", help="time our default against the peer's best again, every seed (after `run`)")
    d.add_argument("--arch", required=True, choices=sorted(FIXTURES))
    d.add_argument("--duel_repeats", type=int, default=60, help="rounds; each times every seed's pair and the unpruned model")
    c = commands.add_parser("price", help="our default priced by measured layer latency, timed beside the peer's best (after `run`)")
    c.add_argument("--arch", required=True, choices=sorted(FIXTURES))
    c.add_argument("--prices", default="0.25,0.5", help="latency_price exponents (0, the default, is always added)")
    c.add_argument("--layer_repeats", type=int, default=15, help="timed rounds per layer for the layer latency table")
    c.add_argument("--duel_repeats", type=int, default=60, help="rounds; each times every model of a budget")
    a = commands.add_parser("auto", help="the default --mode=auto's choices, metric and latency beside the peer's best (after `run`)")
    a.add_argument("--arch", required=True, choices=sorted(FIXTURES))
    a.add_argument("--duel_repeats", type=int, default=60, help="rounds; each times every model of a budget")
    t = commands.add_parser("table", help="the Markdown tables from the results JSONs")
    t.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    try:
        {"run": run, "recover": recover, "duel": duel, "price": price, "auto": auto, "table": table}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()

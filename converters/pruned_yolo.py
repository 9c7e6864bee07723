"""Pruned YOLOv8 models as Ultralytics ``DetectionModel``s, and the trainer that fine-tunes them.

The model is built from the spec dict (``xprune_jax.spec.spec_to_dict``, read as plain data: no JAX
here) out of Ultralytics' own classes with the pruned shapes: ``Conv`` and ``SPPF`` with their
widths, ``C2f`` with its remaining bottlenecks (each with its own inner width), ``Detect`` with
each level's branch widths. A C2f whose two halves pruning narrowed apart (``first != hidden``;
Ultralytics' C2f splits cv1's output into equal halves) becomes Ultralytics' ``C3f``, the same block
with the halves made by two convs: ``cv2`` makes the first half, ``cv1`` the second (which feeds the
bottlenecks), ``cv3`` reads the concat.

Ultralytics' ``DetectionTrainer`` rebuilds every model from its yaml (``parse_model``), which cannot
state per-bottleneck or per-level widths, so it would undo the pruning. The yaml of a pruned model
therefore carries the spec under ``xprune_spec`` and a ``scale`` that no yaml defines, so that a plain
``.train()`` stops with ``KeyError`` naming the fix instead of training an unpruned network (an
unpruned model keeps its standard yaml); :class:`PrunedDetectionTrainer` builds the model from the spec:

    YOLO("pruned.pt").train(trainer=PrunedDetectionTrainer, data=...)
"""

import copy
import re

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.modules import Bottleneck, C2f, Concat, Conv, Detect, SPPF
from ultralytics.nn.modules.block import C3f
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

SPEC_KEY = "xprune_spec"
PRUNED_SCALE = ("pruned by xprune_jax: a yaml cannot hold its widths, fine-tune it with "
                "model.train(trainer=converters.pruned_yolo.PrunedDetectionTrainer, ...)")


def _bottlenecks(c2f: dict, shortcut: bool) -> nn.ModuleList:
    hidden, blocks = c2f["hidden"], []
    for b in c2f["bottlenecks"]:
        m = Bottleneck(hidden, hidden, shortcut, k=((3, 3), (3, 3)), e=1.0)
        m.cv1, m.cv2 = Conv(hidden, b["hidden"], 3), Conv(b["hidden"], hidden, 3)
        blocks.append(m)
    return nn.ModuleList(blocks)


def _c2f(c2f: dict, c1: int, layer: C2f) -> nn.Module:
    first, hidden, n = c2f.get("first") or c2f["hidden"], c2f["hidden"], len(c2f["bottlenecks"])
    if first == hidden:
        m = layer
        m.c, m.cv1 = hidden, Conv(c1, 2 * hidden)
        m.cv2 = Conv(2 * hidden + n * hidden, c2f["out"])
    else:
        m = C3f(c1, c2f["out"], n, c2f["shortcut"])
        m.cv2, m.cv1 = Conv(c1, first), Conv(c1, hidden)
        m.cv3 = Conv(first + hidden + n * hidden, c2f["out"])
    m.m = _bottlenecks(c2f, c2f["shortcut"])
    return m


def _detect_branch(c1: int, widths, outputs: int) -> nn.Sequential:
    return nn.Sequential(Conv(c1, widths[0], 3), Conv(widths[0], widths[1], 3), nn.Conv2d(widths[1], outputs, 1))


def build_detection_model(spec: dict, names: list[str] | None = None) -> DetectionModel:
    """The ``DetectionModel`` (random weights, train mode) whose layers have the shapes of the YOLOv8 ``spec``.

    The graph (layer order, sources, strides, ``Detect``'s settings) is ``yolov8{scale}.yaml``'s;
    every Conv, C2f, SPPF and Detect branch is then rebuilt at the spec's widths.
    """
    if spec.get("fused"):
        raise ValueError("a fused YOLOv8 spec has no BatchNorms; export the unfused model")
    detect = spec["detect"]
    num_classes = detect["num_classes"]
    cfg = yaml_model_load(f"yolov8{spec['scale']}.yaml")
    model = DetectionModel(cfg, nc=num_classes, verbose=False)
    yaml_shapes = {k: v.shape for k, v in model.state_dict().items()}
    blocks = {b["name"]: b for b in (*spec["convs"], *spec["c2fs"], spec["sppf"])}
    widths = []  # each layer's output channels
    for i, layer in enumerate(model.model):
        sources = [layer.f] if isinstance(layer.f, int) else layer.f
        inputs = [widths[j] if j != -1 else widths[-1] if widths else 3 for j in sources]
        block = blocks.get(f"model.{i}")
        if isinstance(layer, Conv):
            layer.conv = nn.Conv2d(inputs[0], block["out"], block["kernel"], block["stride"],
                                   block["kernel"] // 2, bias=False)
            layer.bn = nn.BatchNorm2d(block["out"])
        elif isinstance(layer, C2f):
            replacement = _c2f(block, inputs[0], layer)
            if replacement is not layer:
                replacement.i, replacement.f, replacement.type = layer.i, layer.f, "ultralytics.nn.modules.block.C3f"
                model.model[i] = replacement
        elif isinstance(layer, SPPF):  # YOLOv8's SPPF: cv1 with SiLU
            layer.cv1, layer.cv2 = Conv(inputs[0], block["hidden"]), Conv(4 * block["hidden"], block["out"])
        elif isinstance(layer, Detect):
            layer.cv2 = nn.ModuleList(_detect_branch(c, w, 4 * layer.reg_max) for c, w in zip(inputs, detect["box_widths"]))
            layer.cv3 = nn.ModuleList(_detect_branch(c, w, num_classes) for c, w in zip(inputs, detect["class_widths"]))
        if isinstance(layer, Concat):
            widths.append(sum(inputs))
        elif isinstance(layer, Detect):
            widths.append(None)
        else:
            widths.append(block["out"] if block else inputs[0])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # Ultralytics' initialize_weights
            m.eps, m.momentum = spec.get("bn_eps", 1e-3), 0.03
    for m in model.model:
        m.np = sum(x.numel() for x in m.parameters())
    model.model[-1].bias_init()  # Ultralytics' initial class and box biases, for training from scratch
    if {k: v.shape for k, v in model.state_dict().items()} != yaml_shapes:  # else the yaml builds it: keep it
        model.yaml = {**model.yaml, "scale": PRUNED_SCALE, SPEC_KEY: copy.deepcopy(spec)}
    if names is not None:
        model.names = dict(enumerate(names))
    return model


_BOTTLENECK = re.compile(r"^(model\.\d+)\.m\.(\d+)\.(.*)$")


def ultralytics_state_dict(spec: dict, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict in the spec's module paths (those of the Flax model: ``model.2.m.2`` stays ``m.2``
    when ``m.1`` was removed) -> the keys of :func:`build_detection_model`'s module: bottlenecks
    renumbered, a C3f's cv1 split into cv2 (first half) and cv1 (second), its cv2 renamed cv3."""
    c2fs = {c["name"]: c for c in spec["c2fs"]}
    positions = {(c["name"], b["name"].split(".")[1]): str(i) for c in spec["c2fs"] for i, b in enumerate(c["bottlenecks"])}
    out = {}
    for key, value in state_dict.items():
        match = _BOTTLENECK.match(key)
        if match:
            key = f"{match[1]}.m.{positions[match[1], match[2]]}.{match[3]}"
        block, _, rest = key.partition(".")[2].partition(".")
        c2f = c2fs.get(f"model.{block}")
        first = c2f and (c2f.get("first") or c2f["hidden"])
        if c2f is None or first == c2f["hidden"] or not rest.startswith(("cv1.", "cv2.")):
            out[key] = value
        elif rest.startswith("cv2."):
            out[f"model.{block}.cv3.{rest[4:]}"] = value
        else:
            out[f"model.{block}.cv2.{rest[4:]}"] = value[:first]
            out[f"model.{block}.cv1.{rest[4:]}"] = value[first:]
    return out


class PrunedDetectionTrainer(DetectionTrainer):
    """Ultralytics' ``DetectionTrainer``, except that a model whose yaml carries an xprune spec is built
    from that spec (with the given weights, which must fit it) rather than by ``parse_model``."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        spec = cfg.get(SPEC_KEY) if isinstance(cfg, dict) else None
        if spec is None:
            return super().get_model(cfg, weights, verbose)
        if self.data["nc"] != spec["detect"]["num_classes"]:
            raise ValueError(f"the pruned model detects {spec['detect']['num_classes']} classes and the dataset has "
                             f"{self.data['nc']}; fine-tune it on data with the same classes")
        model = build_detection_model(spec, list(self.data["names"].values()))
        if weights is not None:
            source = (weights.get("ema") or weights["model"]) if isinstance(weights, dict) else weights
            model.load_state_dict(source.float().state_dict(), strict=True)
        return model

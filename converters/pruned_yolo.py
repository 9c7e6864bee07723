"""Pruned YOLOv8 models as Ultralytics ``DetectionModel``s, and the trainer that fine-tunes them.

The model is built from ``yolov8{scale}.yaml`` out of Ultralytics' own classes, then edited as pruning
edited the Flax model (the spec dict's ``edits``, read as plain data: no JAX here): a removed bottleneck
becomes ``nn.Identity`` (its concat slot stays) or leaves its C2f (its slot goes), and every conv and
norm takes the shape of its weight (``converters.pruned.narrow``). A C2f whose two halves pruning
narrowed apart (Ultralytics' C2f splits cv1's output into equal halves) becomes Ultralytics' ``C3f``,
the same block with the halves made by two convs: ``cv2`` makes the first half, ``cv1`` the second
(which feeds the bottlenecks), ``cv3`` reads the concat.

Ultralytics' ``DetectionTrainer`` rebuilds every model from its yaml (``parse_model``), which cannot
state per-bottleneck or per-level widths, so it would undo the pruning. The yaml of a pruned model
therefore carries the spec and the shapes (``xprune_spec``, ``xprune_shapes``) and a ``scale`` that no
yaml defines, so that a plain ``.train()`` stops with ``KeyError`` naming the fix instead of training an
unpruned network (an unpruned model keeps its standard yaml); :class:`PrunedDetectionTrainer` builds
the model from them:

    YOLO("pruned.pt").train(trainer=PrunedDetectionTrainer, data=...)
"""

import copy
import re

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.modules.block import C3f
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

from converters.pruned import narrow

SPEC_KEY, SHAPES_KEY = "xprune_spec", "xprune_shapes"
PRUNED_SCALE = ("pruned by xprune_jax: a yaml cannot hold its widths, fine-tune it with "
                "model.train(trainer=converters.pruned_yolo.PrunedDetectionTrainer, ...)")


def _edits(spec: dict) -> tuple[dict, dict]:
    """The spec's removed units and edited channel selections, each by module path."""
    edits = spec.get("edits") or {}
    return dict(map(tuple, edits.get("removed", ()))), dict(map(tuple, edits.get("channels", ())))


def _halves(c2f: dict, channels: dict) -> tuple[int, int]:
    """The widths of a C2f's two halves of cv1's output: its selections ``first`` and ``second`` where pruning
    edited them (they stay a prefix and the rest), else the spec's."""
    first = channels.get(f"{c2f['name']}.first")
    second = channels.get(f"{c2f['name']}.second")
    return (c2f.get("first") or c2f["hidden"] if first is None else len(first),
            c2f["hidden"] if second is None else len(second))


def _kept_bottlenecks(c2f: dict, removed: dict) -> list[dict]:
    """The bottlenecks still in the C2f's ``m`` (a dropped one leaves it; an identity one stays, empty)."""
    return [b for b in c2f["bottlenecks"] if removed.get(f"{c2f['name']}.{b['name']}") != "drop"]


def build_detection_model(spec: dict, shapes: dict[str, tuple], names: list[str] | None = None) -> DetectionModel:
    """The ``DetectionModel`` (random weights, train mode) of the YOLOv8 ``spec``, its layers at ``shapes``
    (the keys of :func:`ultralytics_state_dict`). The graph (layer order, sources, strides, ``Detect``'s
    settings) is ``yolov8{scale}.yaml``'s."""
    if spec.get("fused"):
        raise ValueError("a fused YOLOv8 spec has no BatchNorms; export the unfused model")
    num_classes = spec["detect"]["num_classes"]
    model = DetectionModel(yaml_model_load(f"yolov8{spec['scale']}.yaml"), nc=num_classes, verbose=False)
    yaml_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    removed, channels = _edits(spec)
    for c2f in spec["c2fs"]:
        i = int(c2f["name"].split(".")[1])
        layer = model.model[i]
        layer.m = nn.ModuleList(nn.Identity() if removed.get(f"{c2f['name']}.{b['name']}") == "identity"
                                else layer.m[int(b["name"].split(".")[1])] for b in _kept_bottlenecks(c2f, removed))
        first, second = _halves(c2f, channels)
        if first == second:
            layer.c = second
            continue
        replacement = C3f(layer.cv1.conv.in_channels, layer.cv2.conv.out_channels, 0, c2f["shortcut"])
        replacement.m = layer.m
        replacement.i, replacement.f, replacement.type = layer.i, layer.f, "ultralytics.nn.modules.block.C3f"
        model.model[i] = replacement
    narrow(model, shapes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # Ultralytics' initialize_weights
            m.eps, m.momentum = spec.get("bn_eps", 1e-3), 0.03
    for m in model.model:
        m.np = sum(x.numel() for x in m.parameters())
    model.model[-1].bias_init()  # Ultralytics' initial class and box biases, for training from scratch
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if built != yaml_shapes:  # else the yaml builds it: keep it
        model.yaml = {**model.yaml, "scale": PRUNED_SCALE, SPEC_KEY: copy.deepcopy(spec),
                      SHAPES_KEY: {k: list(v) for k, v in built.items()}}
    if names is not None:
        model.names = dict(enumerate(names))
    return model


_BOTTLENECK = re.compile(r"^(model\.\d+)\.m\.(\d+)\.(.*)$")


def ultralytics_state_dict(spec: dict, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict in the spec's module paths (those of the Flax model: ``model.2.m.2`` stays ``m.2``
    when ``m.1`` was dropped) -> the keys of :func:`build_detection_model`'s module: bottlenecks
    renumbered, a C3f's cv1 split into cv2 (first half) and cv1 (second), its cv2 renamed cv3."""
    removed, channels = _edits(spec)
    halves = {c["name"]: _halves(c, channels) for c in spec["c2fs"]}
    positions = {(c["name"], b["name"].split(".")[1]): str(i) for c in spec["c2fs"]
                 for i, b in enumerate(_kept_bottlenecks(c, removed))}
    out = {}
    for key, value in state_dict.items():
        match = _BOTTLENECK.match(key)
        if match:
            key = f"{match[1]}.m.{positions[match[1], match[2]]}.{match[3]}"
        block, _, rest = key.partition(".")[2].partition(".")
        first, second = halves.get(f"model.{block}", (0, 0))
        if first == second or not rest.startswith(("cv1.", "cv2.")):
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
        source = None if weights is None else (weights.get("ema") or weights["model"]) if isinstance(weights, dict) else weights
        if not cfg.get(SHAPES_KEY) and source is None:
            raise ValueError(f"the pruned model's yaml holds no {SHAPES_KEY} and no weights were given: its widths "
                             "are unknown; fine-tune the exported checkpoint itself")
        shapes = cfg.get(SHAPES_KEY) or {k: v.shape for k, v in source.state_dict().items()}  # files before the shapes
        model = build_detection_model(spec, {k: tuple(v) for k, v in shapes.items()}, list(self.data["names"].values()))
        if source is not None:
            model.load_state_dict(source.float().state_dict(), strict=True)
        return model

"""The architecture registry: name -> how to build its default spec and its Flax module."""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from xprune_jax.errors import UserError
from xprune_jax.models.layers import INTERMEDIATES
from xprune_jax.models.mobilenet_v2 import MobileNetV2, mobilenet_v2_spec
from xprune_jax.models.rcnn import (FasterRCNN, RetinaNet, TorchvisionDetectionPipeline, fasterrcnn_mobilenet_v3_large_fpn_spec,
                                    fasterrcnn_resnet50_fpn_spec, retinanet_resnet50_fpn_spec)
from xprune_jax.models.resnet import ResNet, resnet_spec
from xprune_jax.models.shufflenet_v2 import ShuffleNetV2, shufflenet_v2_spec
from xprune_jax.models.yolov8 import SCALES as YOLOV8_SCALES, YOLOv8, yolov8_spec
from xprune_jax.models.yolov8_pipeline import YOLOv8Pipeline, YOLOv8PredictPipeline
from xprune_jax.ops.nms import shapes_only as nms_shapes_only


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    task: str  # "classification" | "detection"
    module: type[nn.Module]  # built as module(spec)
    default_spec: Callable[[], Any]
    input_size: int  # the size the reference weights were trained at (for init and examples)
    pipeline: Callable | None = None  # detectors: Model -> its DetectionPipeline (evaluation; predict too by default)
    predict_pipeline: Callable | None = None  # detectors whose single-image predict differs: Model -> its pipeline


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register(Architecture(_name, "classification", ResNet, lambda n=_name: resnet_spec(n), 224))
register(Architecture("mobilenet_v2", "classification", MobileNetV2, mobilenet_v2_spec, 224))
for _name in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"):
    register(Architecture(_name, "classification", ShuffleNetV2, lambda n=_name: shufflenet_v2_spec(n), 224))
for _scale in YOLOV8_SCALES:
    register(Architecture(f"yolov8{_scale}", "detection", YOLOv8, lambda s=_scale: yolov8_spec(s), 640,
                          lambda m: YOLOv8Pipeline(m.spec, imgsz=m.meta["preprocess"]["imgsz"]),
                          lambda m: YOLOv8PredictPipeline(m.spec, imgsz=m.meta["preprocess"]["imgsz"])))
register(Architecture("fasterrcnn_resnet50_fpn", "detection", FasterRCNN, fasterrcnn_resnet50_fpn_spec, 800,
                      lambda m: TorchvisionDetectionPipeline(m.module)))
register(Architecture("fasterrcnn_mobilenet_v3_large_fpn", "detection", FasterRCNN, fasterrcnn_mobilenet_v3_large_fpn_spec,
                      800, lambda m: TorchvisionDetectionPipeline(m.module)))
register(Architecture("retinanet_resnet50_fpn", "detection", RetinaNet, retinanet_resnet50_fpn_spec, 800,
                      lambda m: TorchvisionDetectionPipeline(m.module)))


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def build(arch: str, spec) -> nn.Module:
    return get_architecture(arch).module(spec)


def variable_shapes(arch: str, spec, input_size: int | None = None) -> dict:
    """The model's ``params`` and ``batch_stats`` as ShapeDtypeStructs, without allocating them (an
    abstract trace of ``init``, done once per hashable spec: loading and planning ask for the same ones)."""
    size = input_size or get_architecture(arch).input_size
    try:
        hash(spec)
    except TypeError:  # a spec built by hand with lists: traced every time
        return _variable_shapes.__wrapped__(arch, spec, size, jax.config.jax_enable_x64)
    shapes = _variable_shapes(arch, spec, size, jax.config.jax_enable_x64)
    return jax.tree_util.tree_map(lambda x: x, shapes)  # a copy: callers may edit its dicts


@functools.lru_cache(maxsize=64)
def _variable_shapes(arch: str, spec, size: int, x64: bool) -> dict:
    """``x64`` is only a key: under ``jax.enable_x64`` the same init makes other dtypes."""
    with nms_shapes_only():
        shapes = jax.eval_shape(build(arch, spec).init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


def init_variables(arch: str, spec, seed: int = 0, input_size: int | None = None) -> dict:
    size = input_size or get_architecture(arch).input_size
    variables = jax.jit(build(arch, spec).init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def flatten_names(tree: dict) -> dict[str, Any]:
    """``{"layer1.0": {"conv1": {"output": a}}} -> {"layer1.0.conv1": a}``: each module's captured
    output under its torch module path."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]:
        keys = [p.key for p in path]
        if keys and keys[-1] == "output":
            keys = keys[:-1]
        flat[".".join(keys)] = leaf
    return flat


def apply_with_intermediates(module: nn.Module, variables: dict, images) -> tuple[Any, dict]:
    """Run the model and return ``(outputs, {layer name: activation})`` for every conv/linear
    layer and every block."""
    out, state = module.apply(variables, images, mutable=[INTERMEDIATES])
    return out, flatten_names(state[INTERMEDIATES])

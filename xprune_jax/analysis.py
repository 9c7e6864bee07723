"""Per-layer facts derived once for every architecture from a traced forward pass: execution
order, kind, output shape, parameters and FLOPs.

Nothing here is written per architecture: layers are the modules that ``capture`` their output,
found by an abstract trace (no computation), with costs read from the parameter shapes.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax import models, tree_paths
from xprune_jax.models.layers import BatchNorm
from xprune_jax.ops.nms import shapes_only as nms_shapes_only


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str  # torch module path
    kind: str  # stem | conv | pointwise | depthwise | shortcut | head | block
    shape: tuple[int, ...]  # output shape of one image (H, W, C) or (C,)
    params: int  # parameters under this module (a block: all of its layers)
    flops: int  # multiply-accumulates for one image, torchvision's "GFLOPS" convention
    norm: str | None = None  # the BatchNorm applied to this layer's output, if one is


def traced_layers(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict, dict, list[str], dict[str, str]]:
    """One abstract trace of ``init`` (no computation): variable shapes, captured output shapes by name, module
    paths in the order their calls *finish* (a block after its layers), and the BatchNorm that each
    module's output goes through next (the norm called right after it, on its output)."""
    order, norms, last = [], {}, {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            name = ".".join(context.module.path)
            if isinstance(context.module, (BatchNorm, nn.BatchNorm)) and args and last.get("output") is args[0]:
                norms[last["name"]] = name
            order.append(name)
            last.update(name=name, output=out)
        return out

    def init(key, x):  # the interceptor sees tracers: it must run inside the trace
        with nn.intercept_methods(record), nms_shapes_only():
            return module.init(key, x, mutable=True)  # every collection, the captured outputs included

    collections = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
    variables = {k: v for k, v in collections.items() if k in ("params", "batch_stats")}
    return variables, models.flatten_names(collections[models.INTERMEDIATES]), order, norms


def kernels(tree: dict) -> list:
    """Every conv/linear kernel in a variable subtree."""
    return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if path[-1].key == "kernel"]


def describe_layers(arch: str, spec, input_size: int | tuple[int, int] | None = None) -> list[LayerInfo]:
    """Every captured layer of the model in execution order, for one image of ``input_size``."""
    return list(_described(arch, spec, _hw(arch, input_size)))


def count_params(arch: str, spec, input_size: int | tuple[int, int] | None = None) -> int:
    """The model's parameters (``params``, not ``batch_stats``), read from the same cached trace as
    :func:`describe_layers` at ``input_size`` (the counts don't depend on it: pass the size the
    layers are described at, and one trace serves both)."""
    params = _traced(arch, spec, _hw(arch, input_size))[0]["params"]
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _hw(arch: str, input_size) -> tuple[int, int]:
    size = input_size or models.get_architecture(arch).input_size
    return (size, size) if isinstance(size, int) else tuple(size)


@functools.lru_cache(maxsize=256)
def _traced(arch: str, spec, hw: tuple[int, int]) -> tuple:
    """:func:`traced_layers` once per (frozen, hashable) spec: planners ask for the same ones often."""
    return traced_layers(models.build(arch, spec), (1, *hw, 3))


@functools.lru_cache(maxsize=256)
def _described(arch: str, spec, hw: tuple[int, int]) -> tuple[LayerInfo, ...]:
    variables, outputs, order, norms = _traced(arch, spec, hw)
    params = variables["params"]
    captured = [name for name in order if name in outputs]
    layers, first_conv = [], True
    flops_of = {}
    for name in captured:
        out_shape = tuple(outputs[name].shape[1:])
        tree = tree_paths.get(params, name, {})
        own = tree.get("kernel") if isinstance(tree, dict) else None
        n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
        if own is not None:
            spatial = math.prod(out_shape[:-1]) if len(out_shape) > 1 else 1
            flops = int(spatial * math.prod(own.shape))
            flops_of[name] = flops
            kind = _kind(name, own.shape, first_conv)
            first_conv = False
        else:  # a block: the sum over the layers inside it
            flops = sum(f for n, f in flops_of.items() if n.startswith(name + "."))
            kind = "block"
        layers.append(LayerInfo(name, kind, out_shape, n_params, flops, norms.get(name) if own is not None else None))
    return tuple(layers)


def _kind(name: str, kernel_shape: tuple[int, ...], first_conv: bool) -> str:
    if len(kernel_shape) == 2:
        return "head"
    if first_conv:
        return "stem"
    if "downsample" in name:
        return "shortcut"
    kh, kw, per_group_in, _ = kernel_shape
    if per_group_in == 1 and kh * kw > 1:
        return "depthwise"
    return "pointwise" if kh * kw == 1 else "conv"


def input_size(model) -> int:
    """The square input side a model's layer analysis and scoring use: the classifier's crop, the
    detector's letterbox size, else the architecture's reference size."""
    preprocess = model.meta.get("preprocess", {})
    return preprocess.get("crop") or preprocess.get("imgsz") or models.get_architecture(model.arch).input_size


def total_flops(layers: list[LayerInfo]) -> int:
    return sum(layer.flops for layer in layers if layer.kind != "block")

"""Layer-importance criteria behind a registry: one score per layer and, where defined, one per
output channel and one per input channel (the consumer side of a channel group, which DepGraph-style
group importance adds up). A criterion is named ``name`` or ``name:variant`` (``grad_x_act:mean``)."""

import dataclasses
import zlib

import jax
import numpy as np

from xprune_jax import tree_paths
from xprune_jax.analysis import LayerInfo, kernels
from xprune_jax.errors import UserError


@dataclasses.dataclass
class ScoringInputs:
    layers: list[LayerInfo]
    params: dict
    statistics: dict | None = None  # summed gradient x activation statistics (attribution.statistics)
    weight_gradients: dict | None = None  # dL/dW summed over the calibration images, shaped like params
    n_images: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LayerScore:
    score: float | None  # None: undefined for this layer (bn_scale of a layer without BatchNorm)
    channel_scores: np.ndarray | None = None  # per output channel
    input_channel_scores: np.ndarray | None = None  # per input channel (conv/linear kernels, not depthwise)


class Criterion:
    name: str
    variants: tuple[str, ...]
    needs_data = False
    needs_weight_gradients = False

    def __init__(self, variant: str | None = None):
        self.variant = variant or self.variants[0]
        if self.variant not in self.variants:
            raise UserError(f"criterion {self.name} has no variant {self.variant!r}; choose one of: {', '.join(self.variants)}")

    @property
    def full_name(self) -> str:
        return self.name if self.variant == self.variants[0] else f"{self.name}:{self.variant}"

    def __call__(self, inputs: ScoringInputs) -> dict[str, LayerScore]:
        raise NotImplementedError


CRITERIA: dict[str, type[Criterion]] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(full_name: str) -> Criterion:
    name, _, variant = full_name.partition(":")
    if name not in CRITERIA:
        raise UserError(f"unknown criterion {name!r}; choose one of: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](variant or None)


@register
class GradXAct(Criterion):
    """The paper's attribution ``S_l = E_x[sum_i |a_i dL/da_i|]`` over the layer's output.

    Variants: ``sum`` (the paper's; it grows with H*W*C, so favours early, high-resolution
    layers), ``mean`` (per element), ``signed`` (``E_x |sum_i a_i dL/da_i|``, Molchanov's Taylor
    form). Channel scores reduce over images and positions only.
    """

    name = "grad_x_act"
    variants = ("sum", "mean", "signed")
    needs_data = True

    def __call__(self, inputs):
        scores = {}
        for layer in inputs.layers:
            s = inputs.statistics[layer.name]
            positions = int(np.prod(layer.shape[:-1])) if len(layer.shape) > 1 else 1
            if self.variant == "signed":
                score, channels = s["signed"], s["channel_signed"]
            elif self.variant == "mean":
                score, channels = s["abs"] / np.prod(layer.shape), s["channel_abs"] / positions
            else:
                score, channels = s["abs"], s["channel_abs"]
            scores[layer.name] = LayerScore(float(score) / inputs.n_images, np.asarray(channels) / inputs.n_images)
        return scores


def _per_channel(values: np.ndarray, layer: LayerInfo) -> tuple[np.ndarray, np.ndarray | None]:
    """Sums of per-weight ``values`` of a kernel (``(kh, kw, in, out)`` or ``(in, out)``) per output
    channel and per input channel (None for a depthwise conv: its inputs are its outputs' channels)."""
    outputs = values.reshape(-1, values.shape[-1]).sum(0)
    inputs = None if layer.kind == "depthwise" else np.moveaxis(values, -2, 0).reshape(values.shape[-2], -1).sum(1)
    return outputs, inputs


@register
class L1(Criterion):
    """The paper's baseline ``sum |W|`` over the layer's kernels (a block: all kernels inside it);
    variant ``mean`` divides by the number of weights. Channel scores: the L1 norm of each output
    channel's filter and of each input channel's slice (Torch-Pruning's magnitude importance with p=1)."""

    name = "l1"
    variants = ("sum", "mean")

    def __call__(self, inputs):
        scores = {}
        for layer in inputs.layers:
            layer_kernels = [np.asarray(k) for k in kernels(tree_paths.get(inputs.params, layer.name, {}))]
            total = sum(float(np.abs(k).sum()) for k in layer_kernels)
            size = sum(k.size for k in layer_kernels)
            channels = inputs_side = None
            if layer.kind != "block":
                (kernel,) = layer_kernels
                channels, inputs_side = _per_channel(np.abs(kernel), layer)
                if self.variant == "mean":
                    channels = channels / (kernel.size // kernel.shape[-1])
                    inputs_side = None if inputs_side is None else inputs_side / (kernel.size // kernel.shape[-2])
            scores[layer.name] = LayerScore(total / size if self.variant == "mean" else total, channels, inputs_side)
        return scores


@register
class L2(Criterion):
    """The L2 norm of the layer's kernels (a block: of all kernels inside it); per channel, of each
    output channel's filter and each input channel's slice (Torch-Pruning's magnitude importance, p=2)."""

    name = "l2"
    variants = ("norm",)

    def __call__(self, inputs):
        scores = {}
        for layer in inputs.layers:
            layer_kernels = [np.asarray(k, np.float64) for k in kernels(tree_paths.get(inputs.params, layer.name, {}))]
            total = float(np.sqrt(sum(np.square(k).sum() for k in layer_kernels)))
            channels = inputs_side = None
            if layer.kind != "block":
                channels, inputs_side = _per_channel(np.square(layer_kernels[0]), layer)
                channels, inputs_side = np.sqrt(channels), None if inputs_side is None else np.sqrt(inputs_side)
            scores[layer.name] = LayerScore(total, channels, inputs_side)
        return scores


@register
class TaylorWeight(Criterion):
    """First-order Taylor importance of the weights, ``sum |w * dL/dw|`` (Molchanov et al. 2019,
    Torch-Pruning's TaylorImportance), with dL/dw the objective's gradient summed over the calibration
    images: per output channel's filter, per input channel's slice, and over the layer (a block: over
    the kernels inside it). Divided by the number of images."""

    name = "taylor_weight"
    variants = ("sum",)
    needs_data = True
    needs_weight_gradients = True

    def __call__(self, inputs):
        scores = {}
        for layer in inputs.layers:
            weights, grads = (tree_paths.get(tree, layer.name, {}) for tree in (inputs.params, inputs.weight_gradients))
            products = [np.abs(np.asarray(w, np.float64) * np.asarray(g, np.float64)) / inputs.n_images
                        for w, g in zip(kernels(weights), kernels(grads))]
            channels = inputs_side = None
            if layer.kind != "block":
                channels, inputs_side = _per_channel(products[0], layer)
            scores[layer.name] = LayerScore(float(sum(p.sum() for p in products)), channels, inputs_side)
        return scores


@register
class BNScale(Criterion):
    """Network slimming's ``|gamma|``: per output channel, the absolute scale of the BatchNorm applied
    to the layer's output; per layer (or block), the mean over its BatchNorms. Undefined (None) for
    layers without one (a detector's FPN, a fused YOLOv8), which it therefore never prunes."""

    name = "bn_scale"
    variants = ("abs",)

    def __call__(self, inputs):
        scores = {}
        for layer in inputs.layers:
            if layer.kind == "block":
                gammas = [np.abs(np.asarray(leaf)) for path, leaf in
                          jax.tree_util.tree_flatten_with_path(tree_paths.get(inputs.params, layer.name, {}))[0]
                          if path[-1].key == "scale"]
                scores[layer.name] = LayerScore(float(np.concatenate(gammas).mean()) if gammas else None)
            elif layer.norm is None:
                scores[layer.name] = LayerScore(None)
            else:
                gamma = np.abs(np.asarray(tree_paths.get(inputs.params, layer.norm)["scale"], np.float64))
                scores[layer.name] = LayerScore(float(gamma.mean()), gamma)
        return scores


@register
class Random(Criterion):
    """Seeded uniform scores: the control every criterion must beat. A layer's scores depend only
    on the seed and its name, so they are reproducible and independent of the other layers."""

    name = "random"
    variants = ("uniform",)

    def __call__(self, inputs):
        scores = {}
        for layer in inputs.layers:
            rng = np.random.default_rng([inputs.seed, zlib.crc32(layer.name.encode())])
            scores[layer.name] = LayerScore(float(rng.uniform()), rng.uniform(size=layer.shape[-1]))
        return scores

"""Layer-importance criteria behind a registry: one score per layer and, where defined, one per
output channel. A criterion is named ``name`` or ``name:variant`` (``grad_x_act:mean``)."""

import dataclasses
import zlib

import numpy as np

from xprune_jax import tree_paths
from xprune_jax.analysis import LayerInfo, kernels
from xprune_jax.errors import UserError


@dataclasses.dataclass
class ScoringInputs:
    layers: list[LayerInfo]
    params: dict
    statistics: dict | None = None  # summed gradient x activation statistics (attribution.statistics)
    n_images: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LayerScore:
    score: float
    channel_scores: np.ndarray | None = None


class Criterion:
    name: str
    variants: tuple[str, ...]
    needs_data = False

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


@register
class L1(Criterion):
    """The paper's baseline ``sum |W|`` over the layer's kernels (a block: all kernels inside it);
    variant ``mean`` divides by the number of weights. Channel scores: per output channel."""

    name = "l1"
    variants = ("sum", "mean")

    def __call__(self, inputs):
        scores = {}
        for layer in inputs.layers:
            layer_kernels = [np.asarray(k) for k in kernels(tree_paths.get(inputs.params, layer.name, {}))]
            total = sum(float(np.abs(k).sum()) for k in layer_kernels)
            size = sum(k.size for k in layer_kernels)
            channels = None
            if layer.kind != "block":
                (kernel,) = layer_kernels
                channels = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)
                if self.variant == "mean":
                    channels = channels / (kernel.size // kernel.shape[-1])
            scores[layer.name] = LayerScore(total / size if self.variant == "mean" else total, channels)
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

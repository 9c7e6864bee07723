"""xprune_jax.prune on Flax modules the project has never seen: a small custom CNN (residual add, concat, split)
and Flax's own ResNet as its ImageNet example writes it. Each pruned model equals the original with the dropped
channels masked (zeroed where they are made), its FLOPs meet the budget, and its variables keep their layout."""

import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xprune_jax
from converters.reference import relative_error
from xprune_jax import tree_paths
from xprune_jax.errors import UserError
from xprune_jax.models.layers import select
from xprune_jax.pruning.trace import trace


class CustomCNN(nn.Module):
    """A residual add, a concat and a split (through layers.select, which pruning may move)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="stem_bn")(nn.Conv(16, (3, 3), strides=2, name="stem")(x)))
        y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(64, (3, 3), name="a")(x)))
        first, second = select(self, "first", y, np.s_[:32]), select(self, "second", y, np.s_[32:])
        second = second + nn.Conv(32, (3, 3), name="res")(nn.relu(nn.Conv(16, (1, 1), name="res_in")(second)))
        z = jnp.concatenate([first, second, nn.relu(nn.Conv(16, (3, 3), name="b")(second))], axis=-1)
        z = nn.relu(nn.Conv(48, (1, 1), name="fuse")(z))
        return nn.Dense(10, name="head")(z.mean((1, 2)))


# Flax's examples/imagenet/models.py (ResNetV1.5), as written there
class ResNetBlock(nn.Module):
    filters: int
    conv: Any
    norm: Any
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: Any
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: Any = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype, axis_name="batch")
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2 ** i, strides=strides, conv=conv, norm=norm, act=self.act)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, self.dtype)


ResNet18 = functools.partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)
X = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))


def _random(module, **kwargs) -> dict:
    """Random variables without compiling an init: kernels scaled by their fan-in, norms far from the identity (the
    example's zero-initialised scales would hide a wrong channel)."""
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(x.shape[:-1])), x.shape).astype(np.float32)
        return (rng.uniform(0.5, 1.5, x.shape) if name in ("scale", "var") else rng.normal(0, 0.1, x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), X))


def _masked(variables: dict, graph, keep: dict) -> dict:
    """The dropped channels zeroed where they are made: in every producer (kernel and bias) and every norm of the
    group (scale and shift)."""
    masked = jax.tree_util.tree_map(np.array, variables)
    groups = {g.name: g for g in graph.groups}
    for name, channels in keep.items():
        group, dropped = groups[name], np.setdiff1d(np.arange(groups[name].width), channels)
        for slot in group.norms + group.producers:
            layer = tree_paths.get(masked["params"], slot.layer)
            for key in ("scale", "kernel", "bias"):
                if key in layer:
                    layer[key][..., slot.positions(dropped)] = 0
    return masked


def _flops(graph, variables) -> int:
    return sum(np.prod(shape[:-1]) * np.size(tree_paths.get(variables["params"], name)["kernel"])
               for name, shape in graph.shapes.items())


@pytest.mark.parametrize("model, kwargs", [(CustomCNN(), {}), (ResNet18(num_classes=10, num_filters=16), {"train": False})],
                         ids=["custom_cnn", "flax_example_resnet18"])
def test_prune_any_flax_module(model, kwargs):
    variables = _random(model, **kwargs)
    pruned, pruned_variables, keep = xprune_jax.prune(model, variables, X, "l1", "flops=-40%", round_to=4, **kwargs)
    graph = trace(model, variables, X, **kwargs)
    def run(module, variables):
        return jax.jit(functools.partial(module.apply, **kwargs))(variables, X)

    want = np.asarray(run(model, _masked(variables, graph, keep)))
    assert relative_error(np.asarray(run(pruned, pruned_variables)), want) < 1e-5
    assert relative_error(want, np.asarray(run(model, variables))) > 1e-3  # the pruning changed the network
    assert _flops(trace(pruned, pruned_variables, X, **kwargs), pruned_variables) <= 0.6 * _flops(graph, variables)
    assert jax.tree_util.tree_structure(pruned_variables) == jax.tree_util.tree_structure(variables)
    assert len(keep) > 3


def test_prune_names_what_it_cannot_follow():
    """A model whose only prunable-looking channels reach an FFT: nothing to prune, and the error says so."""

    class Spectral(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(8, (3, 3), name="stem")(x)
            y = nn.Conv(16, (3, 3), name="conv")(y)
            return jnp.real(jnp.fft.fft(y, axis=-1)).mean()

    model = Spectral()
    variables = jax.eval_shape(model.init, jax.random.key(0), X)
    assert trace(model, variables, X).untraceable["conv"] == "fft"
    ones = jax.tree_util.tree_map(lambda x: np.ones(x.shape, x.dtype), variables)
    with pytest.raises(UserError, match="can't be met by shrink on Spectral"):
        xprune_jax.prune(model, ones, X, "l1", "flops=-30%")
    with pytest.raises(UserError, match="--protect names no layer or block of this Spectral: conv2; give"):
        xprune_jax.prune(model, ones, X, "l1", "flops=-30%", protect=["conv", "conv2"])


def _scores(variables, change):
    from xprune_jax.api import weight_scores

    scores = weight_scores(variables["params"], ["stem", "a", "res_in", "res", "b", "fuse", "head"], "l1")
    return change(scores)


def test_prune_reads_no_scores_of_protected_layers():
    """A score file may leave out what is kept whole (the stem, a protected layer): same channels kept."""
    variables = _random(CustomCNN())
    scores = _scores(variables, lambda s: s)
    _, _, want = xprune_jax.prune(CustomCNN(), variables, X, scores, "flops=-30%", protect=["b"])
    partial = {**scores, "layers": [e for e in scores["layers"] if e["name"] not in ("stem", "b")]}
    _, _, keep = xprune_jax.prune(CustomCNN(), variables, X, partial, "flops=-30%", protect=["b"])
    assert want and keep.keys() == want.keys() and all(np.array_equal(keep[n], want[n]) for n in want)


@pytest.mark.parametrize("options, message", [
    ({"scores": "l3"}, "unknown scores 'l3'"),
    ({"scores": {"bogus": 1}}, "scores must be a dict with a list of layers"),
    ({"scores": lambda s: {**s, "layers": [e for e in s["layers"] if e["name"] != "b"]}},
     "the scores lack 1 of the 6 layers whose channels are ranked: b; score every layer, or protect"),
    ({"scores": lambda s: {**s, "layers": [dict(e, channel_scores=[1.0]) if e["name"] == "b" else e for e in s["layers"]]}},
     "the scores give b 1 channel scores, but it has 16 channels"),
    ({"budget": "latency=-30%"}, "a latency budget is `xprune prune`'s"),
    ({"round_to": 0}, "--round_to=0 is invalid"),
    ({"floor": 1.5}, "--floor=1.5 is invalid"),
    ({"normalize": "median"}, "unknown --normalize 'median'"),
])
def test_prune_refuses_bad_scores_and_options(options, message):
    """Each with one clear error (they were a KeyError, a ZeroDivisionError, or accepted silently)."""
    variables = _random(CustomCNN())
    options = {"scores": "l1", "budget": "flops=-30%", **options}
    if callable(options["scores"]):
        options["scores"] = _scores(variables, options["scores"])
    with pytest.raises(UserError, match=re.escape(message)):
        xprune_jax.prune(CustomCNN(), variables, X, options.pop("scores"), options.pop("budget"), **options)

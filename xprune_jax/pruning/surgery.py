"""The surgery, written once for every model: removed units and kept channels turn ``(spec, variables)`` into a
new pair, pure. The spec changes by its :class:`~xprune_jax.models.layers.Edits` only (units removed, widths,
re-indexed selections); the variables lose the removed subtrees and are sliced once per layer."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax import models, tree_paths
from xprune_jax.pruning.trace import Graph, trace

TRACE_SIZE = 64  # groups don't depend on the input size: trace small (a multiple of every model's stride)


@functools.lru_cache(maxsize=64)
def graph_of(arch: str, spec) -> Graph:
    """The traced channel groups and units of an architecture's (hashable) spec."""
    x = jax.ShapeDtypeStruct((1, TRACE_SIZE, TRACE_SIZE, 3), jnp.float32)
    return trace(models.build(arch, spec), models.variable_shapes(arch, spec, TRACE_SIZE), x)


def _edited(spec, **changes):
    edits = spec.edits
    return dataclasses.replace(spec, edits=dataclasses.replace(edits, **{
        field: tuple(sorted({**dict(getattr(edits, field)), **dict(value)}.items())) for field, value in changes.items()}))


def without_units(spec, graph: Graph, names):
    """``spec`` with the units ``names`` removed, each as the tracer says it goes."""
    removal = {u.name: u.removal for u in graph.units}
    return _edited(spec, removed=[(name, removal[name]) for name in names])


def remove_units(arch: str, spec, variables: dict, graph: Graph, names) -> tuple[object, dict]:
    """The pair without the units ``names``: their subtrees go, and a dropped unit's concat slot goes from
    the layers that read it (its channels, kept by none)."""
    new_spec = without_units(spec, graph, names)
    kept = jax.tree_util.tree_map_with_path(lambda path, _: functools.reduce(lambda tree, k: tree[k.key], path, variables),
                                            models.variable_shapes(arch, new_spec))
    dropped = [u.name for u in graph.units if u.name in names and u.removal == "drop"]
    inside = lambda layer: any(layer == u or layer.startswith(u + ".") for u in dropped)  # noqa: E731
    slots = {g.name: [] for g in graph.groups if g.producers and all(inside(s.layer) for s in g.producers)}
    return shrink(new_spec, kept, graph, slots, skip=inside)


def shrink(spec, variables: dict, graph: Graph, keep: dict, skip=lambda layer: False, sliced=True) -> tuple[object, dict]:
    """The pair with each group ``keep`` names narrowed to its channels ``keep[name]``, all at once, layers
    that ``skip`` names untouched (``sliced=False``: the spec alone, what a planner measures)."""
    groups, dropped = {g.name: g for g in graph.groups}, collections.defaultdict(set)
    for name, channels in keep.items():  # (kind, layer) -> positions: "out" (kernel axis -1, bias), "in" (axis -2), "norm"
        gone = np.setdiff1d(np.arange(groups[name].width), np.asarray(channels, int))
        for kind, slots in (("out", groups[name].producers + groups[name].depthwise), ("in", groups[name].consumers),
                            ("norm", groups[name].norms)):
            for slot in (s for s in slots if not skip(s.layer)):
                dropped[kind, slot.layer].update(slot.positions(gone).tolist())
    gone = {r for name, channels in keep.items() for r in np.delete(graph.channels[name], np.asarray(channels, int)).tolist()}
    selections = []
    for name, (inputs, index) in graph.selections.items():  # re-indexed over the channels that stay
        alive = np.array([root not in gone for root in inputs.tolist()])
        if not alive.all():
            selections.append((name, tuple(int(i) for i in (np.cumsum(alive) - 1)[[i for i in index if alive[i]]])))
    params = variables["params"]
    widths = [(layer, np.shape(tree_paths.get(params, layer)["kernel"])[-1] - len(positions))
              for (kind, layer), positions in dropped.items() if kind == "out"]
    spec = _edited(spec, widths=widths, channels=selections)
    if not sliced:
        return spec, variables
    variables = jax.tree_util.tree_map(np.asarray, variables)  # new containers: arrays are replaced, never written
    for (kind, name), positions in dropped.items():
        index = sorted(positions)
        if kind == "norm":
            for tree in (tree_paths.get(variables["params"], name), tree_paths.get(variables.get("batch_stats", {}), name, {})):
                for key in tree:
                    tree[key] = np.delete(tree[key], index, axis=0)
            continue
        layer = tree_paths.get(variables["params"], name)
        for key in ("kernel", "bias") if kind == "out" else ("kernel",):
            if key in layer:
                layer[key] = np.delete(layer[key], index, axis=-2 if kind == "in" else -1)
    return spec, variables


def zero_layers(variables: dict, names) -> dict:
    """The paper's operation: zero the layers' weights and biases (the graph and its cost stay)."""
    out = jax.tree_util.tree_map(np.asarray, variables)
    for name in names:
        layer = tree_paths.get(out["params"], name)
        for key in ("kernel", "bias"):
            if key in layer:
                layer[key] = np.zeros_like(layer[key])
    return out

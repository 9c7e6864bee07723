"""The surgery, written once for every model: a plan's removed units and kept channels turn
``(spec, variables)`` into a new pair, pure. The spec changes only by its generic
:class:`~xprune_jax.models.layers.Edits` (units removed, layer widths, channel selections); the variables
are sliced along the channel axes the traced groups name, and the removed units' subtrees go."""

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


def _copy(variables: dict) -> dict:
    """New containers holding the same (host) arrays: surgery replaces arrays, it never writes into one."""
    return jax.tree_util.tree_map(np.asarray, variables)


def _edited(spec, **changes):
    edits = spec.edits
    return dataclasses.replace(spec, edits=dataclasses.replace(edits, **{
        field: tuple(sorted({**dict(getattr(edits, field)), **dict(value)}.items())) for field, value in changes.items()}))


def without_units(spec, graph: Graph, names) -> object:
    """``spec`` with the units ``names`` removed, each as the tracer says it goes."""
    removal = {u.name: u.removal for u in graph.units}
    return _edited(spec, removed=[(name, removal[name]) for name in names])


def remove_units(arch: str, spec, variables: dict, graph: Graph, names) -> tuple[object, dict]:
    """The pair without the units ``names``: their subtrees go, and a dropped unit's concat slot goes from
    the layers that read it (its output channels, kept by nobody)."""
    new_spec = without_units(spec, graph, names)
    expected = models.variable_shapes(arch, new_spec)

    def keep(tree, want):
        return {k: keep(v, want[k]) if isinstance(v, dict) else v for k, v in tree.items() if k in want}

    variables = keep(_copy(variables), expected)
    dropped = [u.name for u in graph.units if u.name in names and u.removal == "drop"]
    inside = lambda layer: any(layer == u or layer.startswith(u + ".") for u in dropped)  # noqa: E731
    slots = {g.name: g for g in graph.groups if g.producers and all(inside(s.layer) for s in g.producers)}
    return _apply(new_spec, variables, graph, {name: [] for name in slots}, skip=inside)


def shrink(spec, variables: dict, graph: Graph, keep: dict) -> tuple[object, dict]:
    """The pair with every group ``keep`` names narrowed to its channels ``keep[name]``, all at once."""
    return _apply(spec, _copy(variables), graph, keep)


def shrunk_spec(spec, params: dict, graph: Graph, keep: dict) -> object:
    """The spec :func:`shrink` gives, without touching variables (what a planner measures)."""
    return _edits(spec, params, graph, keep, _dropped(graph, keep))


def _dropped(graph: Graph, keep: dict, skip=lambda layer: False) -> dict:
    """(axis kind, layer) -> the positions the narrowed groups drop: "out" (producers, depthwise convs:
    kernel axis -1 and bias), "in" (consumers: kernel axis -2), "norm" (every vector of the layer)."""
    groups = {g.name: g for g in graph.groups}
    dropped = collections.defaultdict(set)
    for name, channels in keep.items():
        group = groups[name]
        gone = np.setdiff1d(np.arange(group.width), np.asarray(channels, int))
        for kind, slots in (("out", group.producers + group.depthwise), ("in", group.consumers), ("norm", group.norms)):
            for slot in slots:
                if not skip(slot.layer):
                    dropped[kind, slot.layer].update(slot.positions(gone).tolist())
    return dropped


def _edits(spec, params: dict, graph: Graph, keep: dict, dropped: dict):
    """The spec's edits for the narrowed groups: new output widths, and the channel selections re-indexed."""
    widths = [(layer, np.shape(tree_paths.get(params, layer)["kernel"])[-1] - len(positions))
              for (kind, layer), positions in dropped.items() if kind == "out"]
    gone = set()
    for name, channels in keep.items():
        roots = graph.channels[name]
        gone.update(roots[np.setdiff1d(np.arange(len(roots)), np.asarray(channels, int))].tolist())
    channels = []
    for name, (inputs, index) in graph.selections.items():
        alive = np.array([root not in gone for root in inputs.tolist()])
        if not alive.all():
            rank = np.cumsum(alive) - 1
            channels.append((name, tuple(int(rank[i]) for i in index if alive[i])))
    return _edited(spec, widths=widths, channels=channels)


def _apply(spec, variables: dict, graph: Graph, keep: dict, skip=lambda layer: False):
    dropped = _dropped(graph, keep, skip)
    params, stats = variables["params"], variables.get("batch_stats", {})
    new_spec = _edits(spec, params, graph, keep, dropped)

    def kept(size, positions):
        return np.setdiff1d(np.arange(size), np.fromiter(positions, int, len(positions)))

    for (kind, name), positions in dropped.items():
        if kind == "norm":
            for tree in (tree_paths.get(params, name), tree_paths.get(stats, name, {})):
                for key in tree:
                    tree[key] = tree[key][kept(tree[key].shape[0], positions)]
            continue
        layer = tree_paths.get(params, name)
        if kind == "out":
            index = kept(layer["kernel"].shape[-1], positions)
            layer["kernel"] = layer["kernel"][..., index]
            if "bias" in layer:
                layer["bias"] = layer["bias"][index]
        else:  # input axis -2: (kh, kw, in, out) convs, (in, out) linear layers
            layer["kernel"] = layer["kernel"][..., kept(layer["kernel"].shape[-2], positions), :]
    return new_spec, variables


def zero_layers(variables: dict, names) -> dict:
    """The paper's operation: zero the layers' weights and biases (the graph and its cost stay)."""
    out = _copy(variables)
    for name in names:
        layer = tree_paths.get(out["params"], name)
        for key in ("kernel", "bias"):
            if key in layer:
                layer[key] = np.zeros_like(layer[key])
    return out

"""Rewrites of the variables that go with a rewritten spec. Written once for every architecture:
they only address subtrees by torch path and slice arrays along channel axes."""

import jax
import numpy as np

from xprune_jax import models, tree_paths
from xprune_jax.pruning.rules import ChannelGroup


def _copy(variables: dict) -> dict:
    """New containers holding the same (host) arrays: surgery replaces arrays, it never writes into one."""
    return jax.tree_util.tree_map(np.asarray, variables)


def restrict_to_spec(variables: dict, arch: str, spec) -> dict:
    """Keep exactly the variables that ``spec`` has (after blocks were removed from it)."""
    expected = models.variable_shapes(arch, spec)

    def keep(tree, want):
        return {k: keep(v, want[k]) if isinstance(v, dict) else v for k, v in tree.items() if k in want}

    kept = keep(_copy(variables), expected)
    assert jax.tree_util.tree_structure(kept) == jax.tree_util.tree_structure(expected)
    return kept


def _kept(size: int, slots, width: int, keep: np.ndarray) -> np.ndarray:
    """Indices along an axis of ``size`` that stay when each slot keeps only the channels ``keep`` of
    the group's ``width``."""
    mask = np.ones(size, bool)
    for slot in slots:
        mask[slot.positions(np.arange(width))] = False
        mask[slot.positions(keep)] = True
    return np.flatnonzero(mask)


def shrink_group(variables: dict, group: ChannelGroup, keep: np.ndarray) -> dict:
    """Keep only the channels ``keep`` (indices into the group's width) of ``group`` in every layer
    that produces, carries or reads them, at each slot's positions (those of the current variables)."""
    out = _copy(variables)
    params, stats = out["params"], out.get("batch_stats", {})
    keep = np.asarray(keep, int)

    def by_layer(slots):
        layers = {}
        for slot in slots:
            layers.setdefault(slot.layer, []).append(slot)
        return layers.items()

    for name, slots in by_layer(group.producers + group.depthwise):
        layer = tree_paths.get(params, name)
        index = _kept(layer["kernel"].shape[-1], slots, group.width, keep)
        layer["kernel"] = layer["kernel"][..., index]
        if "bias" in layer:
            layer["bias"] = layer["bias"][index]
    for name, slots in by_layer(group.norms):
        for tree in (tree_paths.get(params, name), tree_paths.get(stats, name)):
            for key in tree:
                tree[key] = tree[key][_kept(tree[key].shape[0], slots, group.width, keep)]
    for name, slots in by_layer(group.consumers):  # input axis -2: (kh, kw, in, out) convs, (in, out) linear layers
        layer = tree_paths.get(params, name)
        layer["kernel"] = layer["kernel"][..., _kept(layer["kernel"].shape[-2], slots, group.width, keep), :]
    return out


def zero_layers(variables: dict, names) -> dict:
    """The paper's operation: zero the layers' weights and biases (the graph and its cost stay)."""
    out = _copy(variables)
    for name in names:
        layer = tree_paths.get(out["params"], name)
        for key in ("kernel", "bias"):
            if key in layer:
                layer[key] = np.zeros_like(layer[key])
    return out

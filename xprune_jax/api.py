"""``xprune_jax.prune``: pruning a Flax module the project has never seen, from its traced channel groups."""

import dataclasses
import math
import types

import jax
import numpy as np

from xprune_jax import tree_paths
from xprune_jax.errors import UserError
from xprune_jax.models.layers import Edited, Edits
from xprune_jax.pruning import surgery
from xprune_jax.pruning.plan import (allocate, blocked, check_allocation, check_protect, group_importance, normalized,
                                     parse_budget)
from xprune_jax.pruning.trace import trace


def prune(module, variables: dict, example_input, scores="l1", budget: str = "flops=-30%", *, protect=(),
          round_to: int = 8, floor: float = 0.125, normalize: str = "mean", **apply_kwargs):
    """Prune the channels of any Flax module under ``budget`` (``flops=-N%`` or ``params=-N%``), allocated globally:
    groups traced from ``module.apply(variables, example_input, **apply_kwargs)``, ranked by ``scores`` (``"l1"``,
    ``"l2"`` of the weights, or a score file of ``xprune score``'s form), its first layer, heads and ``protect`` kept
    whole. Returns the module under :class:`~xprune_jax.models.layers.Edited` (called as the module is), its
    sliced variables, and the channels each narrowed group keeps."""
    graph = trace(module, variables, example_input, **apply_kwargs)
    check_protect(graph.shapes, protect, type(module).__name__)
    check_allocation(round_to, floor, normalize)
    kind, target = parse_budget(budget)
    if kind == "layers":
        raise UserError("prune allocates channels; give it a flops=-N% or params=-N% budget")
    params = variables["params"]
    by_layer = {name: types.SimpleNamespace(shape=shape) for name, shape in graph.shapes.items()}
    protected = [next(iter(graph.shapes)), *graph.heads, *protect]
    groups = {g.name: g for g in graph.groups if not blocked(g, protected, set(graph.heads))}
    scores = _checked(scores, graph, groups.values()) if isinstance(scores, dict) else \
        weight_scores(params, list(graph.shapes), scores)
    importance = {n: normalized(v, normalize) for n, g in groups.items()
                  if (v := group_importance(scores, g, by_layer)) is not None}
    total = sum(math.prod(by_layer[n].shape[:-1]) * np.size(tree_paths.get(params, n)["kernel"]) for n in by_layer) \
        if kind == "flops" else sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    keep = allocate({n: groups[n] for n in importance}, importance, by_layer, params, kind, target, total, 0, round_to,
                    floor, type(module).__name__)
    spec, variables = surgery.shrink(_Unedited(), variables, graph, keep)
    return Edited(module, spec.edits), variables, keep


@dataclasses.dataclass(frozen=True)
class _Unedited:
    edits: Edits = Edits()


def _checked(scores: dict, graph, groups) -> dict:
    """A score file must score every layer of the channel groups ``groups`` (those that may be pruned; a
    protected layer's scores are never read), and give each layer as many ``channel_scores`` as it has channels."""
    entries = scores.get("layers")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise UserError("scores must be a dict with a list of layers, each with a name and channel_scores (the form "
                        "`xprune score` writes), or one of l1, l2")
    by_name = {e["name"]: e for e in entries}
    ranked = list(dict.fromkeys(s.layer for g in groups for s in g.producers + g.depthwise + g.consumers))
    missing = [n for n in ranked if n not in by_name]
    if missing:
        raise UserError(f"the scores lack {len(missing)} of the {len(ranked)} layers whose channels are ranked: "
                        f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; score every layer, or protect "
                        "those it lacks")
    for name, shape in graph.shapes.items():
        values = by_name.get(name, {}).get("channel_scores")
        if values is not None and len(values) != shape[-1]:
            raise UserError(f"the scores give {name} {len(values)} channel scores, but it has {shape[-1]} channels")
    return scores


def weight_scores(params: dict, layers: list[str], criterion: str) -> dict:
    """A score file of weight magnitudes (``"l1"`` or ``"l2"``): each layer's output and input channels."""
    if criterion not in ("l1", "l2"):
        raise UserError(f"unknown scores {criterion!r}: give l1, l2 or a score file (a dict)")

    def norm(kernel, axis):
        other = tuple(a for a in range(kernel.ndim) if a != axis % kernel.ndim)
        return np.abs(kernel).sum(other) if criterion == "l1" else np.sqrt(np.square(kernel).sum(other))

    kernels = {name: np.asarray(tree_paths.get(params, name)["kernel"]) for name in layers}
    return {"criterion": criterion, "layers": [{"name": n, "channel_scores": norm(k, -1).tolist(),
                                                "input_channel_scores": norm(k, -2).tolist()} for n, k in kernels.items()]}

"""Plans: which layers a score file's criterion ranks lowest, chosen under a budget, and the new
(spec, variables) pair they produce.

Budgets: ``layers=5%`` (the bottom fraction of the eligible units: the paper's global 5%),
``flops=-30%`` or ``params=-30%`` (a reduction target). Modes: ``zero`` (the paper's; no speed-up),
``remove`` (depth pruning), ``shrink`` (width pruning: channels allocated globally by default, or
whole groups layer-wise as in the paper), and ``remove+shrink`` (both in one plan).
"""

import collections
import dataclasses
import functools
import heapq
import math
import numbers
import re

import jax
import numpy as np

from xprune_jax import analysis, tree_paths
from xprune_jax.checkpoint import Model, model_fingerprint
from xprune_jax.errors import UserError
from xprune_jax.pruning import surgery
from xprune_jax.pruning.surgery import graph_of

MODES = ("zero", "remove", "shrink", "remove+shrink")
ALLOCATIONS = ("global", "layer")
NORMALIZATIONS = ("mean", "max", "lamp", "none")


@dataclasses.dataclass
class Plan:
    mode: str
    budget: str
    criterion: str
    selected: list[str]  # zero: layers; remove: blocks/units; shrink: channel groups (by producing conv)
    keep_channels: dict[str, list[int]]  # shrink: the channels each selected group keeps
    protected: list[str]
    flops_before: int
    flops_after: int  # FLOPs of the network that runs (zeroed layers still cost their FLOPs)
    params_before: int
    params_after: int  # parameters stored (zeroed ones included)
    allocation: str = "layer"  # shrink: "global" (channels ranked across groups) or "layer" (the paper's: whole groups)
    normalize: str | None = None  # global allocation: how channel importances were made comparable across groups
    removed: list[str] = dataclasses.field(default_factory=list)  # remove+shrink: the units removed before shrinking
    latency_price: float = 0.0  # global allocation: importances divided by (a channel's measured seconds per FLOP, relative)^this
    selection: dict | None = None  # --mode=auto: every candidate allocation and its calibration loss (pruning.select)


def parse_budget(text: str) -> tuple[str, float]:
    """``layers=5%`` -> ("layers", 0.05); ``flops=-30%``/``params=-30%`` -> ("flops"/"params", 0.3). A
    reduction takes its minus (``flops=30%`` would read as growth); a fraction of layers takes none."""
    compact = text.replace(" ", "") if isinstance(text, str) else ""
    match = re.fullmatch(r"(layers|flops|params)=(-?)(\d+(?:\.\d+)?)%", compact)
    if match and match.group(1) != "layers" and not match.group(2):
        raise UserError(f"bad --budget {text!r}: a {match.group(1)} reduction takes a minus: "
                        f"{match.group(1)}=-{match.group(3)}%")
    if match and match.group(1) == "layers" and match.group(2):
        raise UserError(f"bad --budget {text!r}: layers=N% is the fraction of units pruned, without a minus: "
                        f"layers={match.group(3)}%")
    if not match and compact.startswith("latency="):
        raise UserError(f"budget {text!r}: a latency budget is `xprune prune`'s (it times the pruned candidates on "
                        "this backend); give flops=-N% or params=-N% here")
    if not match or not 0 < float(match.group(3)) < 100:
        raise UserError(f"bad --budget {text!r}: use layers=5%, flops=-30% or params=-30% (between 0 and 100%; "
                        "`xprune prune` also takes latency=-30%)")
    return match.group(1), float(match.group(3)) / 100


def check_allocation(round_to: int, floor: float, normalize: str) -> None:
    """The channel allocation's options, as ``xprune prune`` checks its flags."""
    if normalize not in NORMALIZATIONS:
        raise UserError(f"unknown --normalize {normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    if not isinstance(round_to, numbers.Integral) or isinstance(round_to, bool) or round_to < 1:
        raise UserError(f"--round_to={round_to!r} is invalid: use an integer >= 1")
    if not 0 < floor < 1:
        raise UserError(f"--floor={floor!r} is invalid: use a fraction between 0 and 1, e.g. 0.125")


def make_plan(model: Model, scores: dict, mode: str, budget: str, protect=(), *, shrink_ratio: float = 0.5,
              round_to: int = 8, allocation: str = "global", normalize: str = "mean", floor: float = 0.125,
              remove_share: float = 0.5, latency_price: float = 0.0, layer_latency: dict | None = None) -> Plan:
    """Rank the eligible units by the score file's criterion (lowest first) and take them under the budget.

    ``shrink`` allocates channels ``globally`` (every channel of every eligible group ranked by its
    group's importance, ``normalize``-d per group, removed lowest first until the budget is met, each
    group keeping at least ``floor`` of its width and a multiple of ``round_to``), or ``layer``-wise as
    the paper does (groups ranked by their producers' layer scores, each narrowed by ``shrink_ratio``).
    ``remove+shrink`` removes units until ``remove_share`` of the budget is met, then shrinks globally.
    ``latency_price`` N > 0 divides each group's importances by (the seconds per FLOP one of its channels
    costs by ``layer_latency``, :func:`~xprune_jax.pruning.latency.layer_latency`'s table, over the model's)^N
    (:func:`latency_priced`): the allocation then prefers the channels slow for their FLOPs on the backend.
    """
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of: {', '.join(MODES)}")
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown --allocation {allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
    check_allocation(round_to, floor, normalize)
    kind, target = parse_budget(budget)
    if latency_price < 0:
        raise UserError(f"--latency_price={latency_price} is invalid: use 0 (importance alone) or a positive exponent, e.g. 0.25")
    if latency_price and (mode not in ("shrink", "remove+shrink") or allocation != "global"):
        raise UserError("--latency_price prices channels in the global allocation; use --mode=shrink or remove+shrink "
                        "with --allocation=global, or drop it")
    if latency_price and not layer_latency:
        raise UserError("--latency_price needs the layer latency table (measured by `xprune prune`, or --layer_latency=FILE)")
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))
    check_protect((l.name for l in layers), protect, model.arch)
    score = _scores_by_layer(scores, layers, model)
    heads = set(graph_of(model.arch, model.spec).heads)
    protected = sorted({l.name for l in layers if l.kind == "stem"} | heads | set(protect))
    flops_before = analysis.total_flops(layers)
    params_before = _count_params(model, model.spec)
    context = _Context(model, scores, score, layers, heads, protected, flops_before, params_before)

    if mode == "zero":
        if kind != "layers":
            raise UserError("zero mode keeps every FLOP and parameter; use --budget=layers=N% (the paper: layers=5%)")
        eligible = [l.name for l in layers if l.kind != "block" and score[l.name] is not None
                    and not _touches(l.name, protected)]
        chosen = sorted(eligible, key=lambda n: (score[n], n))[: max(1, round(target * len(eligible)))]
        return Plan(mode, budget, scores["criterion"], chosen, {}, protected, flops_before, flops_before,
                    params_before, params_before)
    if mode == "remove":
        chosen, spec = _plan_remove(context, kind, target)
        return context.plan(mode, budget, chosen, {}, spec)
    if mode == "shrink" and allocation == "layer":
        chosen, keep, spec = _plan_shrink_layerwise(context, kind, target, shrink_ratio, round_to)
        return context.plan(mode, budget, chosen, keep, spec, allocation="layer")
    if kind == "layers":
        raise UserError("a layers=N% budget takes whole units, which global allocation does not do; give shrink a "
                        "flops=-N% or params=-N% budget, or use --allocation=layer (the paper's protocol)")
    removed, spec, start = [], model.spec, context
    if mode == "remove+shrink":
        removed, spec = _plan_remove(context, kind, target * remove_share, partial=True)
        pruned = _without_units(model, removed)
        start = _Context(pruned, scores, score, analysis.describe_layers(model.arch, spec, analysis.input_size(model)),
                         heads, protected, flops_before, params_before)
    prices = (latency_price, layer_latency["layers"]) if latency_price else None
    chosen, keep, spec = _plan_shrink_global(start, kind, target, round_to, normalize, floor, prices)
    return context.plan(mode, budget, chosen, keep, spec, allocation="global", normalize=normalize, removed=removed,
                        latency_price=float(latency_price))


@dataclasses.dataclass
class _Context:
    """What every planner reads: the model, its scores and layers, what is protected, and its costs
    before pruning (the budget's reference, also after a removal)."""

    model: Model
    scores: dict
    score: dict
    layers: list
    heads: set
    protected: list
    flops_before: int
    params_before: int

    def plan(self, mode, budget, chosen, keep, spec, **fields) -> Plan:
        after = analysis.total_flops(analysis.describe_layers(self.model.arch, spec, analysis.input_size(self.model)))
        return Plan(mode, budget, self.scores["criterion"], chosen, keep, self.protected, self.flops_before, after,
                    self.params_before, _count_params(self.model, spec), **fields)


def _plan_remove(c: _Context, kind: str, target: float, partial: bool = False) -> tuple[list[str], object]:
    """Removable units, lowest summed layer score first, as many as the budget needs (``partial``: as
    many as exist when all of them fall short)."""
    graph = graph_of(c.model.arch, c.model.spec)
    units = [u.name for u in graph.units if not _touches(u.name, c.protected)]
    members = {u: [c.score[l.name] for l in c.layers if l.kind != "block" and l.name.startswith(u + ".")] for u in units}
    units = [u for u in units if any(s is not None for s in members[u])]
    unit_score = {u: sum(s for s in members[u] if s is not None) for u in units}
    ranked = sorted(units, key=lambda u: (unit_score[u], u))
    costs = functools.cache(lambda u: _unit_costs(c, graph, u))  # traced only for the units the plan reaches

    def savings(chosen):  # removals don't interact: their savings add up
        return tuple(sum(costs(u)[i] for u in chosen) for i in (0, 1))

    chosen = _take(ranked, kind, target, savings, c.flops_before, c.params_before, "remove", c.model.arch, partial)
    return chosen, surgery.without_units(c.model.spec, graph, chosen)


def _without_units(model: Model, units) -> Model:
    spec, variables = surgery.remove_units(model.arch, model.spec, model.variables, graph_of(model.arch, model.spec), units)
    return Model(model.arch, spec, variables, model.meta)


def _eligible_groups(c: _Context) -> dict:
    return {g.name: g for g in graph_of(c.model.arch, c.model.spec).groups if not blocked(g, c.protected, c.heads)}


def _plan_shrink_layerwise(c: _Context, kind: str, target: float, shrink_ratio: float, round_to: int):
    """The paper's protocol: groups ranked by their producers' mean layer score, each narrowed by
    ``shrink_ratio`` to its best channels (by the producers' channel scores)."""
    by_layer = {l.name: l for l in c.layers}
    groups = {n: g for n, g in _eligible_groups(c).items() if all(c.score[p.layer] is not None for p in g.producers)}
    order = {n: np.argsort(-_group_channel_scores(c.scores, g, by_layer), kind="stable") for n, g in groups.items()}

    def top(name, n_keep):  # the group's n_keep best channels
        return sorted(int(i) for i in order[name][:n_keep])

    keep = {n: top(n, min(g.width - 1, max(round_to, math.ceil((1 - shrink_ratio) * g.width / round_to) * round_to)))
            for n, g in groups.items()}
    groups = {n: g for n, g in groups.items() if 0 < len(keep[n]) < g.width}
    group_score = {n: float(np.mean([c.score[p.layer] for p in g.producers])) for n, g in groups.items()}
    ranked = sorted(groups, key=lambda n: (group_score[n], n))
    params = c.model.variables["params"]

    def savings(chosen):
        return _shrink_savings([groups[n] for n in chosen], keep, by_layer, params)

    chosen = _take(ranked, kind, target, savings, c.flops_before, c.params_before, "shrink", c.model.arch)
    if kind != "layers":  # the last group narrows only as far as the budget needs (a big one overshoots)
        last, index = chosen[-1], 0 if kind == "flops" else 1
        need = target * (c.flops_before if kind == "flops" else c.params_before)
        for n_keep in range(len(keep[last]) + round_to, groups[last].width, round_to):
            wider = {**keep, last: top(last, n_keep)}
            if _shrink_savings([groups[n] for n in chosen], wider, by_layer, params)[index] < need:
                break
            keep = wider
    keep = {n: keep[n] for n in chosen}
    graph = graph_of(c.model.arch, c.model.spec)
    return chosen, keep, surgery.shrink(c.model.spec, c.model.variables, graph, keep, sliced=False)[0]


def _plan_shrink_global(c: _Context, kind: str, target: float, round_to: int, normalize: str, floor: float,
                        prices: tuple[float, dict] | None = None):
    """Global channel allocation over the eligible groups of the model (see :func:`allocate`), the
    importances priced by ``(exponent, layer latency)`` where given (:func:`latency_priced`)."""
    by_layer = {l.name: l for l in c.layers}
    groups, importance = {}, {}
    for name, group in _eligible_groups(c).items():
        values = group_importance(c.scores, group, by_layer)
        if values is not None:
            groups[name], importance[name] = group, normalized(values, normalize)
    if prices:
        importance = latency_priced(groups, importance, *prices, by_layer, c.model.variables["params"])
    total = c.flops_before if kind == "flops" else c.params_before
    already = total - (analysis.total_flops(c.layers) if kind == "flops" else _count_params(c.model, c.model.spec))
    keep = allocate(groups, importance, by_layer, c.model.variables["params"], kind, target, total, already, round_to,
                    floor, c.model.arch)
    graph = graph_of(c.model.arch, c.model.spec)
    return list(keep), keep, surgery.shrink(c.model.spec, c.model.variables, graph, keep, sliced=False)[0]


def allocate(groups: dict, importance: dict, by_layer: dict, params: dict, kind: str, target: float, total: int,
             already: int, round_to: int, floor: float, what: str) -> dict[str, list[int]]:
    """The channels each narrowed group keeps: a step takes a group's next lowest channels (by ``importance``) down
    to the next multiple of ``round_to`` (not below its ``floor``), steps across all groups in order of the highest
    importance they remove, until the exact savings (``already`` saved before) meet ``target`` of ``total``."""
    order = {n: np.argsort(importance[n], kind="stable") for n in groups}  # lowest first
    minimum = {n: max(round_to, math.ceil(floor * g.width / round_to) * round_to) for n, g in groups.items()}
    kept = {n: g.width for n, g in groups.items()}

    def next_step(name):
        width = kept[name]
        smaller = (width - 1) // round_to * round_to
        if smaller < minimum[name]:
            return None
        dropped = groups[name].width - smaller
        return float(importance[name][order[name][dropped - 1]]), name, smaller

    heap = [step for step in map(next_step, groups) if step is not None]
    heapq.heapify(heap)
    savings = ShrinkSavings(by_layer, params)
    index = 0 if kind == "flops" else 1
    while already + savings.totals()[index] < target * total and heap:
        _, name, smaller = heapq.heappop(heap)
        savings.set(groups[name], order[name][: groups[name].width - smaller])
        if savings.starves(groups[name]):  # a reader of scattered channels (a ShuffleNetV2 branch) would read none
            savings.set(groups[name], order[name][: groups[name].width - kept[name]])
            continue  # the group shrinks no further: other groups' steps only take more of that reader's inputs
        kept[name] = smaller
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, step)
    saved = already + savings.totals()[index]
    if saved < target * total:
        raise UserError(f"budget {kind}=-{target:.0%} can't be met by shrink on {what}: every eligible "
                        f"channel group at its floor ({floor:.1%} of its width) cuts {saved / total:.1%}; lower the "
                        "budget or the floor (--floor), or use --mode=remove+shrink")
    return {n: sorted(int(i) for i in order[n][groups[n].width - kept[n]:]) for n in groups if kept[n] < groups[n].width}


def latency_priced(groups: dict, importance: dict, exponent: float, layers: dict, by_layer: dict, params: dict) -> dict:
    """Each group's importances divided by (the seconds per FLOP one of its channels costs / the model's)^``exponent``.
    A channel's seconds per FLOP: that of each layer it narrows (its ``seconds`` in ``layers``, a layer latency
    table's, over its FLOPs), weighted by the FLOPs removing the channel saves there, as the allocation counts
    them. Where the backend's time follows FLOPs the price is 1 and the criterion alone decides; a channel
    of layers slow for their FLOPs (bound by memory, not compute) goes sooner. A layer's whole time is
    measured, not the difference a narrower one makes, so two tables agree on the prices."""
    missing = sorted({s.layer for g in groups.values() for s in g.producers + g.depthwise + g.consumers} - set(layers))
    if missing:
        raise UserError(f"the layer latency table has no layer {missing[0]!r} of this model; measure it again (drop --layer_latency)")
    per_flop = {name: layers[name]["seconds"] / by_layer[name].flops for name in layers
                if name in by_layer and by_layer[name].flops > 0}
    if not per_flop:
        return importance
    mean = sum(layers[n]["seconds"] for n in per_flop) / sum(by_layer[n].flops for n in per_flop)
    priced = {}
    for n, g in groups.items():
        one = ShrinkSavings(by_layer, params)
        one.set(g, [0])
        saved = {layer: flops for layer, (flops, _) in one.lost.items() if flops > 0 and layer in per_flop}
        price = sum(per_flop[layer] * f for layer, f in saved.items()) / sum(saved.values()) if saved else mean
        priced[n] = importance[n] / (price / mean) ** exponent
    return priced


def normalized(values: np.ndarray, how: str) -> np.ndarray:
    """A group's channel importances made comparable across groups: divided by their ``mean`` or
    ``max``, ``lamp`` (each divided by the sum of those not smaller, LAMP's score), or ``none``."""
    values = np.asarray(values, float)
    if how == "none":
        return values
    if how == "lamp":
        order = np.argsort(values, kind="stable")
        tail = np.cumsum(values[order][::-1])[::-1]
        out = np.empty_like(values)
        out[order] = values[order] / np.maximum(tail, 1e-300)
        return out
    scale = values.mean() if how == "mean" else values.max()
    return values / scale if scale > 0 else np.zeros_like(values)


def _take(ranked, kind, target, savings, flops_before, params_before, mode, arch, partial=False) -> list[str]:
    """The lowest-ranked units, as many as the budget needs; ``savings(units) -> (flops, params)``.
    ``partial``: all of them when even all fall short, instead of an error."""
    if kind == "layers":
        return ranked[: max(1, round(target * len(ranked)))]
    total, index = (flops_before, 0) if kind == "flops" else (params_before, 1)
    chosen = []
    for unit in ranked:
        if savings(chosen)[index] >= target * total:
            break
        chosen.append(unit)
    saved = savings(chosen)[index]
    if saved < target * total and not partial:
        raise UserError(f"budget {kind}=-{target:.0%} can't be met by {mode} on {arch}: all {len(ranked)} eligible "
                        f"units together cut {saved / total:.1%}; lower the budget or use another mode "
                        "(remove+shrink reaches further)")
    return chosen


def _count_params(model: Model, spec) -> int:
    """Parameters of ``spec``, from the trace that describes its layers at the model's input size."""
    return analysis.count_params(model.arch, spec, analysis.input_size(model))


def check_protect(layer_names, protect, arch: str) -> None:
    """A protected name must be a layer or block of the model (a module path or its prefix): a typo would
    otherwise protect nothing, silently."""
    names = list(layer_names)
    unknown = [p for p in protect if not any(n == p or n.startswith(p + ".") for n in names)]
    if unknown:
        blocks = list(dict.fromkeys(".".join(n.split(".")[:2]) for n in names))  # in the model's order
        raise UserError(f"--protect names no layer or block of this {arch}: {', '.join(unknown)}; give torch module "
                        f"paths or their prefixes, e.g. {', '.join(blocks[:4])}")


def _touches(name: str, protected) -> bool:
    return any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in protected)


def blocked(group, protected, heads) -> bool:
    """Whether ``group`` touches a protected layer. A head (a classifier's fc, a detector's predictors)
    keeps its outputs but may read fewer inputs, unless something else protects it (``--protect``)."""
    others = [p for p in protected if p not in heads]
    return any(_touches(s.layer, protected) for s in group.producers + group.norms + group.depthwise) or \
        any(_touches(s.layer, others if s.layer in heads else protected) for s in group.consumers)


def _unit_costs(c: _Context, graph, unit: str) -> tuple[int, int]:
    """FLOPs and parameters that removing ``unit`` alone saves; removals of different units add up. A unit
    that goes as the identity changes no other layer's shape, so its own layers and parameters are what it
    saves; one that is dropped is counted on the spec without it (:func:`_traced_unit_costs`)."""
    if next(u.removal for u in graph.units if u.name == unit) != "identity":
        return _traced_unit_costs(c, graph, unit)
    inside = lambda name: name == unit or name.startswith(unit + ".")  # noqa: E731
    params = jax.tree_util.tree_leaves(tree_paths.get(c.model.variables["params"], unit))
    return (sum(l.flops for l in c.layers if l.kind != "block" and inside(l.name)),
            sum(math.prod(np.shape(p)) for p in params))


def _traced_unit_costs(c: _Context, graph, unit: str) -> tuple[int, int]:
    """:func:`_unit_costs` counted on the spec without ``unit`` (what goes with it, like a YOLOv8 neck
    C2f's concat slot, included): one abstract trace of the model per unit."""
    arch, spec, size = c.model.arch, c.model.spec, analysis.input_size(c.model)
    without = surgery.without_units(spec, graph, [unit])
    return (analysis.total_flops(analysis.describe_layers(arch, spec, size)) -
            analysis.total_flops(analysis.describe_layers(arch, without, size)),
            _count_params(c.model, spec) - _count_params(c.model, without))


class ShrinkSavings:
    """FLOPs and parameters saved by narrowing groups, exactly as the analysis counts them in the
    narrowed spec: every conv loses the output channels its producer and depthwise slots drop (kernel
    and bias) and the input channels its consumer slots drop, summed over the groups that share it;
    each BN loses two parameters a dropped channel. Updated one group at a time (:meth:`set`), so a
    global allocation can take thousands of small steps."""

    def __init__(self, by_layer: dict, params: dict):
        self.by_layer, self.params = by_layer, params
        self.dropped_out, self.dropped_in = collections.Counter(), collections.Counter()
        self.groups, self.lost, self.bn_params = {}, {}, 0

    def set(self, group, dropped) -> None:
        """``group`` drops ``dropped`` (indices into its width), replacing what it dropped before."""
        before = self.groups.get(group.name, ())
        self.groups[group.name] = dropped = np.asarray(dropped, int)
        touched = set()
        for channels, sign in ((before, -1), (dropped, 1)):
            channels = np.asarray(channels, int)
            for slot in group.producers + group.depthwise:
                self.dropped_out[slot.layer] += sign * len(slot.positions(channels))
                touched.add(slot.layer)
            for slot in group.consumers:
                self.dropped_in[slot.layer] += sign * len(slot.positions(channels))
                touched.add(slot.layer)
            self.bn_params += sign * 2 * sum(len(slot.positions(channels)) for slot in group.norms)
        for name in touched:
            layer = tree_paths.get(self.params, name)
            *window, per_group_in, out = np.shape(layer["kernel"])  # a conv's (kh, kw), a linear layer's ()
            d_in, d_out = self.dropped_in[name], self.dropped_out[name]
            lost = math.prod(window) * (per_group_in * out - (per_group_in - d_in) * (out - d_out))
            self.lost[name] = (math.prod(self.by_layer[name].shape[:-1]) * lost,
                               lost + (d_out if "bias" in layer else 0))

    def starves(self, group) -> bool:
        """Whether a layer that reads ``group``'s channels now reads no input channel at all."""
        for slot in group.consumers:
            *_, per_group_in, _ = np.shape(tree_paths.get(self.params, slot.layer)["kernel"])
            if self.dropped_in[slot.layer] >= per_group_in:
                return True
        return False

    def totals(self) -> tuple[int, int]:
        return (sum(f for f, _ in self.lost.values()),
                sum(p for _, p in self.lost.values()) + self.bn_params)


def _shrink_savings(groups, keep: dict, by_layer, params: dict) -> tuple[int, int]:
    """FLOPs and parameters saved by narrowing ``groups`` together to the channels ``keep``."""
    savings = ShrinkSavings(by_layer, params)
    for g in groups:
        savings.set(g, np.setdiff1d(np.arange(g.width), keep[g.name]))
    return savings.totals()


def slot_values(values, slot, width: int) -> np.ndarray:
    """A layer's per-channel ``values`` (along the slot's axis) at the group's ``width`` channels: 0 where
    a shuffled channel is not in the layer, summed over the ``span`` inputs a flattened channel has."""
    values = np.asarray(values, float)
    if slot.index is not None:
        index = np.asarray(slot.index, int)
        return np.where(index >= 0, values[np.maximum(index, 0)], 0.0)
    return values[slot.offset: slot.offset + width * slot.span].reshape(width, slot.span).sum(1)


def _group_channel_scores(scores: dict, group, by_layer) -> np.ndarray:
    """Per-channel scores of a group in the paper's protocol: the sum, over its producers, of each
    producer's per-channel scores at the producer's slot."""
    total = np.zeros(group.width)
    for p in group.producers:
        total += slot_values(_channel_scores(scores, p.layer, by_layer[p.layer].shape[-1]), p, group.width)
    return total


def group_importance(scores: dict, group, by_layer) -> np.ndarray | None:
    """A channel group's importance per channel, as DepGraph sums it over the group: every producer's
    and depthwise conv's output-channel scores and every consumer's input-channel scores, where the
    criterion defines them (``channel_scores``, ``input_channel_scores``). None when a producer has none
    (e.g. ``bn_scale`` of a layer without BatchNorm): such a group is not pruned."""
    entries = {e["name"]: e for e in scores["layers"]}
    parts = [(s, "channel_scores", True) for s in group.producers] + \
        [(s, "channel_scores", False) for s in group.depthwise] + [(s, "input_channel_scores", False) for s in group.consumers]
    total = np.zeros(group.width)
    for slot, key, required in parts:
        values = entries[slot.layer].get(key)
        if values is None and required:
            return None
        if values is not None:
            total += slot_values(values, slot, group.width)
    return total


def check_scores(scores, model: Model) -> None:
    """A :class:`UserError` unless ``scores`` is a scores file made for this very model (``xprune score``
    records the model's fingerprint; a pruned model, or another file of the same architecture, differs)."""
    if not (isinstance(scores, dict) and isinstance(scores.get("layers"), list) and isinstance(scores.get("criterion"), str)
            and all(isinstance(e, dict) and isinstance(e.get("name"), str) and "score" in e
                    and (e["score"] is None or isinstance(e["score"], (int, float))) for e in scores["layers"])):
        raise UserError("the scores file is not one `xprune score` writes (it needs a criterion and a list of layers "
                        "with name and score); run `xprune score` on this model")
    if scores.get("arch") not in (None, model.arch):
        raise UserError(f"the scores were computed for {scores['arch']}, not {model.arch}; run `xprune score` on this model")
    recorded = scores.get("model_fingerprint")
    if recorded != model_fingerprint(model):
        why = "records no model fingerprint" if recorded is None else "was made for another model (its fingerprint differs)"
        raise UserError(f"the scores file {why}: scores must come from this very model (a pruned model needs new "
                        "scores); run `xprune score` on this model")


def _scores_by_layer(scores: dict, layers, model: Model) -> dict[str, float | None]:
    check_scores(scores, model)
    by_name = {entry["name"]: entry["score"] for entry in scores["layers"]}
    missing = [l.name for l in layers if l.name not in by_name]
    extra = sorted(set(by_name) - {l.name for l in layers})
    if missing or extra:
        example = ", ".join((missing or extra)[:3])
        raise UserError(f"the scores file was made for another model ({len(missing)} layers lack a score, {len(extra)} "
                        f"scored layers are not in this model, e.g. {example}); run `xprune score` on this very model")
    entries = {entry["name"]: entry for entry in scores["layers"]}
    for layer in layers:
        if layer.kind == "block":
            continue
        kernel = np.shape(tree_paths.get(model.variables["params"], layer.name)["kernel"])
        for key, width in (("channel_scores", layer.shape[-1]), ("input_channel_scores", kernel[-2])):
            values = entries[layer.name].get(key)
            if values is not None and not (isinstance(values, list) and len(values) == width and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise UserError(f"the scores file's {key} of {layer.name} are not {width} numbers; run `xprune score` "
                                "on this very model")
    return by_name


def _channel_scores(scores: dict, name: str, width: int):
    values = next(e for e in scores["layers"] if e["name"] == name).get("channel_scores")
    if values is None or len(values) != width:
        raise UserError(f"the scores file has no per-channel scores for {name}; shrink needs a criterion "
                        "that defines them (grad_x_act, taylor_weight, l1, l2, random)")
    return values


def validate_plan(model: Model, plan: Plan) -> None:
    """Clear errors for plans that name unknown or protected layers (e.g. a hand-edited plan file)."""
    if plan.mode not in MODES:
        raise UserError(f"plan mode {plan.mode!r} is unknown; choose one of: {', '.join(MODES)}")
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))
    graph = graph_of(model.arch, model.spec)
    heads = set(graph.heads)
    units = {"remove": plan.selected, "remove+shrink": plan.removed}.get(plan.mode, [])
    if units:
        _check_selected(units, {u.name for u in graph.units}, "remove", model, plan,
                        lambda name: _touches(name, plan.protected))
    if plan.mode == "zero":
        known = {l.name for l in layers if l.kind != "block"}
        _check_selected(plan.selected, known, plan.mode, model, plan, lambda name: _touches(name, plan.protected))
    elif plan.mode != "remove":
        if plan.removed:
            graph = graph_of(model.arch, surgery.without_units(model.spec, graph, plan.removed))
        for name in set(plan.selected) & set(graph.untraceable):
            raise UserError(f"cannot prune {name}: its channels reach {graph.untraceable[name]}, which the channel "
                            "tracer does not follow; protect it or change the model")
        groups = {g.name: g for g in graph.groups}
        _check_selected(plan.selected, set(groups), "shrink", model, plan,
                        lambda name: blocked(groups[name], plan.protected, heads))
        for name in plan.selected:
            keep = plan.keep_channels.get(name)
            if keep is None or not 0 < len(keep) < groups[name].width or min(keep) < 0 or \
                    max(keep) >= groups[name].width or len(set(keep)) != len(keep):
                raise UserError(f"the plan keeps channels of {name!r} that don't fit its {groups[name].width} "
                                "channels; keep_channels lists distinct indices, some but not all of them")


def _check_selected(selected, known, mode, model, plan, touched) -> None:
    for name in selected:
        if name not in known:
            raise UserError(f"the plan names {name!r}, which is not a {mode}-able unit of this "
                            f"{model.arch} model; eligible: {', '.join(sorted(known)[:6])}, ...")
        if touched(name):
            raise UserError(f"the plan prunes {name!r}, which is protected or touches a protected layer "
                            f"({', '.join(plan.protected)}); drop it from the plan or from the protected list")


def apply_plan(model: Model, plan: Plan) -> Model:
    """The pruned model: a new (spec, variables) pair, with the plan recorded in its metadata."""
    validate_plan(model, plan)
    spec, variables = model.spec, model.variables
    if plan.mode == "zero":
        variables = surgery.zero_layers(variables, plan.selected)
    removed = plan.selected if plan.mode == "remove" else plan.removed
    if removed:
        removal = _without_units(model, removed)
        spec, variables = removal.spec, removal.variables
    if plan.mode in ("shrink", "remove+shrink"):
        keep = {name: plan.keep_channels[name] for name in plan.selected}
        spec, variables = surgery.shrink(spec, variables, graph_of(model.arch, spec), keep)
    meta = {**model.meta, "plans": [*model.meta.get("plans", []), dataclasses.asdict(plan)]}
    return Model(model.arch, spec, variables, meta)

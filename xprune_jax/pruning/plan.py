"""Plans: which layers a score file's criterion ranks lowest, chosen under a budget, and the new
(spec, variables) pair they produce.

Budgets: ``layers=5%`` (the bottom fraction of the eligible units: the paper's global 5%),
``flops=-30%`` or ``params=-30%`` (a reduction target; in shrink mode the last group taken narrows only as
far as the target needs). Modes: ``zero`` (the paper's; no speed-up),
``remove`` (depth pruning), ``shrink`` (width pruning).
"""

import collections
import dataclasses
import math
import re

import jax
import numpy as np

from xprune_jax import analysis, models, tree_paths
from xprune_jax.checkpoint import Model, model_fingerprint
from xprune_jax.errors import UserError
from xprune_jax.pruning import surgery
from xprune_jax.pruning.rules import prediction_heads, protected_units, rules_for

MODES = ("zero", "remove", "shrink")


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
    if not match or not 0 < float(match.group(3)) < 100:
        raise UserError(f"bad --budget {text!r}: use layers=5%, flops=-30%, params=-30% or latency=-30% "
                        "(between 0 and 100%)")
    return match.group(1), float(match.group(3)) / 100


def count_params(arch: str, spec) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(models.variable_shapes(arch, spec)["params"])))


def make_plan(model: Model, scores: dict, mode: str, budget: str, protect=(), shrink_ratio: float = 0.5,
              round_to: int = 8) -> Plan:
    """Rank the eligible units by the score file's criterion (lowest first) and take them under the budget."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of: {', '.join(MODES)}")
    kind, target = parse_budget(budget)
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))
    score = _scores_by_layer(scores, layers, model)
    heads = set(prediction_heads(model.spec, layers))
    protected = sorted({l.name for l in layers if l.kind == "stem"} | heads | set(protected_units(model.spec)) | set(protect))
    flops_before, params_before = analysis.total_flops(layers), count_params(model.arch, model.spec)

    if mode == "zero":
        if kind != "layers":
            raise UserError("zero mode keeps every FLOP and parameter; use --budget=layers=N% (the paper: layers=5%)")
        eligible = [l.name for l in layers if l.kind != "block" and not _touches(l.name, protected)]
        chosen = sorted(eligible, key=lambda n: (score[n], n))[: max(1, round(target * len(eligible)))]
        return Plan(mode, budget, scores["criterion"], chosen, {}, protected, flops_before, flops_before,
                    params_before, params_before)

    rules = rules_for(model.spec)
    if mode == "remove":
        units = [u for u in rules.removable(model.spec) if not _touches(u, protected)]
        costs = {u: _unit_costs(u, layers, model.variables) for u in units}
        unit_score = {u: sum(score[l.name] for l in layers if l.kind != "block" and l.name.startswith(u + ".")) for u in units}
        ranked = sorted(units, key=lambda u: (unit_score[u], u))

        def savings(chosen):  # removals don't interact: their savings add up
            return tuple(sum(costs[u][i] for u in chosen) for i in (0, 1))

        chosen = _take(ranked, kind, target, savings, flops_before, params_before, mode, model.arch)
        spec = rules.remove(model.spec, chosen)
        keep = {}
    else:
        by_layer = {l.name: l for l in layers}
        groups = {g.name: g for g in rules.groups(model.spec) if not _blocked(g, protected, heads)}
        order = {n: np.argsort(-_group_channel_scores(scores, g, by_layer), kind="stable") for n, g in groups.items()}

        def top(name, n_keep):  # the group's n_keep best channels
            return sorted(int(i) for i in order[name][:n_keep])

        keep = {n: top(n, min(g.width - 1, max(round_to, math.ceil((1 - shrink_ratio) * g.width / round_to) * round_to)))
                for n, g in groups.items()}
        groups = {n: g for n, g in groups.items() if 0 < len(keep[n]) < g.width}
        group_score = {n: float(np.mean([score[p.layer] for p in g.producers])) for n, g in groups.items()}
        ranked = sorted(groups, key=lambda n: (group_score[n], n))

        def savings(chosen):
            return _shrink_savings([groups[n] for n in chosen], keep, by_layer, model.variables["params"])

        chosen = _take(ranked, kind, target, savings, flops_before, params_before, mode, model.arch)
        if kind != "layers":  # the last group narrows only as far as the budget needs (a big one overshoots)
            last, index = chosen[-1], 0 if kind == "flops" else 1
            need = target * (flops_before if kind == "flops" else params_before)
            for n_keep in range(len(keep[last]) + round_to, groups[last].width, round_to):
                wider = {**keep, last: top(last, n_keep)}
                if _shrink_savings([groups[n] for n in chosen], wider, by_layer, model.variables["params"])[index] < need:
                    break
                keep = wider
        keep = {n: keep[n] for n in chosen}
        spec = model.spec
        for n in chosen:
            spec = rules.resize(spec, n, keep[n])
    after = analysis.total_flops(analysis.describe_layers(model.arch, spec, analysis.input_size(model)))
    return Plan(mode, budget, scores["criterion"], chosen, keep, protected, flops_before, after,
                params_before, count_params(model.arch, spec))


def _take(ranked, kind, target, savings, flops_before, params_before, mode, arch) -> list[str]:
    """The lowest-ranked units, as many as the budget needs; ``savings(units) -> (flops, params)``."""
    if kind == "layers":
        return ranked[: max(1, round(target * len(ranked)))]
    total, index = (flops_before, 0) if kind == "flops" else (params_before, 1)
    chosen = []
    for unit in ranked:
        if savings(chosen)[index] >= target * total:
            break
        chosen.append(unit)
    saved = savings(chosen)[index]
    if saved < target * total:
        raise UserError(f"budget {kind}=-{target:.0%} can't be met by {mode} on {arch}: all {len(ranked)} eligible "
                        f"units together cut {saved / total:.1%}; lower the budget or use another mode")
    return chosen


def _touches(name: str, protected) -> bool:
    return any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in protected)


def _blocked(group, protected, heads) -> bool:
    """Whether ``group`` touches a protected layer. A head (a classifier's fc, a detector's predictors)
    keeps its outputs but may read fewer inputs, unless something else protects it (``--protect``)."""
    others = [p for p in protected if p not in heads]
    return any(_touches(s.layer, protected) for s in group.producers + group.norms + group.depthwise) or \
        any(_touches(s.layer, others if s.layer in heads else protected) for s in group.consumers)


def _unit_costs(unit: str, layers, variables) -> tuple[int, int]:
    """FLOPs and parameters that removing ``unit`` saves (every layer inside it goes)."""
    flops = sum(l.flops for l in layers if l.kind != "block" and l.name.startswith(unit + "."))
    params = tree_paths.get(variables["params"], unit, {})
    return flops, int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def _shrink_savings(groups, keep: dict, by_layer, params: dict) -> tuple[int, int]:
    """FLOPs and parameters saved by narrowing ``groups`` together, exactly as the analysis counts
    them in the narrowed spec: every conv loses the output channels its producer and depthwise slots
    drop (kernel and bias) and the input channels its consumer slots drop, summed over the groups
    that share it; each BN loses two parameters a dropped channel."""
    dropped_out, dropped_in, bn_params = collections.Counter(), collections.Counter(), 0
    for g in groups:
        dropped = np.setdiff1d(np.arange(g.width), keep[g.name])
        for slot in g.producers + g.depthwise:
            dropped_out[slot.layer] += len(slot.positions(dropped))
        for slot in g.consumers:
            dropped_in[slot.layer] += len(slot.positions(dropped))
        bn_params += 2 * sum(len(slot.positions(dropped)) for slot in g.norms)
    flops = saved_params = 0
    for name in dropped_out.keys() | dropped_in.keys():
        layer = tree_paths.get(params, name)
        *window, per_group_in, out = np.shape(layer["kernel"])  # a conv's (kh, kw), a linear layer's ()
        lost = math.prod(window) * (per_group_in * out - (per_group_in - dropped_in[name]) * (out - dropped_out[name]))
        flops += math.prod(by_layer[name].shape[:-1]) * lost
        saved_params += lost + (dropped_out[name] if "bias" in layer else 0)
    return flops, saved_params + bn_params


def _group_channel_scores(scores: dict, group, by_layer) -> np.ndarray:
    """Per-channel scores of a group: the sum, over its producers, of each producer's per-channel
    scores at the producer's slot (one producer: its slice; coupled producers: they add up)."""
    total = np.zeros(group.width)
    for p in group.producers:
        values = np.asarray(_channel_scores(scores, p.layer, by_layer[p.layer].shape[-1]), float)
        total += values[p.positions(np.arange(group.width))]
    return total


def check_scores(scores, model: Model) -> None:
    """A :class:`UserError` unless ``scores`` is a scores file made for this very model (``xprune score``
    records the model's fingerprint; a pruned model, or another file of the same architecture, differs)."""
    if not (isinstance(scores, dict) and isinstance(scores.get("layers"), list) and isinstance(scores.get("criterion"), str)
            and all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("score"), (int, float))
                    for e in scores["layers"])):
        raise UserError("the scores file is not one `xprune score` writes (it needs a criterion and a list of layers "
                        "with name and score); run `xprune score` on this model")
    if scores.get("arch") not in (None, model.arch):
        raise UserError(f"the scores were computed for {scores['arch']}, not {model.arch}; run `xprune score` on this model")
    recorded = scores.get("model_fingerprint")
    if recorded != model_fingerprint(model):
        why = "records no model fingerprint" if recorded is None else "was made for another model (its fingerprint differs)"
        raise UserError(f"the scores file {why}: scores must come from this very model (a pruned model needs new "
                        "scores); run `xprune score` on this model")


def _scores_by_layer(scores: dict, layers, model: Model) -> dict[str, float]:
    check_scores(scores, model)
    by_name = {entry["name"]: entry["score"] for entry in scores["layers"]}
    missing = [l.name for l in layers if l.name not in by_name]
    extra = sorted(set(by_name) - {l.name for l in layers})
    if missing or extra:
        example = ", ".join((missing or extra)[:3])
        raise UserError(f"the scores file was made for another model ({len(missing)} layers lack a score, {len(extra)} "
                        f"scored layers are not in this model, e.g. {example}); run `xprune score` on this very model")
    return by_name


def _channel_scores(scores: dict, name: str, width: int):
    entry = next(e for e in scores["layers"] if e["name"] == name)
    values = entry.get("channel_scores")
    if values is None or len(values) != width:
        raise UserError(f"the scores file has no per-channel scores for {name}; shrink needs a criterion "
                        "that defines them (grad_x_act, l1, random)")
    return values


def validate_plan(model: Model, plan: Plan) -> None:
    """Clear errors for plans that name unknown or protected layers (e.g. a hand-edited plan file)."""
    if plan.mode not in MODES:
        raise UserError(f"plan mode {plan.mode!r} is unknown; choose one of: {', '.join(MODES)}")
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))
    if plan.mode == "zero":
        known = {l.name for l in layers if l.kind != "block"}
    elif plan.mode == "remove":
        known = set(rules_for(model.spec).removable(model.spec))
    else:
        groups = {g.name: g for g in rules_for(model.spec).groups(model.spec)}
        known, heads = set(groups), set(prediction_heads(model.spec, layers))
    for name in plan.selected:
        if name not in known:
            raise UserError(f"the plan names {name!r}, which is not a {plan.mode}-able unit of this "
                            f"{model.arch} model; eligible: {', '.join(sorted(known)[:6])}, ...")
        touched = (_blocked(groups[name], plan.protected, heads) if plan.mode == "shrink"
                   else _touches(name, plan.protected))
        if touched:
            raise UserError(f"the plan prunes {name!r}, which is protected or touches a protected layer "
                            f"({', '.join(plan.protected)}); drop it from the plan or from the protected list")


def apply_plan(model: Model, plan: Plan) -> Model:
    """The pruned model: a new (spec, variables) pair, with the plan recorded in its metadata."""
    validate_plan(model, plan)
    if plan.mode == "zero":
        spec, variables = model.spec, surgery.zero_layers(model.variables, plan.selected)
    elif plan.mode == "remove":
        rules = rules_for(model.spec)
        spec = rules.remove(model.spec, plan.selected)
        variables = rules.remove_variables(model.arch, model.spec, model.variables, plan.selected)
    else:
        rules = rules_for(model.spec)
        spec, variables = model.spec, model.variables
        for name in plan.selected:  # groups of the current spec: slot offsets move as other groups shrink
            group = next(g for g in rules.groups(spec) if g.name == name)
            keep = np.asarray(plan.keep_channels[name])
            variables = surgery.shrink_group(variables, group, keep)
            spec = rules.resize(spec, name, keep)
    meta = {**model.meta, "plans": [*model.meta.get("plans", []), dataclasses.asdict(plan)]}
    return Model(model.arch, spec, variables, meta)

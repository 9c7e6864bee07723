"""Choosing among allocations by what they cost on data (``--mode=auto``): every candidate plan of the
same scores and budget is applied, each pruned model's loss on the calibration images is measured,
and the plan with the lowest loss is taken. Which normalisation, and whether removing whole units
first pays, depends on the network (benchmarks/README.md, issue 20); the loss on the images that
scored it tells them apart without looking at the evaluation images."""

import dataclasses
import math
from typing import Callable

from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.pruning.plan import NORMALIZATIONS, Plan, apply_plan, make_plan, parse_budget

CANDIDATES = ("shrink:mean", "shrink:max", "shrink:lamp", "remove+shrink:mean")  # ``mode:normalize``
SELECTABLE_MODES = ("shrink", "remove+shrink")


def parse_candidates(candidates) -> list[tuple[str, str]]:
    """``("shrink:mean", ...)`` -> ``[("shrink", "mean"), ...]``, each checked."""
    parsed = []
    for text in candidates:
        mode, _, normalize = str(text).partition(":")
        if mode not in SELECTABLE_MODES or normalize not in NORMALIZATIONS:
            raise UserError(f"bad candidate {text!r}: write MODE:NORMALIZE with MODE one of {', '.join(SELECTABLE_MODES)} "
                            f"and NORMALIZE one of {', '.join(NORMALIZATIONS)}, e.g. {CANDIDATES[0]}")
        parsed.append((mode, normalize))
    if not parsed:
        raise UserError(f"no candidates to choose from; give at least one, e.g. {','.join(CANDIDATES)}")
    return parsed


def select_plan(model: Model, scores: dict, budget: str, loss: Callable[[Model], float], candidates=CANDIDATES,
                protect=(), say: Callable[[str], None] | None = None, **options) -> Plan:
    """The candidate plan (``make_plan`` with each ``mode:normalize`` of ``candidates`` and ``options``)
    whose pruned model has the lowest ``loss``; ``plan.selection`` records every candidate's loss (or
    why it could not meet the budget). Ties go to the earlier candidate."""
    if parse_budget(budget)[0] == "layers":
        raise UserError(f"--mode=auto chooses among shrink allocations; give it a flops=-N% or params=-N% budget, "
                        f"not {budget}")
    tried, plans = [], []
    for mode, normalize in parse_candidates(candidates):
        entry = {"mode": mode, "normalize": normalize}
        try:
            plan = make_plan(model, scores, mode, budget, **{"protect": protect, **options, "normalize": normalize})
        except UserError as e:  # e.g. a budget this allocation can't meet
            tried.append({**entry, "infeasible": str(e)})
            continue
        value = float(loss(apply_plan(model, plan)))
        finite = math.isfinite(value)
        tried.append({**entry, "loss": value if finite else None, "flops_ratio": plan.flops_after / plan.flops_before,
                      "params_ratio": plan.params_after / plan.params_before})
        plans.append((value if finite else math.inf, len(plans), plan))
        if say:
            say(f"candidate {mode}:{normalize}: calibration loss {value:.4g}")
    if not plans:
        raise UserError(f"no candidate allocation meets {budget}: " + "; ".join(f"{t['mode']}:{t['normalize']}: {t['infeasible']}"
                                                                           for t in tried))
    value, _, best = min(plans, key=lambda p: p[:2])
    if not math.isfinite(value):
        raise UserError("every candidate's calibration loss is not finite; check the calibration images and objective")
    return dataclasses.replace(best, selection={"by": "the loss on the calibration images", "candidates": tried})

"""A measured-latency budget (``--budget=latency=-30%``): the smallest FLOPs cut whose pruned model,
timed side by side with the unpruned one, is at least the target faster.

FLOPs predict latency poorly (memory-bound layers, fixed overheads, NMS), so the plan is searched by
measurement. Each step plans a FLOPs cut with :func:`make_plan`, prunes, and measures the pruned
model's latency ratio (the median of per-round ratios); the next cut comes from the elasticity
measured so far, ``(1 - latency ratio) / FLOPs cut``, kept inside the bracket between the largest
cut that missed the target and the smallest that met it (bisection where the elasticity points
outside it). The search stops when that bracket is narrower than ``tolerance`` or after ``max_steps``.
"""

import dataclasses
import re
from typing import Callable

from xprune_jax.errors import UserError
from xprune_jax.pruning.plan import Plan, apply_plan, make_plan


def parse_latency_budget(budget: str) -> float | None:
    """``latency=-30%`` -> 0.3; None for the other budget kinds."""
    compact = budget.replace(" ", "")
    if not compact.startswith("latency="):
        return None
    match = re.fullmatch(r"latency=(-?)(\d+(?:\.\d+)?)%", compact)
    if match and not match.group(1):
        raise UserError(f"bad --budget {budget!r}: a latency reduction takes a minus: latency=-{match.group(2)}%")
    if not match or not 0 < float(match.group(2)) < 100:
        raise UserError(f"bad --budget {budget!r}: use latency=-30% (a latency cut between 0 and 100%)")
    return float(match.group(2)) / 100


def plan_for_latency(model, scores: dict, mode: str, target: float, measure: Callable[[object], float],
                     protect=(), max_steps: int = 6, tolerance: float = 0.02, progress: bool = False,
                     steps: list | None = None, **plan_options) -> tuple[Plan, list[dict]]:
    """The plan with the smallest FLOPs cut found whose measured latency ratio ``measure(pruned)`` is
    at most ``1 - target``, and every step of the search (``plan_options`` go to :func:`make_plan`).
    Steps are appended to ``steps`` as they are measured, so a caller that passes a list keeps them
    when the budget can't be met."""
    if mode == "zero":
        raise UserError("zero mode keeps every FLOP and buys no speed; a latency budget needs --mode=remove or shrink")
    steps, best = [] if steps is None else steps, None
    missed, upper = 0.0, 1.0  # the bracket of FLOPs cuts: the largest that missed, the smallest that met (or was infeasible)
    cut = target  # first guess: latency falls as fast as FLOPs
    for _ in range(max_steps):
        try:
            plan = make_plan(model, scores, mode, f"flops=-{100 * cut:.4g}%", protect, **plan_options)
        except UserError:  # more than the eligible units can cut
            steps.append({"flops_cut_asked": cut, "infeasible": True})
            upper = cut
            cut = (missed + upper) / 2
            continue
        achieved = 1 - plan.flops_after / plan.flops_before
        ratio = float(measure(apply_plan(model, plan)))
        ok = ratio <= 1 - target
        steps.append({"flops_cut_asked": cut, "flops_cut": achieved, "latency_ratio": ratio, "met": ok})
        if progress:
            print(f"latency search step {len(steps)}: FLOPs -{achieved:.1%} -> latency x{ratio:.3f} "
                  f"({'meets' if ok else 'misses'} -{target:.0%})", flush=True)
        if ok:
            upper = min(upper, achieved)
            if best is None or achieved < 1 - best.flops_after / best.flops_before:
                best = plan
        else:
            missed = max(missed, achieved)
        if best is not None and upper - missed < tolerance:
            break
        elasticity = (1 - ratio) / achieved if achieved > 0 else 0.0
        guess = target / elasticity if elasticity > 0 else 1.0
        cut = guess if missed < guess < upper else (missed + upper) / 2
    if best is None:
        measured = [s for s in steps if "latency_ratio" in s]
        closest = min(measured, key=lambda s: s["latency_ratio"]) if measured else None
        detail = (f"the best measured was {1 - closest['latency_ratio']:.1%} faster at {closest['flops_cut']:.1%} fewer FLOPs"
                  if closest else "no FLOPs cut was feasible")
        raise UserError(f"budget latency=-{target:.0%} can't be met by {mode} on {model.arch}: {detail}; "
                        "lower the budget or use another mode")
    return dataclasses.replace(best, budget=f"latency=-{100 * target:g}%"), steps

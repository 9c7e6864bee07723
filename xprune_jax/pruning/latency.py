"""A measured-latency budget (``--budget=latency=-30%``): the smallest FLOPs cut whose pruned model,
timed side by side with the unpruned one, is at least the target faster.

FLOPs predict latency poorly (memory-bound layers, fixed overheads, NMS), so the plan is searched by
measurement. Each step plans a FLOPs cut with :func:`make_plan`, prunes, and measures the pruned
model's latency ratio (the median of per-round ratios); the next cut comes from the elasticity
measured so far, ``(1 - latency ratio) / FLOPs cut``, kept inside the bracket between the largest
cut that missed the target and the smallest that met it (bisection where the elasticity points
outside it). The search stops when that bracket is narrower than ``tolerance`` or after ``max_steps``.

:func:`layer_latency` measures each layer's seconds on this backend, the table a latency-priced
global allocation reads (``make_plan(..., latency_price=N, layer_latency=table)``).
"""

import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax import analysis, precision, timing, tree_paths
from xprune_jax.errors import UserError
from xprune_jax.fileio import read_json
from xprune_jax.models.layers import Conv2d, Linear
from xprune_jax.models.rcnn import SharedConv2d
from xprune_jax.pruning.plan import Plan, apply_plan, make_plan
from xprune_jax.spec import spec_to_dict


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


def layer_latency(model, batch_size: int = 1, repeats: int = 15, inner: int = 16, seed: int = 0,
                  progress: bool = False, call_seconds: float = 2e-3) -> dict:
    """Each conv and linear layer's latency on this backend, measured alone at its input shapes in ``model``
    (batch ``batch_size``; a layer called more than once, like an R-CNN head's conv on every FPN level, sums
    its calls): ``seconds``. Each timed call runs the layer in a loop, as many times (``loops``, at most
    ``inner``) as take about ``call_seconds``, so dispatch does not swamp small layers and big ones run once:
    the measurement costs at most ``inner * (repeats + 2)`` forward passes of the network, and about
    ``repeats + 2`` where its layers are slow (a detector at full size). ``progress``: say which layer
    compiles, then a bar over the rounds. The table records what it was measured on;
    :func:`check_layer_latency` checks a reused one."""
    found = layer_calls(model, batch_size)
    params, calls, loops, rng = model.variables["params"], {}, {}, np.random.default_rng(seed)

    def timed(key, module, layer_params, x):
        module = module.clone(name=None)  # layers alike but for their names share one compiled loop
        jax.block_until_ready(_layer_loop(module, layer_params, x, 1))  # compiles, once per configuration and shape
        once = min(_seconds(lambda: _layer_loop(module, layer_params, x, 1)) for _ in range(3))
        loops[key] = n = int(np.clip(np.ceil(call_seconds / max(once, 1e-9)), 1, inner))
        calls[key] = lambda: _layer_loop(module, layer_params, x, n)

    for k, (name, (module, shapes)) in enumerate(found.items(), 1):
        if progress:
            print(f"compiling layer {k} of {len(found)}: {name}", file=sys.stderr, flush=True)
        for i, shape in enumerate(shapes):
            timed((name, i), module, tree_paths.get(params, name), jnp.asarray(rng.standard_normal((batch_size, *shape)), jnp.float32))
    times = timing.time_side_by_side(calls, repeats, 1, seed, progress, compiled=True)
    seconds = {key: float(np.median(t)) / loops[key] for key, t in times.items()}
    layers = {name: {"seconds": sum(seconds[(name, i)] for i in range(len(shapes))), "loops": [loops[(name, i)] for i in range(len(shapes))]}
              for name, (_, shapes) in found.items()}
    return {"what": "seconds of each conv and linear layer, measured alone", **_measured_on(model, batch_size),
            "repeats": repeats, "inner": inner, "call_seconds": call_seconds, "seed": seed, "layers": layers}


@functools.partial(jax.jit, static_argnums=0)
def _layer_loop(module, layer_params, x, n):
    """``n`` calls of ``module`` on ``x``, each depending on the last, so that none is hoisted or merged."""
    def body(_, carry):
        inputs = [x + carry] if isinstance(module, SharedConv2d) else x + carry
        return carry + 1e-6 * jnp.mean(jax.tree_util.tree_leaves(module.apply({"params": layer_params}, inputs))[0])
    return jax.lax.fori_loop(0, n, body, jnp.float32(0))


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def layer_calls(model, batch_size: int = 1) -> dict[str, tuple[nn.Module, list[tuple[int, ...]]]]:
    """Every conv and linear layer of ``model``'s forward (one abstract trace): the unbound module and the
    input shape of each of its calls (a shared conv is called once per FPN level)."""
    size, found = analysis.input_size(model), {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (Conv2d, Linear, SharedConv2d)):
            name = ".".join(context.module.path)
            inputs = args[0] if isinstance(context.module, SharedConv2d) else [args[0]]
            found.setdefault(name, (context.module.clone(parent=None), []))[1].extend(x.shape[1:] for x in inputs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.module.apply, model.variables, jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32))
    return found


def _measured_on(model, batch_size: int) -> dict:
    """What a layer latency table depends on: the architecture's shapes, the input, the backend."""
    shapes = hashlib.sha256(json.dumps([model.arch, spec_to_dict(model.spec)], sort_keys=True).encode()).hexdigest()
    return {"arch": model.arch, "spec_sha256": shapes, "input_size": analysis.input_size(model), "batch_size": batch_size,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "precision": precision.current()}


def read_layer_latency(path: str, model, batch_size: int) -> dict:
    """The layer latency table at ``path``, checked (:func:`check_layer_latency`); a one-line error if unreadable."""
    table = read_json(path, "layer latency table", "make one with `xprune prune --latency_price=N`")
    return check_layer_latency(table, model, batch_size, path)


def check_layer_latency(table, model, batch_size: int, path: str) -> dict:
    """``table`` (read from ``path``) if it was measured for ``model``'s shapes on this backend at
    ``batch_size``; else a one-line error naming the difference."""
    if not isinstance(table, dict) or not isinstance(table.get("layers"), dict):
        raise UserError(f"{path} is not a layer latency table; `xprune prune --latency_price=N` writes one (DIR.layer_latency.json)")
    for key, value in _measured_on(model, batch_size).items():
        if table.get(key) != value:
            raise UserError(f"{path} was measured for {key} {table.get(key)!r}, not {value!r}; measure it again "
                            "(drop --layer_latency)")
    return table

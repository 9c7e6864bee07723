"""XLA CPU's dense conv against im2col + matmul on small output maps, and what the library's choice
(``IM2COL_MAX_PIXELS``) does to whole models (issues 20 and 23).

    python benchmarks/bench_conv_lowering.py --out benchmarks/results/conv_lowering_cpu.json

Two parts, each timed side by side in random order after warm-up (``xprune_jax.timing``), median [IQR] of
the per-round ratio im2col / XLA:
- ``layers``: one 3x3 conv (padding 1), by output size, channels (in = out), stride and batch, forward
  and forward + backward;
- ``models``: whole networks (random weights, 6 classes) jitted with the library's lowering at
  ``IM2COL_MAX_PIXELS`` (its value now) against the same network with im2col off (0).
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xprune_jax import models, runs, timing  # noqa: E402
from xprune_jax.checkpoint import write_json_atomic  # noqa: E402
from xprune_jax.models import layers  # noqa: E402
from xprune_jax.models.yolov8 import yolov8_spec  # noqa: E402

MODELS = (("resnet50", 64, 1), ("resnet50", 64, 8), ("resnet50", 224, 1), ("resnet18", 224, 1),
          ("mobilenet_v2", 64, 1), ("yolov8n", 160, 1), ("yolov8n", 640, 1))


def xla_conv(x, kernel, stride):
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col_conv(x, kernel, stride):
    pixels = layers.IM2COL_MAX_PIXELS
    layers.IM2COL_MAX_PIXELS = 10 ** 9  # traced inside jit: the setting applies to this trace only
    try:
        return layers._conv(x, kernel, stride, 1, 1, 1)
    finally:
        layers.IM2COL_MAX_PIXELS = pixels


def _ratios(fns: dict, repeats: int, seed: int) -> dict:
    times = {k: np.asarray(v) for k, v in timing.time_side_by_side(fns, repeats, 2, seed).items()}
    ratio = times["im2col"] / times["xla"]
    return {"xla_us": float(np.median(times["xla"]) * 1e6), "im2col_us": float(np.median(times["im2col"]) * 1e6),
            "ratio_median": float(np.median(ratio)), "ratio_iqr": [float(np.quantile(ratio, q)) for q in (0.25, 0.75)]}


def layer_grid(args, log) -> list[dict]:
    rng, rows = np.random.default_rng(args.seed), []
    cells = [(g, b, c, s, o) for g in (False, True) for b in (1, 8) for c in (64, 256, 512) for s in (1, 2)
             for o in (1, 2, 3, 4, 7)]
    start = time.time()
    for k, (grad, batch, channels, stride, out) in enumerate(cells, 1):
        x = rng.standard_normal((batch, out * stride, out * stride, channels)).astype(np.float32)
        w = (rng.standard_normal((3, 3, channels, channels)) * 0.05).astype(np.float32)
        fns = {}
        for name, conv in (("xla", xla_conv), ("im2col", im2col_conv)):
            f = jax.jit(jax.grad(lambda x, w, conv=conv: (conv(x, w, stride) ** 2).sum(), argnums=(0, 1)) if grad
                        else (lambda x, w, conv=conv: conv(x, w, stride)))
            fns[name] = lambda f=f: f(x, w)
        got, want = jax.tree_util.tree_leaves(fns["im2col"]()), jax.tree_util.tree_leaves(fns["xla"]())
        error = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want))
        rows.append({"backward": grad, "batch": batch, "channels": channels, "stride": stride, "output": out,
                     "relative_error": error, **_ratios(fns, args.repeats, args.seed)})
        elapsed = time.time() - start
        log(f"layers {k}/{len(cells)} ({elapsed:.0f} s, {elapsed / k * (len(cells) - k):.0f} s left): "
            f"{'fwd+bwd' if grad else 'fwd'} b{batch} c{channels} s{stride} {out}x{out}: {rows[-1]['ratio_median']:.2f}")
    return rows


def whole_models(args, log) -> list[dict]:
    rows, pixels = [], layers.IM2COL_MAX_PIXELS
    for k, (arch, size, batch) in enumerate(MODELS, 1):
        spec = yolov8_spec("n", 6) if arch == "yolov8n" else dataclasses.replace(
            models.get_architecture(arch).default_spec(), num_classes=6)
        module, variables = models.build(arch, spec), models.init_variables(arch, spec, seed=args.seed)
        x = np.random.default_rng(args.seed).standard_normal((batch, size, size, 3)).astype(np.float32)
        fns = {}
        for name, value in (("xla", 0), ("im2col", pixels)):
            layers.IM2COL_MAX_PIXELS = value
            f = jax.jit(lambda v, x: module.apply(v, x))  # a new function: traced now, with this setting
            jax.block_until_ready(f(variables, x))
            fns[name] = lambda f=f: f(variables, x)
        layers.IM2COL_MAX_PIXELS = pixels
        got, want = jax.tree_util.tree_leaves(fns["im2col"]()), jax.tree_util.tree_leaves(fns["xla"]())
        error = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()) for a, b in zip(got, want))
        rows.append({"arch": arch, "input_size": size, "batch": batch, "relative_error": error,
                     **_ratios(fns, args.repeats, args.seed)})
        log(f"models {k}/{len(MODELS)}: {arch} {size} px b{batch}: {rows[-1]['xla_us'] / 1e3:.1f} ms -> "
            f"{rows[-1]['im2col_us'] / 1e3:.1f} ms ({rows[-1]['ratio_median']:.2f}x)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/conv_lowering_cpu.json")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if jax.default_backend() != "cpu":
        print("error: the lowering is CPU-only; run with JAX_PLATFORMS=cpu", file=sys.stderr)
        raise SystemExit(2)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    start = time.time()
    result = {"im2col_max_pixels": layers.IM2COL_MAX_PIXELS, "repeats": args.repeats, "seed": args.seed,
              "models": whole_models(args, log), "layers": layer_grid(args, log)}
    write_json_atomic(args.out, {**result, "wall_seconds": time.time() - start, "environment": runs.environment()})
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

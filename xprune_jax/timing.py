"""Latency measured honestly: warm-up excluded, many repeats, the candidates interleaved in a fresh
random order every round (so drift and noise hit all alike), and ratios taken per round."""

import os
import sys
import time
from typing import Callable

import jax
import numpy as np
import tqdm

DEMO_IMAGE = os.path.join(os.path.dirname(__file__), "data", "demo_coco", "val2017", "000000000139.jpg")


def model_call(model, batch_size: int = 1, image: str = DEMO_IMAGE) -> Callable[[], object]:
    """A zero-argument call of ``model``'s jitted forward on one fixed batch, for timing: a classifier
    gets standard-normal input at its crop size; a detector gets ``image`` (a bundled COCO image by
    default) through its own pipeline, ``batch_size`` times, and returns padded detections (so NMS is
    timed too). The batch is split over the devices (a multiple of their count), at the current
    :mod:`~xprune_jax.precision`."""
    from xprune_jax import models, parallel, precision
    from xprune_jax.data.images import load_rgb

    mesh = parallel.data_mesh()
    parallel.check_batch_size(batch_size, mesh)

    architecture = models.get_architecture(model.arch)
    if architecture.pipeline is None:
        size = model.meta.get("preprocess", {}).get("crop", architecture.input_size)
        x = np.random.default_rng(0).standard_normal((batch_size, size, size, 3)).astype(np.float32)
        forward = jax.jit(model.module.apply)
    else:
        pipeline = architecture.pipeline(model)
        pixels = np.asarray(load_rgb(image))
        (plan,) = pipeline.plan([pixels.shape[:2]], 1)
        x = np.repeat(pipeline.preprocess(pixels, plan.input_shape)[0][None], batch_size, axis=0)
        forward = jax.jit(pipeline.forward)
    variables = parallel.replicate(precision.cast(model.variables), mesh)
    x = jax.device_put(precision.cast(x), parallel.batch_sharding(mesh))
    return lambda: forward(variables, x)


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3,
                      seed: int = 0, progress: bool = False, compiled: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, ``repeats`` rounds each. ``progress``: say
    which function warms up (its first call compiles, unless ``compiled``), then a progress bar over the rounds."""
    for k, (name, fn) in enumerate(fns.items(), 1):
        if progress and not compiled:
            print(f"compiling and warming up model {k} of {len(fns)}: {name}", file=sys.stderr, flush=True)
        for _ in range(warmup):
            jax.block_until_ready(fn())
    rng = np.random.default_rng(seed)
    times = {name: [] for name in fns}
    names = list(fns)
    for _ in tqdm.trange(repeats, unit="round", desc="timing", disable=not progress):
        for i in rng.permutation(len(names)):
            start = time.perf_counter()
            jax.block_until_ready(fns[names[i]]())
            times[names[i]].append(time.perf_counter() - start)
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Median and interquartile range of each latency and of its per-round ratio to ``baseline``."""
    base = np.asarray(times[baseline])
    summary = {}
    for name, values in times.items():
        values = np.asarray(values)
        ratio = values / base
        summary[name] = {
            "median_ms": float(np.median(values) * 1e3),
            "iqr_ms": [float(np.percentile(values, 25) * 1e3), float(np.percentile(values, 75) * 1e3)],
            "ratio_median": float(np.median(ratio)),
            "ratio_iqr": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))],
            "n": int(len(values)),
        }
    return summary


def markdown_table(summary: dict[str, dict], baseline: str) -> str:
    lines = [f"| model | median latency (ms) | IQR (ms) | ratio to {baseline} (median [IQR]) | n |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['median_ms']:.2f} | {s['iqr_ms'][0]:.2f}-{s['iqr_ms'][1]:.2f} | "
                     f"{s['ratio_median']:.3f} [{s['ratio_iqr'][0]:.3f}, {s['ratio_iqr'][1]:.3f}] | {s['n']} |")
    return "\n".join(lines)

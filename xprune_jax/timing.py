"""Latency measured honestly: warm-up excluded, many repeats, the candidates interleaved in a fresh
random order every round (so drift and noise hit all alike), and ratios taken per round."""

import time
from typing import Callable

import jax
import numpy as np


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3,
                      seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, ``repeats`` rounds each."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    rng = np.random.default_rng(seed)
    times = {name: [] for name in fns}
    names = list(fns)
    for _ in range(repeats):
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

"""Issue 5: the cost of scoring every layer (one jitted forward + backward with gradient x activation
reductions) against plain inference and against torch forward hooks, for RetinaNet at 800 px.

    python benchmarks/bench_attribution.py --out benchmarks/results/attribution_cpu.json

Timed side by side in one process (random order each round, warm-up and compilation excluded,
per-round ratios as median [IQR], ``xprune_jax.timing``), on the same preprocessed batch of real COCO
images (GeneralizedRCNNTransform at min 800 / max 1333: 640x480 images become 800x1066, padded to
800x1088):

* ``jax forward``: the jitted detector forward, as inference runs it (network, decoding, NMS).
* ``jax score``: ``attribution.statistics.statistics_step`` with the ``confidence`` objective: one
  jitted forward + backward giving every layer's sum |a g|, per-image |sum a g| and per-channel sums.
* ``torch forward``: torchvision eager under ``inference_mode`` (backbone to postprocessing).
* ``torch hooks``: the Captum LayerGradientXActivation recipe for every layer at once
  (``converters.reference.gradient_x_activation``: forward hooks that retain each output's gradient,
  one backward of the same objective), then the same reductions.

The JAX and torch scores are compared (relative error per layer) so that both sides do the same work.

Peak memory: each of the four runs again in its own subprocess, which samples its resident set size
(``VmRSS``) every 2 ms; reported are the RSS before the call (models loaded) and the peak above it
during the first call (compilation included) and during later calls.

Weights are random, shaped like trained ones (see ``bench_detectors.py``). ``--threads 1`` pins the
process to one CPU before jax starts and sets torch to one thread; ``0`` uses every CPU the process may
use (e.g. under ``taskset``), torch and XLA alike.
"""

from __future__ import annotations

import os
import sys

import bench_common


def _parse():
    p = bench_common.parser(__doc__)
    p.add_argument("--out", help="JSON file for the results (the main run)")
    p.add_argument("--arch", default="retinanet_resnet50_fpn")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker", choices=["jax forward", "jax score", "torch forward", "torch hooks"],
                   help="internal: measure the peak RSS of one of the four in this process")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)

import json  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_detectors import environment, landscape_images, random_rcnn  # noqa: E402
from converters.reference import detection_confidence, gradient_x_activation  # noqa: E402
from xprune_jax import timing  # noqa: E402
from xprune_jax.attribution.objectives import confidence  # noqa: E402
from xprune_jax.attribution.statistics import statistics_step  # noqa: E402
from xprune_jax.fileio import atomic_path  # noqa: E402


def _candidates(args) -> tuple[dict, dict]:
    """The four zero-argument callables on one batch, and what is needed to compare their scores."""
    images = [image for _, image in landscape_images(args.coco, max(args.batch, 2))]
    detector = random_rcnn(args.arch, images[:2])
    pipeline = detector.pipeline
    (plan,) = pipeline.plan([im.shape[:2] for im in images[:args.batch]], args.batch)
    arrays, metas = zip(*(pipeline.preprocess(images[i], plan.input_shape) for i in plan.indices))
    x = np.stack(arrays)
    nchw, sizes = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), [meta[1] for meta in metas]
    variables = jax.device_put(detector.model.variables)
    batch = {"images": x, "weights": np.ones(len(x), np.float32)}
    forward, score = jax.jit(pipeline.forward), statistics_step(pipeline.module, confidence)
    torch_model = detector.torch_model
    modules = dict(torch_model.named_modules())
    names = sorted(n for n in jax.eval_shape(score, variables, batch) if n in modules)

    def torch_forward():
        with torch.inference_mode():
            return detector.torch_stages["all"](nchw, sizes)

    def torch_hooks():
        products = gradient_x_activation(torch_model, names, lambda: detection_confidence(torch_model, nchw, sizes))
        return {name: {"abs": np.abs(ag).sum(), "signed": np.abs(ag.sum((1, 2))).sum(),
                       "channel_abs": np.abs(ag).sum((0, 1))} for name, ag in products.items()}

    fns = {"jax forward": lambda: forward(variables, x), "jax score": lambda: score(variables, batch),
           "torch forward": torch_forward, "torch hooks": torch_hooks}
    return fns, {"input_shape": list(x.shape[1:3]), "layers": len(names), "names": names}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _peak_during(fn) -> tuple[float, float]:
    """(seconds, peak RSS in MB) while ``fn`` runs, sampled every 2 ms."""
    peak, done = [_rss_mb()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    tick = time.perf_counter()
    try:
        jax.block_until_ready(fn())
    finally:
        seconds = time.perf_counter() - tick
        done.set()
        thread.join()
    return seconds, max(peak[0], _rss_mb())


def _worker(args) -> None:
    fns, _ = _candidates(args)
    fn = fns[args.worker]
    before = _rss_mb()
    first_seconds, first_peak = _peak_during(fn)
    later = [_peak_during(fn) for _ in range(2)]
    print(json.dumps({"rss_before_mb": before, "first_call_seconds": first_seconds,
                      "first_call_peak_above_mb": first_peak - before,
                      "later_call_peak_above_mb": max(p for _, p in later) - before}))


def _scores_agree(jax_stats, torch_stats) -> dict:
    """Worst relative error of the JAX sum |a g| against torch's, over layers with a gradient."""
    errors = {name: float(abs(float(jax_stats[name]["abs"]) - t["abs"]) / t["abs"])
              for name, t in torch_stats.items() if t["abs"] > 0}
    worst = max(errors, key=errors.get)
    return {"layers_compared": len(errors), "worst_layer": worst, "worst_relative_error": errors[worst]}


def main(args) -> None:
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))  # 0: as many as the CPUs it may use
    if args.worker:
        return _worker(args)
    fns, facts = _candidates(args)
    compile_seconds = {}
    for name in ("jax forward", "jax score"):
        tick = time.perf_counter()
        jax.block_until_ready(fns[name]())
        compile_seconds[name] = time.perf_counter() - tick
    agreement = _scores_agree(jax.device_get(fns["jax score"]()), fns["torch hooks"]())
    print(f"timing {list(fns)} x {args.repeats}", flush=True)
    times = timing.time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    ratios = {"jax score / jax forward": timing.summarize(times, "jax forward")["jax score"],
              "jax score / torch hooks": timing.summarize(times, "torch hooks")["jax score"],
              "torch hooks / torch forward": timing.summarize(times, "torch forward")["torch hooks"],
              "jax forward / torch forward": timing.summarize(times, "torch forward")["jax forward"]}
    memory = {}
    for name in fns:
        print(f"peak RSS: {name}", flush=True)
        command = [sys.executable, __file__, f"--worker={name}", f"--arch={args.arch}", f"--batch={args.batch}",
                   f"--threads={args.threads}", f"--coco={args.coco}"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        memory[name] = json.loads(done.stdout.strip().splitlines()[-1])
    results = {"environment": environment(args), **{k: v for k, v in facts.items() if k != "names"},
               "compile_and_first_call_seconds": compile_seconds, "score_agreement": agreement,
               "ratios": ratios, "latency": timing.summarize(times, "jax forward"), "peak_rss": memory, "times": times}
    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    print(_table(results))


def _table(results: dict) -> str:
    lines = [f"{results['environment']['args']['arch']}, batch {results['environment']['args']['batch']}, input "
             f"{results['input_shape'][0]}x{results['input_shape'][1]}, {results['layers']} layers scored", "",
             "| | median ms | IQR ms | peak RSS above loaded model, first call / later (MB) |", "|---|---|---|---|"]
    for name, s in results["latency"].items():
        m = results["peak_rss"][name]
        lines.append(f"| {name} | {s['median_ms']:.0f} | {s['iqr_ms'][0]:.0f}-{s['iqr_ms'][1]:.0f} | "
                     f"{m['first_call_peak_above_mb']:.0f} / {m['later_call_peak_above_mb']:.0f} |")
    lines += ["", "| ratio (per round) | median [IQR] |", "|---|---|"]
    for name, r in results["ratios"].items():
        lines.append(f"| {name} | **{r['ratio_median']:.2f}** [{r['ratio_iqr'][0]:.2f}, {r['ratio_iqr'][1]:.2f}] |")
    a = results["score_agreement"]
    lines += ["", f"JAX vs torch-hooks scores: worst relative error {a['worst_relative_error']:.1e} "
                  f"({a['worst_layer']}, {a['layers_compared']} layers with a gradient)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main(ARGS)

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

Any backend, one command: JAX on its default backend, torch on CUDA when available, synchronised, with
the hooks' reductions on torch's device (``bench_common``); ``--skip_memory`` leaves out the peak-RSS
subprocesses (host memory says little on a GPU).

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
    p.add_argument("--skip_memory", action="store_true", help="leave out the peak-RSS subprocesses")
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

import functools  # noqa: E402

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


def _candidates(args, device) -> tuple[dict, dict]:
    """The four zero-argument callables on one batch, and what is needed to compare their scores."""
    images = [image for _, image in landscape_images(args.coco, max(args.batch, 2))]
    detector = random_rcnn(args.arch, images[:2], device, args.min_size, args.max_size)
    pipeline = detector.pipeline
    (plan,) = pipeline.plan([im.shape[:2] for im in images[:args.batch]], args.batch)
    arrays, metas = zip(*(pipeline.preprocess(images[i], plan.input_shape) for i in plan.indices))
    x = np.stack(arrays)
    nchw, sizes = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device), [meta[1] for meta in metas]
    variables = jax.device_put(detector.model.variables)
    batch = jax.device_put({"images": x, "weights": np.ones(len(x), np.float32)})
    forward, score = jax.jit(pipeline.forward), statistics_step(pipeline.module, confidence)
    torch_model = detector.torch_model
    modules = dict(torch_model.named_modules())
    names = sorted(n for n in jax.eval_shape(score, variables, batch) if n in modules)

    def torch_forward():
        with torch.inference_mode():
            return detector.torch_stages["all"](nchw, sizes)

    def torch_hooks():
        products = gradient_x_activation(torch_model, names, lambda: detection_confidence(torch_model, nchw, sizes),
                                         as_numpy=False)
        reduced = {name: {"abs": ag.abs().sum(), "signed": ag.sum((1, 2)).abs().sum(),
                          "channel_abs": ag.abs().sum((0, 1))} for name, ag in products.items()}  # on torch's device
        return {name: {k: v.cpu().numpy() for k, v in r.items()} for name, r in reduced.items()}

    sync = functools.partial(bench_common.synchronized, device=device)
    x_device = jax.device_put(x)
    fns = {"jax forward": lambda: forward(variables, x_device), "jax score": lambda: score(variables, batch),
           "torch forward": sync(torch_forward), "torch hooks": sync(torch_hooks)}
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
    fns, _ = _candidates(args, bench_common.setup(args))
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
    device = bench_common.setup(args)
    fns, facts = _candidates(args, device)
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
    for name in [] if args.skip_memory else fns:
        print(f"peak RSS: {name}", flush=True)
        command = [sys.executable, __file__, f"--worker={name}", f"--arch={args.arch}", f"--batch={args.batch}",
                   f"--threads={args.threads}", f"--coco={args.coco}", f"--precision={args.precision}",
                   f"--torch_device={args.torch_device}", f"--min_size={args.min_size}", f"--max_size={args.max_size}"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        memory[name] = json.loads(done.stdout.strip().splitlines()[-1])
    results = {"environment": environment(args, device), **{k: v for k, v in facts.items() if k != "names"},
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
        m = results["peak_rss"].get(name)
        memory = f"{m['first_call_peak_above_mb']:.0f} / {m['later_call_peak_above_mb']:.0f}" if m else "not measured"
        lines.append(f"| {name} | {s['median_ms']:.0f} | {s['iqr_ms'][0]:.0f}-{s['iqr_ms'][1]:.0f} | {memory} |")
    lines += ["", "| ratio (per round) | median [IQR] |", "|---|---|"]
    for name, r in results["ratios"].items():
        lines.append(f"| {name} | **{r['ratio_median']:.2f}** [{r['ratio_iqr'][0]:.2f}, {r['ratio_iqr'][1]:.2f}] |")
    a = results["score_agreement"]
    lines += ["", f"JAX vs torch-hooks scores: worst relative error {a['worst_relative_error']:.1e} "
                  f"({a['worst_layer']}, {a['layers_compared']} layers with a gradient)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main(ARGS)

"""Issue 23: what ``--precision`` costs and changes, on a trained fixture: pycocotools AP and latency
at ``highest``, ``default`` and ``bfloat16``.

    python benchmarks/bench_precision.py --out benchmarks/results/precision_cpu.json

The YOLOv8n trained here (``benchmarks/fixtures/yolov8n_shapes.pt``) is converted once and evaluated
on the bundled shapes validation split (``xprune_jax/data/demo_shapes``, 32 images) by the ``xprune
eval`` path (``evaluation.coco.evaluate``) at each precision; the detections are compared with
``highest``'s (identical, or how many differ). Latency: the jitted forward on one batch
(``timing.model_call``: letterboxed images in, detections out), every precision interleaved in
random order each round, ratios to ``highest`` per round. Any backend, one command; on a GPU use
``--threads 0``.
"""

from __future__ import annotations

import os
import sys

import bench_common


def _parse():
    p = bench_common.parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "fixtures", "yolov8n_shapes.pt"))
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "xprune_jax", "data", "demo_shapes"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max_images", type=int, default=0, help="evaluate the first N images only (0 = all)")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)

import json  # noqa: E402
import tempfile  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from xprune_jax import precision, runs, timing  # noqa: E402
from xprune_jax.checkpoint import write_json_atomic  # noqa: E402
from xprune_jax.evaluation.coco import evaluate  # noqa: E402


def _at(name: str, fn):
    """``fn`` called at precision ``name`` (a jitted function traces and caches per precision)."""
    def call():
        with precision.use(name):
            return fn()
    return call


def main(args) -> None:
    from converters.ultralytics_io import convert

    model = convert("yolov8n", args.weights)
    results = {"environment": {**runs.environment(), "args": vars(args)}, "weights": os.path.basename(args.weights),
               "precisions": {}}
    detections = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in precision.PRECISIONS:
            print(f"eval at {name}", flush=True)
            with precision.use(name):
                metrics = evaluate(model, args.data, os.path.join(tmp, name), args.batch, args.max_images, progress=False)
            with open(os.path.join(tmp, name, "detections.json")) as f:
                detections[name] = json.load(f)
            with open(os.path.join(tmp, name, "latency.json")) as f:
                latency = json.load(f)
            results["precisions"][name] = {"metrics": metrics, "eval_images_per_second": latency["images_per_second"]}
    for name, entries in detections.items():
        reference = detections["highest"]
        same = len(entries) == len(reference) and all(a == b for a, b in zip(entries, reference))
        results["precisions"][name]["detections_identical_to_highest"] = same
        results["precisions"][name]["detections"] = len(entries)
    calls = {}
    for name in precision.PRECISIONS:
        with precision.use(name):
            call = timing.model_call(model, args.batch)
        calls[name] = _at(name, call)
    times = timing.time_side_by_side(calls, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    for name, summary in timing.summarize(times, "highest").items():
        results["precisions"][name]["latency"] = {**summary, "batch": args.batch}
    write_json_atomic(args.out, results)
    print("| precision | AP | AP50 | detections identical to highest | latency ms (batch "
          f"{args.batch}) | ratio to highest, median [IQR] |\n|---|---|---|---|---|---|")
    for name, r in results["precisions"].items():
        s = r["latency"]
        print(f"| {name} | {r['metrics']['AP']:.4f} | {r['metrics']['AP50']:.4f} | {r['detections_identical_to_highest']} "
              f"| {s['median_ms']:.1f} | {s['ratio_median']:.3f} [{s['ratio_iqr'][0]:.3f}, {s['ratio_iqr'][1]:.3f}] |")


if __name__ == "__main__":
    bench_common.setup(ARGS)
    main(ARGS)

"""The detectors end to end before and after a change, side by side in one process, with torch eager
as the common yardstick.

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/bench_before_after.py --before /tmp/before --out benchmarks/results/before_after_cpu.json

The ``--before`` checkout's ``xprune_jax`` is copied under another name (``xprune_before``, imports
rewritten) so both versions load in one process: each detector (``bench_detectors``' random weights
shaped like trained ones) runs through both versions' pipelines on the same preprocessed batch of
640x480 COCO images, and torchvision / Ultralytics eager runs beside them (as in
``bench_detectors``). Every round times the three in a fresh random order (``xprune_jax.timing``);
reported are each one's median, the per-round ratios after / before and JAX / torch for both, and
whether both versions' detections are identical. Any backend, one command (``bench_common``).
"""

from __future__ import annotations

import os
import sys

import bench_common


def _parse():
    p = bench_common.parser(__doc__)
    p.add_argument("--before", required=True, help="a checkout of the code before the change")
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default="yolov8n,retinanet_resnet50_fpn,fasterrcnn_resnet50_fpn")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)

import importlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_detectors import (YOLO_IMGSZ, _batch, environment, landscape_images, random_rcnn,  # noqa: E402
                             random_yolov8n)
from xprune_jax import models, timing  # noqa: E402
from xprune_jax.checkpoint import write_json_atomic  # noqa: E402
from xprune_jax.spec import spec_to_dict  # noqa: E402


def load_before(checkout: str, workdir: str):
    """The checkout's ``xprune_jax`` imported as ``xprune_before``."""
    target = os.path.join(workdir, "xprune_before")
    shutil.copytree(os.path.join(checkout, "xprune_jax"), target, ignore=shutil.ignore_patterns("__pycache__", "data"))
    os.symlink(os.path.join(checkout, "xprune_jax", "data"), os.path.join(target, "data"))
    for folder, _, files in os.walk(target):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(re.sub(r"\bxprune_jax\b", "xprune_before", text))
    sys.path.insert(0, workdir)
    return importlib.import_module("xprune_before")


def before_pipeline(before, model):
    """The before version's evaluation pipeline of ``model`` (same spec, same variables)."""
    importlib.import_module("xprune_before.models")
    spec = importlib.import_module("xprune_before.spec").spec_from_dict(spec_to_dict(model.spec))
    checkpoint = importlib.import_module("xprune_before.checkpoint")
    return before.models.get_architecture(model.arch).pipeline(checkpoint.Model(model.arch, spec, model.variables,
                                                                                 model.meta))


def _identical(a: dict, b: dict) -> bool:
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in ("boxes", "scores", "labels", "valid"))


def main(args) -> None:
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = bench_common.setup(args)
    batches = [int(b) for b in args.batches.split(",")]
    arrays = [image for _, image in landscape_images(args.coco, max(*batches, 2))]
    results = {"environment": {**environment(args, device), "before": os.path.abspath(args.before)}, "detectors": {}}
    with tempfile.TemporaryDirectory() as workdir:
        before = load_before(args.before, workdir)
        for arch in args.archs.split(","):
            if arch == "yolov8n":
                from xprune_jax.models.yolov8_pipeline import YOLOv8Pipeline

                letterboxed = np.stack([YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec()).preprocess(
                    a, (YOLO_IMGSZ, YOLO_IMGSZ))[0] for a in arrays])
                detector = random_yolov8n(letterboxed, -5.0, device)
            else:
                detector = random_rcnn(arch, arrays[:2], device, args.min_size, args.max_size)
            old = jax.jit(before_pipeline(before, detector.model).forward)
            new = detector.jax_stages["all"]
            variables = jax.device_put(detector.model.variables)
            for batch in batches:
                print(f"{arch}, batch {batch}", flush=True)
                x, nchw, sizes = _batch(detector, arrays[:batch])
                x = jax.device_put(x)
                identical = _identical(jax.device_get(old(variables, x)), jax.device_get(new(variables, x)))
                torch_all = detector.torch_stages["all"]
                fns = {"before": lambda: old(variables, x), "after": lambda: new(variables, x),
                       "torch": lambda: torch_all(nchw, sizes)}
                with torch.inference_mode():
                    times = timing.time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
                results["detectors"].setdefault(arch, {})[batch] = {
                    "input_shape": list(x.shape[1:3]), "detections_identical": identical,
                    "after_over_before": timing.summarize(times, "before")["after"],
                    "over_torch": {k: v for k, v in timing.summarize(times, "torch").items() if k != "torch"},
                    "torch_median_ms": float(np.median(times["torch"]) * 1e3), "times": times}
                write_json_atomic(args.out, results)
    print("| detector | batch | before / torch | after / torch | after / before, median [IQR] | identical |\n"
          "|---|---|---|---|---|---|")
    for arch, per_batch in results["detectors"].items():
        for batch, r in per_batch.items():
            a = r["after_over_before"]
            print(f"| {arch} | {batch} | {r['over_torch']['before']['ratio_median']:.3f} | "
                  f"{r['over_torch']['after']['ratio_median']:.3f} | {a['ratio_median']:.3f} "
                  f"[{a['ratio_iqr'][0]:.3f}, {a['ratio_iqr'][1]:.3f}] | {r['detections_identical']} |")


if __name__ == "__main__":
    main(ARGS)

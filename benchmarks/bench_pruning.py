"""Issue 6: does pruning buy speed? Per architecture, the measured latency of the unpruned model
against ``zero``, ``remove`` and ``shrink`` at about -30% FLOPs, side by side in one run.

    python benchmarks/bench_pruning.py --out benchmarks/results/pruning_cpu.json

* Models: the trained fixtures where they exist (``configs/fixtures.py``: MobileNetV2, ShuffleNetV2,
  YOLOv8n, and ResNet-50 where its cached file is present), else random weights (ResNet-50 without its
  cache; Faster R-CNN and RetinaNet, built as in ``bench_detectors.py``). Layers are ranked by ``l1``,
  which needs no data: which blocks or channels go changes little of the cost, the budget fixes it.
* Plans: ``remove`` and ``shrink`` at ``flops=-30%`` (``make_plan``'s exact FLOPs accounting). Where
  the eligible units can't reach -30%, the largest feasible budget of -25/-20/-15/-10% is used and the
  row says so. ``zero`` zeroes 30% of the layers: the paper's operation, same graph, same FLOPs.
* Timing: the jitted forward each model's evaluation runs (classifiers: logits at 224x224, whatever
  size a fixture was trained at; detectors: 640x480 COCO images preprocessed by the model's own
  pipeline in, padded detections out), all variants of one architecture interleaved in a
  fresh random order every round, warm-up and compilation excluded (``xprune_jax.timing``); per-round
  ratios to the unpruned model, median [IQR].
* Elasticity: (1 - latency ratio) / (1 - FLOPs ratio); 1 means latency falls as fast as FLOPs.

``--threads 1`` pins the process to one CPU before jax starts (the robust setting on a shared machine);
``0`` uses every CPU the process may use (e.g. under ``taskset``).
"""

from __future__ import annotations

import os
import sys

import bench_common


def _parse():
    p = bench_common.parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default="resnet50,mobilenet_v2,shufflenet_v2_x1_0,yolov8n,retinanet_resnet50_fpn,"
                                      "fasterrcnn_resnet50_fpn")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--detector_repeats", type=int, default=5, help="repeats for the R-CNN detectors (seconds per call)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target", type=float, default=30.0, help="FLOPs cut in percent")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_detectors import environment, landscape_images, random_rcnn  # noqa: E402
from xprune_jax import models, timing  # noqa: E402
from xprune_jax.attribution.score import score_model  # noqa: E402
from xprune_jax.errors import UserError  # noqa: E402
from xprune_jax.evaluation.coco import pipeline_for  # noqa: E402
from xprune_jax.experiments.common import prepare_model  # noqa: E402
from xprune_jax.fileio import atomic_path  # noqa: E402
from xprune_jax.pruning.plan import apply_plan, make_plan  # noqa: E402

FALLBACK_BUDGETS = (25.0, 20.0, 15.0, 10.0)


def _fixtures() -> dict:
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "fixtures.py")
    spec = importlib.util.spec_from_file_location("fixtures_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FIXTURES


def _model(arch: str, images: list[np.ndarray], image_paths: list[str], workdir: str):
    """(model, where its weights come from)."""
    if arch in ("retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn"):
        return random_rcnn(arch, images[:2]).model, "random (bench_detectors recipe)"
    fixture = _fixtures().get(arch)
    weights = fixture if fixture and os.path.isfile(fixture) else "random"
    model, _ = prepare_model(arch, weights, image_paths[:2], 0, workdir)
    return model, os.path.basename(weights) if weights != "random" else "random (BN calibrated, randomised)"


def _timed_call(model, images: list[np.ndarray], batch: int):
    """A zero-argument call of the model's jitted forward on a fixed batch."""
    architecture = models.get_architecture(model.arch)
    if architecture.task == "classification":
        side = architecture.input_size  # torchvision's 224, whatever size a fixture was trained at
        x = np.random.default_rng(0).standard_normal((batch, side, side, 3)).astype(np.float32)
        forward = jax.jit(model.module.apply)
    else:
        pipeline = pipeline_for(model)
        (plan,) = pipeline.plan([im.shape[:2] for im in images[:batch]], batch)
        x = np.stack([pipeline.preprocess(images[i], plan.input_shape)[0] for i in plan.indices])
        forward = jax.jit(pipeline.forward)
    variables = jax.device_put(model.variables)
    return lambda: forward(variables, x)


def _plan(model, scores, mode: str, target: float):
    """The plan at ``target`` percent, else at the largest feasible fallback budget: (plan, budget, note)."""
    if mode == "zero":
        return make_plan(model, scores, "zero", f"layers={target:g}%"), f"layers={target:g}%", ""
    first_error = None
    for percent in (target, *[b for b in FALLBACK_BUDGETS if b < target]):
        try:
            return make_plan(model, scores, mode, f"flops=-{percent:g}%"), f"flops=-{percent:g}%", first_error or ""
        except UserError as e:
            first_error = first_error or str(e)
    return None, None, first_error


def bench_arch(arch: str, images, image_paths, args, workdir: str) -> dict:
    model, weights = _model(arch, images, image_paths, workdir)
    scores = score_model(model, ["l1"], progress=False)
    variants, rows = {"unpruned": model}, {"unpruned": {"flops_ratio": 1.0, "params_ratio": 1.0}}
    for mode in ("zero", "remove", "shrink"):
        plan, budget, note = _plan(model, scores, mode, args.target)
        if plan is None:
            rows[mode] = {"infeasible": note}
            continue
        variants[mode] = apply_plan(model, plan)
        rows[mode] = {"budget": budget, "selected": len(plan.selected), "flops_ratio": plan.flops_after / plan.flops_before,
                      "params_ratio": plan.params_after / plan.params_before, **({"note": note} if note else {})}
    calls = {name: _timed_call(m, images, args.batch) for name, m in variants.items()}
    for name, call in calls.items():
        print(f"{arch}: compiling {name}", flush=True)
        jax.block_until_ready(call())
    repeats = args.detector_repeats if arch in ("retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn") else args.repeats
    times = timing.time_side_by_side(calls, repeats=repeats, warmup=args.warmup, seed=args.seed)
    summary = timing.summarize(times, "unpruned")
    for name, row in rows.items():
        if name in summary:
            row.update(summary[name])
            cut = 1 - row["flops_ratio"]
            row["elasticity"] = (1 - row["ratio_median"]) / cut if cut > 1e-9 else None
    task = models.get_architecture(arch).task
    return {"weights": weights, "input": f"{models.get_architecture(arch).input_size} px square" if task == "classification" else
            "640x480 COCO images through the pipeline", "variants": rows, "times": times}


def _table(results: dict) -> str:
    lines = ["| arch | variant | budget | FLOPs | params | latency ms | latency / unpruned, median [IQR] | elasticity | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, r in results["archs"].items():
        for name, row in r["variants"].items():
            if "infeasible" in row:
                lines.append(f"| {arch} | {name} | infeasible | | | | {row['infeasible']} | | |")
                continue
            elasticity = "" if row.get("elasticity") is None else f"{row['elasticity']:.2f}"
            lines.append(f"| {arch} | {name} | {row.get('budget', '')} | {row['flops_ratio']:.3f} | {row['params_ratio']:.3f} | "
                         f"{row['median_ms']:.1f} | **{row['ratio_median']:.3f}** [{row['ratio_iqr'][0]:.3f}, "
                         f"{row['ratio_iqr'][1]:.3f}] | {elasticity} | {row['n']} |")
    return "\n".join(lines)


def main(args) -> None:
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))  # 0: as many as the CPUs it may use
    picked = landscape_images(args.coco, max(args.batch, 2))
    image_paths, images = [p for p, _ in picked], [im for _, im in picked]
    results = {"environment": environment(args), "archs": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for arch in args.archs.split(","):
            load_before = os.getloadavg()[0]
            results["archs"][arch] = {**bench_arch(arch, images, image_paths, args, workdir),
                                      "load_average": [load_before, os.getloadavg()[0]]}
            with atomic_path(args.out) as tmp, open(tmp, "w") as f:  # partial results survive a crash
                json.dump(results, f, indent=1)
    print(_table(results))


if __name__ == "__main__":
    main(ARGS)

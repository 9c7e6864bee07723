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
* Detectors: a pruned network changes the scores, hence how many candidates pass the thresholds and
  reach top-k and NMS, whose cost depends on that number. So each detector variant is also timed
  (same rounds) as ``network`` (its forward with the post-processing's inputs taken from the unpruned
  model's raw outputs, ``candidates_from``, and the post-processing's output dropped: the network
  alone) and ``fixed candidates`` (the whole forward with the unpruned model's candidates: end to end
  with the post-processing's work held fixed). Each kind's ratio is to the unpruned model's same
  kind; the candidates that reach NMS and the detections kept are recorded per image.

Any backend, one command (JAX on its default backend; on a GPU use ``--threads 0``); ``--precision``
as in ``bench_common``.

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
    p.add_argument("--modes", default="zero,remove,shrink")
    p.add_argument("--round_to", type=int, default=8, help="shrink keeps a multiple of this many channels")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)

import json  # noqa: E402
import tempfile  # noqa: E402

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_detectors import environment, landscape_images, random_rcnn  # noqa: E402
from xprune_jax import models, precision, timing  # noqa: E402
from xprune_jax.attribution.score import score_model  # noqa: E402
from xprune_jax.errors import UserError  # noqa: E402
from xprune_jax.evaluation.coco import pipeline_for  # noqa: E402
from xprune_jax.experiments.common import prepare_model  # noqa: E402
from xprune_jax.fileio import atomic_path  # noqa: E402
from xprune_jax.pruning.plan import apply_plan, make_plan  # noqa: E402
from xprune_jax.runs import RunFolder, config_module  # noqa: E402

FALLBACK_BUDGETS = (25.0, 20.0, 15.0, 10.0)


def _model(arch: str, images: list[np.ndarray], image_paths: list[str], workdir: str, args):
    """(model, where its weights come from)."""
    if arch in ("retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn"):
        return random_rcnn(arch, images[:2], min_size=args.min_size, max_size=args.max_size).model, \
            "random (bench_detectors recipe)"
    fixture = config_module(os.path.join(os.path.dirname(__file__), "..", "configs", "fixtures.py")).FIXTURES.get(arch)
    weights = fixture if fixture and os.path.isfile(fixture) else "random"
    model, _ = prepare_model(arch, weights, image_paths[:2], 0, RunFolder(workdir, workdir))
    return model, os.path.basename(weights) if weights != "random" else "random (BN calibrated, randomised)"


KINDS = ("end to end", "network", "fixed candidates")


def _timed_calls(model, images: list[np.ndarray], batch: int, reference_raw=None) -> dict:
    """Zero-argument calls of the model's jitted forward on a fixed batch, by kind: ``end to end``, and
    for a detector given the unpruned model's ``reference_raw``, ``network`` and ``fixed candidates``."""
    architecture = models.get_architecture(model.arch)
    variables = jax.device_put(precision.cast(model.variables))
    if architecture.task == "classification":
        side = architecture.input_size  # torchvision's 224, whatever size a fixture was trained at
        x = jax.device_put(precision.cast(np.random.default_rng(0).standard_normal((batch, side, side, 3)).astype(np.float32)))
        forward = jax.jit(model.module.apply)
        return {"end to end": lambda: forward(variables, x)}
    pipeline = pipeline_for(model)
    x = jax.device_put(precision.cast(_detector_batch(pipeline, images, batch)))
    forward = jax.jit(pipeline.forward)
    calls = {"end to end": lambda: forward(variables, x)}
    if reference_raw is not None:
        network = jax.jit(lambda v, x, ref: pipeline.forward(v, x, candidates_from=ref)["raw"])
        fixed = jax.jit(lambda v, x, ref: pipeline.forward(v, x, candidates_from=ref))
        calls["network"] = lambda: network(variables, x, reference_raw)
        calls["fixed candidates"] = lambda: fixed(variables, x, reference_raw)
    return calls


def _detector_batch(pipeline, images: list[np.ndarray], batch: int) -> np.ndarray:
    (plan,) = pipeline.plan([im.shape[:2] for im in images[:batch]], batch)
    return np.stack([pipeline.preprocess(images[i], plan.input_shape)[0] for i in plan.indices])


def _raw_and_candidates(model, images: list[np.ndarray], batch: int) -> tuple[dict, dict]:
    """The detector's raw outputs on the batch, and per image the candidates that reach NMS and the
    detections kept."""
    pipeline = pipeline_for(model)
    x = precision.cast(_detector_batch(pipeline, images, batch))
    out = jax.jit(functools.partial(pipeline.forward, return_raw=True))(precision.cast(model.variables), x)
    raw, spec = out["raw"], model.spec
    if model.arch.startswith("retinanet"):  # per level, the top-k of the scores above the threshold
        candidates = sum(jnp.minimum(jnp.sum(jax.nn.sigmoid(logits) > spec.score_thresh, axis=(1, 2)),
                                     spec.topk_candidates) for logits in raw["logits"])
    elif model.arch.startswith("fasterrcnn"):
        scores = jax.nn.softmax(raw["class_logits"], axis=-1)[..., 1:]
        valid = jnp.any(raw["proposals"] != 0, axis=-1)[..., None]
        candidates = jnp.sum((scores > spec.score_thresh) & valid, axis=(1, 2))
    else:  # YOLOv8: the (box, class) pairs above conf, at most max_candidates
        scores = raw["predictions"][:, 4:]
        candidates = jnp.minimum(jnp.sum(scores > pipeline.conf_threshold, axis=(1, 2)), pipeline.max_candidates)
    return raw, {"nms_candidates_per_image": np.asarray(candidates).tolist(),
                 "kept_per_image": np.asarray(out["valid"]).sum(axis=1).tolist()}


def _plan(model, scores, mode: str, target: float, round_to: int = 8):
    """The plan at ``target`` percent, else at the largest feasible fallback budget: (plan, budget, note)."""
    if mode == "zero":
        return make_plan(model, scores, "zero", f"layers={target:g}%"), f"layers={target:g}%", ""
    first_error = None
    for percent in (target, *[b for b in FALLBACK_BUDGETS if b < target]):
        try:
            return (make_plan(model, scores, mode, f"flops=-{percent:g}%", round_to=round_to), f"flops=-{percent:g}%",
                    first_error or "")
        except UserError as e:
            first_error = first_error or str(e)
    return None, None, first_error


def bench_arch(arch: str, images, image_paths, args, workdir: str) -> dict:
    model, weights = _model(arch, images, image_paths, workdir, args)
    scores = score_model(model, ["l1"], progress=False)
    variants, rows = {"unpruned": model}, {"unpruned": {"flops_ratio": 1.0, "params_ratio": 1.0}}
    for mode in args.modes.split(","):
        plan, budget, note = _plan(model, scores, mode, args.target, args.round_to)
        if plan is None:
            rows[mode] = {"infeasible": note}
            continue
        variants[mode] = apply_plan(model, plan)
        rows[mode] = {"budget": budget, "selected": len(plan.selected), "flops_ratio": plan.flops_after / plan.flops_before,
                      "params_ratio": plan.params_after / plan.params_before, **({"note": note} if note else {})}
    detector = models.get_architecture(arch).task == "detection"
    reference = None
    if detector:
        for name, m in variants.items():
            raw, counts = _raw_and_candidates(m, images, args.batch)
            rows[name].update(counts)
            reference = raw if name == "unpruned" else reference
    calls = {}
    for name, m in variants.items():
        for kind, call in _timed_calls(m, images, args.batch, reference).items():
            print(f"{arch}: compiling {name} ({kind})", flush=True)
            jax.block_until_ready(call())
            calls[f"{name} | {kind}"] = call
    repeats = args.detector_repeats if arch in ("retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn") else args.repeats
    times = timing.time_side_by_side(calls, repeats=repeats, warmup=args.warmup, seed=args.seed)
    for kind in KINDS:
        of_kind = {key.split(" | ")[0]: t for key, t in times.items() if key.endswith(f" | {kind}")}
        if not of_kind:
            continue
        summary = timing.summarize(of_kind, "unpruned")
        for name, row in rows.items():
            if name not in summary:
                continue
            if kind == "end to end":  # the row's own figures, as before
                row.update(summary[name])
                cut = 1 - row["flops_ratio"]
                row["elasticity"] = (1 - row["ratio_median"]) / cut if cut > 1e-9 else None
            else:
                row[kind] = summary[name]
    task = models.get_architecture(arch).task
    return {"weights": weights, "input": f"{models.get_architecture(arch).input_size} px square" if task == "classification" else
            "640x480 COCO images through the pipeline", "variants": rows, "times": times}


def _table(results: dict) -> str:
    lines = ["| arch | variant | budget | FLOPs | params | latency ms | latency / unpruned, median [IQR] | elasticity | n "
             "| network / unpruned | end to end, fixed candidates | NMS candidates per image | kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch, r in results["archs"].items():
        for name, row in r["variants"].items():
            if "infeasible" in row:
                lines.append(f"| {arch} | {name} | infeasible | | | | {row['infeasible']} | | | | | | |")
                continue
            elasticity = "" if row.get("elasticity") is None else f"{row['elasticity']:.2f}"
            kinds = " | ".join(f"{row[k]['ratio_median']:.3f} [{row[k]['ratio_iqr'][0]:.3f}, {row[k]['ratio_iqr'][1]:.3f}]"
                               if k in row else "" for k in KINDS[1:])
            counts = " | ".join(", ".join(str(c) for c in row.get(k, [])) for k in ("nms_candidates_per_image",
                                                                                  "kept_per_image"))
            lines.append(f"| {arch} | {name} | {row.get('budget', '')} | {row['flops_ratio']:.3f} | {row['params_ratio']:.3f} | "
                         f"{row['median_ms']:.1f} | **{row['ratio_median']:.3f}** [{row['ratio_iqr'][0]:.3f}, "
                         f"{row['ratio_iqr'][1]:.3f}] | {elasticity} | {row['n']} | {kinds} | {counts} |")
    return "\n".join(lines)


def main(args) -> None:
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))  # 0: as many as the CPUs it may use
    bench_common.setup(args)  # JAX's precision; torch only converts the random R-CNNs here
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

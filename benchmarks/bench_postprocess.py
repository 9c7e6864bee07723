"""Issue 23: what each stage of the R-CNN detectors' post-processing costs, in XLA's cost analysis and in time.

    python benchmarks/bench_postprocess.py --out benchmarks/results/postprocess_cpu.json

Per detector and batch size, on 640x480 COCO images (800x1088 after GeneralizedRCNNTransform), with
random weights shaped like trained ones (``bench_detectors.random_rcnn``: sharpened classifiers, so
that boxes pass the real thresholds), the network runs once and its raw outputs (``return_raw``)
feed each post-processing stage, jitted on its own:

* RetinaNet: ``candidates`` (per level: sigmoid, the top-1000 (anchor, class) scores above 0.05,
  their boxes decoded; the top-100 confidence) and ``nms`` (clip, class-aware NMS, 300 detections).
* Faster R-CNN: ``rpn candidates`` (per level the top-1000 objectness, decoded), ``rpn nms`` (clip,
  small boxes, NMS per level, 1000 proposals), ``roi align`` (MultiScaleRoIAlign of the 1000
  proposals) and ``detections`` (decode, softmax, class-aware NMS over 1000 x 90 candidates, 100
  detections).

Each NMS stage runs with each algorithm of ``ops.nms`` (``loop``: one step per kept box; ``tiled``:
512 candidates per step), same results checked. Reported per stage: XLA's cost analysis of the
compiled stage (FLOPs, bytes accessed; a while loop's body is counted once, so the loop's trip counts
are reported beside: the NMS steps each algorithm takes per image), and the latency, all stages of
one detector and batch interleaved in random order every round (``xprune_jax.timing``). The whole
forward and the network alone (``candidates_from``: the network with the post-processing's inputs
fixed, its output dropped) are timed in the same rounds.

``--before DIR``: a checkout of the code before the change (e.g. ``git archive <commit> | tar -x -C
DIR``). Its post-processing runs in a subprocess of the same script, on the same inputs, and the
``before`` of every stage is recorded beside ``after``, so one JSON holds both; the two processes
alternate ``--alternations`` times (each time all of one side's stages interleaved), and the
medians of the alternations are reported. Without it, only the current code is measured.
"""

from __future__ import annotations

import os
import sys

import bench_common


def _parse():
    p = bench_common.parser(__doc__)
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--archs", default="retinanet_resnet50_fpn,fasterrcnn_resnet50_fpn")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--before", help="a checkout of the code before the change, measured alongside")
    p.add_argument("--alternations", type=int, default=2)
    p.add_argument("--nms_variants", default="loop,tiled",
                   help="NMS algorithms timed beside the default: loop, tiled, or tiled:TILE (candidates per step)")
    p.add_argument("--whole_batches", default="1", help="batch sizes at which the whole forward is timed too")
    p.add_argument("--worker", help="internal: inputs .npz to time the stages of, printing JSON")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)
    if ARGS.worker:  # the code under test comes from the checkout this process was started in
        sys.path.insert(0, os.getcwd())

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

if not (ARGS and ARGS.worker):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from xprune_jax import models, ops, timing  # noqa: E402
from xprune_jax.models import rcnn  # noqa: E402

NMS_STAGES = {"nms", "rpn nms", "detections"}


def _level_anchors(spec, inputs: dict) -> list[np.ndarray]:
    """The anchors per FPN level (they depend only on the levels' shapes, recorded in ``inputs``)."""
    levels = [np.zeros((1, h, w, 1), np.float32) for h, w in inputs["level_shapes"]]
    return rcnn._anchors(spec, levels, tuple(int(v) for v in inputs["input_shape"]))


def _nms_variant(variant: str | None):
    """``ops.batched_nms`` with the variant's method ("loop", "tiled" or "tiled:TILE"); None: as it is."""
    if variant is None:
        return ops.batched_nms
    method, _, tile = variant.partition(":")
    return functools.partial(ops.batched_nms, method=method, **({"tile": int(tile)} if tile else {}))


def stages(arch: str, spec, inputs: dict, nms_variant: str | None) -> dict:
    """name -> (jitted fn, args): the post-processing stages of ``arch`` on ``inputs`` (numpy)."""
    input_shape = tuple(int(v) for v in inputs["input_shape"])
    anchors = _level_anchors(spec, inputs)
    sizes = inputs["image_sizes"]
    patched = _nms_variant(nms_variant)

    def with_nms(fn):
        def run(*args):
            saved, rcnn.batched_nms = rcnn.batched_nms, patched
            try:
                return fn(*args)
            finally:
                rcnn.batched_nms = saved
        return run

    if arch.startswith("retina"):
        logits = [inputs[f"logits{i}"] for i in range(len(anchors))]
        deltas = [inputs[f"deltas{i}"] for i in range(len(anchors))]
        candidates = jax.jit(lambda lo, de: rcnn.retinanet_candidates(spec, lo, de, anchors))
        boxes, scores, labels, _ = jax.device_get(candidates(logits, deltas))
        nms = jax.jit(with_nms(lambda b, s, l, z: rcnn.retinanet_nms(spec, b, s, l, z)))
        return {"candidates": (candidates, (logits, deltas)), "nms": (nms, (boxes, scores, labels, sizes))}
    rpn_candidates = jax.jit(lambda o, d: rcnn.rpn_candidates(spec, o, d, anchors))
    boxes, logits, level_ids = jax.device_get(rpn_candidates(inputs["objectness"], inputs["rpn_deltas"]))
    rpn_nms = jax.jit(with_nms(lambda b, lo, ids, z: rcnn.rpn_select(spec, b, lo, ids, z)))
    proposals, valid = jax.device_get(rpn_nms(boxes, logits, level_ids, sizes))
    levels = [inputs[f"level{i}"] for i in range(4)]
    roi_align = jax.jit(lambda lv, p: ops.multiscale_roi_align(lv, p, input_shape, spec.roi_size, spec.roi_sampling_ratio))
    detections = jax.jit(with_nms(lambda lo, de, p, v, z: rcnn.roi_detections(spec, lo, de, p, v, z)))
    return {"rpn candidates": (rpn_candidates, (inputs["objectness"], inputs["rpn_deltas"])),
            "rpn nms": (rpn_nms, (boxes, logits, level_ids, sizes)),
            "roi align": (roi_align, (levels, proposals)),
            "detections": (detections, (inputs["class_logits"], inputs["box_deltas"], proposals, valid, sizes))}


def cost(fn, args) -> dict:
    """XLA's cost analysis of the compiled ``fn`` (while-loop bodies counted once) and its compile time."""
    tick = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - tick
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
            "transcendentals": float(analysis.get("transcendentals", 0.0)), "compile_seconds": seconds}


def measure(arch: str, spec, inputs: dict, methods: list[str | None], repeats: int, warmup: int, seed: int) -> dict:
    """Cost analysis and interleaved latency of every stage (NMS stages once per method)."""
    fns, costs, outputs = {}, {}, {}
    for method in methods:
        for name, (fn, args) in stages(arch, spec, inputs, method).items():
            args = jax.device_put(args)  # on the device once, not copied there by every call
            if name not in NMS_STAGES and method != methods[0]:
                continue
            key = name if name not in NMS_STAGES or method is None else f"{name} [{method}]"
            costs[key] = cost(fn, args)
            outputs[key] = jax.device_get(fn(*args))
            fns[key] = functools.partial(fn, *args)
    times = timing.time_side_by_side(fns, repeats=repeats, warmup=warmup, seed=seed)
    result = {}
    for key, values in times.items():
        result[key] = {**costs[key], "median_ms": float(np.median(values) * 1e3), "times": values}
    return result, outputs


def nms_steps(arch: str, spec, inputs: dict, outputs: dict) -> dict:
    """Per image, the candidates and kept boxes of each NMS stage and the sequential steps each algorithm
    takes: ``loop`` one per kept box; ``tiled`` one per tile up to the tile holding the last kept box
    (or the last candidate, if fewer than the cap are kept)."""
    from xprune_jax.ops.nms import TILE

    tile = TILE.get(jax.default_backend(), TILE["default"])
    anchors = _level_anchors(spec, inputs)
    if arch.startswith("retina"):
        logits = [inputs[f"logits{i}"] for i in range(len(anchors))]
        deltas = [inputs[f"deltas{i}"] for i in range(len(anchors))]
        _, scores, _, _ = jax.device_get(jax.jit(lambda lo, de: rcnn.retinanet_candidates(spec, lo, de, anchors))(logits, deltas))
        cases = {"nms": (scores, scores > spec.score_thresh, spec.detections_per_img)}
    else:
        boxes, logits, level_ids = jax.device_get(jax.jit(lambda o, d: rcnn.rpn_candidates(spec, o, d, anchors))(
            inputs["objectness"], inputs["rpn_deltas"]))
        cases = {"rpn nms": (logits, np.ones(logits.shape, bool), spec.rpn_post_nms_top_n)}
        probs = np.asarray(jax.nn.softmax(inputs["class_logits"], axis=-1)[..., 1:])
        proposals_valid = np.asarray(outputs["rpn nms"][1])[..., None]
        cases["detections"] = (probs, ((probs > spec.score_thresh) & proposals_valid).reshape(len(probs), -1),
                               spec.detections_per_img)
    steps = {}
    for stage, (scores, candidates, cap) in cases.items():
        key = next(k for k in outputs if k.startswith(stage))
        kept = np.asarray(outputs[key]["valid"] if isinstance(outputs[key], dict) else outputs[key][1]).sum(axis=-1)
        rows = []
        for image in range(len(scores)):
            count = int(candidates[image].sum())
            # The tiled algorithm's steps: every tile up to the last candidate, unless the cap is reached
            # first; an upper bound when the cap is reached (the cap's box lies at or before that tile).
            rows.append({"candidates": count, "kept": int(kept[image]), "loop_steps": int(kept[image]),
                         "tiled_steps_at_most": -(-count // tile)})
        steps[stage] = rows
    return steps


def _inputs(detector, images: list[np.ndarray], batch: int, args, time_whole: bool) -> tuple[dict, object, dict]:
    """The raw network outputs (and FPN levels) for ``batch`` images, the model's spec, and the whole
    forward's and the network's cost (and latency if ``time_whole``)."""
    arch, spec, pipeline = detector.arch, detector.model.spec, detector.pipeline
    (plan,) = pipeline.plan([im.shape[:2] for im in images[:batch]], batch)
    x = np.stack([pipeline.preprocess(images[i], plan.input_shape)[0] for i in plan.indices])
    variables = detector.model.variables
    raw = jax.device_get(jax.jit(functools.partial(pipeline.forward, return_raw=True))(variables, x)["raw"])
    level_shapes = [level.shape[1:3] for level in jax.eval_shape(detector.jax_stages["body+fpn"], variables, x)]
    inputs = {"input_shape": np.asarray(plan.input_shape), "image_sizes": np.asarray(rcnn.unpadded_sizes(x)),
              "level_shapes": np.asarray(level_shapes)}
    if arch.startswith("retina"):
        inputs.update({f"logits{i}": a for i, a in enumerate(raw["logits"])})
        inputs.update({f"deltas{i}": a for i, a in enumerate(raw["deltas"])})
    else:
        inputs.update({k: raw[k] for k in ("objectness", "rpn_deltas", "class_logits", "box_deltas")})
        levels = jax.device_get(detector.jax_stages["body+fpn"](variables, x))
        inputs.update({f"level{i}": a for i, a in enumerate(levels[:4])})
    return inputs, spec, _whole(pipeline, variables, x, raw, args, time_whole)


def _whole(pipeline, variables, x, raw, args, time_whole: bool) -> dict:
    """The whole forward and the network alone (interleaved if ``time_whole``), with their cost analyses."""
    forward = jax.jit(pipeline.forward)
    network = jax.jit(lambda v, x, ref: pipeline.forward(v, x, candidates_from=ref)["raw"])
    fns = {"forward": (forward, jax.device_put((variables, x))), "network": (network, jax.device_put((variables, x, raw)))}
    result = {name: cost(fn, a) for name, (fn, a) in fns.items()}
    if time_whole:
        times = timing.time_side_by_side({name: functools.partial(fn, *a) for name, (fn, a) in fns.items()},
                                         repeats=args.repeats, warmup=args.warmup, seed=args.seed)
        for name, t in times.items():
            result[name].update({"median_ms": float(np.median(t) * 1e3), "times": t})
    return result


def _worker(args) -> None:
    """Time the stages of the code in the current directory on the inputs in ``args.worker``."""
    with np.load(args.worker) as data:
        inputs = dict(data)
    arch = str(inputs.pop("arch"))
    spec = models.get_architecture(arch).default_spec()
    spec = dataclasses.replace(spec, transform=dataclasses.replace(spec.transform, min_size=args.min_size,
                                                                   max_size=args.max_size))
    result, _ = measure(arch, spec, inputs, [None], args.repeats, args.warmup, args.seed)
    print(json.dumps(result))


def _before(arch: str, inputs: dict, args) -> dict:
    """One alternation of the ``--before`` checkout's stages, in a subprocess started there."""
    with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
        np.savez(f, arch=arch, **inputs)
    try:
        command = [sys.executable, os.path.abspath(__file__), f"--worker={f.name}", f"--threads={args.threads}",
                   f"--repeats={args.repeats}", f"--warmup={args.warmup}", f"--seed={args.seed}",
                   f"--min_size={args.min_size}", f"--max_size={args.max_size}"]
        done = subprocess.run(command, cwd=args.before, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": args.before})
        if done.returncode:
            raise SystemExit(f"the --before worker failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


def _median_of(runs: list[dict]) -> dict:
    """Per stage, the cost of the first run and the median of the runs' medians (every time kept)."""
    out = {}
    for key in runs[0]:
        out[key] = {k: v for k, v in runs[0][key].items() if k not in ("median_ms", "times")}
        out[key]["median_ms"] = float(np.median([r[key]["median_ms"] for r in runs]))
        out[key]["times"] = [t for r in runs for t in r[key]["times"]]
    return out


def table(results: dict) -> str:
    lines = ["| detector | batch | stage | GFLOPs | MB accessed | ms | before: GFLOPs | MB | ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, per_batch in results["detectors"].items():
        for batch, entry in per_batch.items():
            before = entry.get("before", {})
            for key, row in {**entry["whole"], **entry["after"]}.items():
                b = before.get(key, {})  # the before checkout ran each stage as it was (no variants)
                old = (f"{b['flops'] / 1e9:.3f} | {b['bytes_accessed'] / 1e6:.0f} | {b['median_ms']:.1f}" if b
                       else "| |")
                ms = f"{row['median_ms']:.1f}" if "median_ms" in row else ""
                lines.append(f"| {arch} | {batch} | {key} | {row['flops'] / 1e9:.3f} | {row['bytes_accessed'] / 1e6:.0f} | "
                             f"{ms} | {old} |")
    return "\n".join(lines)


def main(args) -> None:
    if args.worker:  # the --before checkout may predate xprune_jax.precision; its stages have no matmuls
        return _worker(args)
    bench_common.setup(args)
    from bench_detectors import environment

    results = {"environment": environment(args), "detectors": {}}
    from bench_detectors import landscape_images, random_rcnn

    batches = [int(b) for b in args.batches.split(",")]
    images = [image for _, image in landscape_images(args.coco, max(*batches, 2))]
    for arch in args.archs.split(","):
        detector = random_rcnn(arch, images[:2], min_size=args.min_size, max_size=args.max_size)
        for batch in batches:
            print(f"{arch}, batch {batch}: network", flush=True)
            inputs, spec, whole = _inputs(detector, images, batch, args, str(batch) in args.whole_batches.split(","))
            entry = {"input_shape": inputs["input_shape"].tolist(), "whole": whole}
            after_runs, before_runs = [], []
            for _ in range(args.alternations if args.before else 1):
                print(f"{arch}, batch {batch}: stages", flush=True)
                after, outputs = measure(arch, spec, inputs, [None, *args.nms_variants.split(",")], args.repeats,
                                         args.warmup, args.seed)
                after_runs.append(after)
                if args.before:
                    before_runs.append(_before(arch, inputs, args))
            entry["after"] = _median_of(after_runs)
            if before_runs:
                entry["before"] = _median_of(before_runs)
            entry["nms_steps"] = nms_steps(arch, spec, inputs, outputs)
            entry["same_results"] = _same_nms_results(outputs)
            results["detectors"].setdefault(arch, {})[batch] = entry
            if args.out:
                from xprune_jax.checkpoint import write_json_atomic

                write_json_atomic(args.out, results)
    print(table(results))


def _same_nms_results(outputs: dict) -> dict:
    """Whether every NMS method gave exactly the default's output, per stage."""
    same = {}
    for key in outputs:
        if " [" in key:
            stage = key.split(" [")[0]
            same[key] = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(outputs[key]),
                                                                jax.tree_util.tree_leaves(outputs[stage])))
    return same


if __name__ == "__main__":
    main(ARGS)

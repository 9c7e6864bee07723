"""Issues 3 and 4: jitted JAX detectors end to end against torchvision / Ultralytics eager, same machine.

One command runs everything, prints Markdown tables and writes JSON (command, versions, CPU, load
average, every raw timing)::

    python benchmarks/bench_detectors.py --out benchmarks/results/detectors_cpu.json

What is timed, per detector and batch size (a preprocessed batch in, final detections out):

* JAX: the jitted ``DetectionPipeline.forward`` (network, box decoding, NMS; padded detections).
* torch: the same work in eager mode under ``inference_mode``. torchvision: ``model(batch)`` with
  ``GeneralizedRCNNTransform``'s resize/normalise skipped (the batch is already preprocessed), so it
  runs backbone, FPN, RPN, RoI heads / head, postprocessing. Ultralytics: the fused
  ``DetectionModel`` (as its validator runs it) then ``non_max_suppression`` with the validator's
  settings (conf 0.001, IoU 0.7, multi-label, 300 detections).

Any backend, one command: JAX on its default backend, torch on CUDA when available (``--torch_device``),
each torch call timed to ``torch.cuda.synchronize``, ``cudnn.benchmark`` on; ``--precision`` sets both
sides' float32 matmul/conv precision alike (``bench_common``). On a GPU use ``--threads 0``.

Both sides see the same real COCO images (``--coco``), preprocessed once by the JAX pipeline. Each
round runs both in a fresh random order (``xprune_jax.timing``), warm-up and compilation excluded;
ratios are per round (JAX / torch), reported as median [IQR]. Every timed pair is also checked for
agreement (share of torch boxes matched at IoU >= 0.99, same label, score within 1e-3).

"Where the time goes": the same split on both sides, at batch 1 -- the ResNet body, the FPN, and
everything after (heads, proposal selection, RoI pooling, NMS) for the R-CNNs; the network and the
NMS for YOLOv8 -- measured as cumulative prefixes (body, body + FPN, all) and differenced.

Eval throughput: the whole ``xprune eval`` detection path (decode, preprocess in threads, jitted
batched forward, boxes back to the original image) on ``--throughput_images`` COCO images, once to
compile every padded shape and once more timed; torch does the same images through its own
``model(list of images)`` (its transform included) or Ultralytics' preprocessing.

Weights are random (no downloads here) but shaped like trained ones: BatchNorm statistics randomised,
R-CNN BN frozen with eps 0 as in the COCO_V1 files, classifiers sharpened (R-CNN) or the class bias
set to -5 (YOLOv8) so that boxes survive the real test-time thresholds -- the postprocessing then does
real work; the number of detections per image is reported.

``--threads 1`` pins the process to one CPU before jax starts (XLA sizes its pool from the affinity)
and sets torch to one thread: the robust setting on a shared machine. ``0`` uses every CPU the
process may use (e.g. under ``taskset``), torch and XLA alike.
"""

from __future__ import annotations

import os
import sys

import bench_common


def _parse():
    p = bench_common.parser(__doc__)
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--archs", default="yolov8n,retinanet_resnet50_fpn,fasterrcnn_resnet50_fpn")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--throughput_images", type=int, default=16, help="0: skip the eval throughput")
    p.add_argument("--yolo_class_bias", type=float, default=-5.0,
                   help="mean class-logit bias of the random YOLOv8 head: -5 gives the 30000 NMS candidates "
                        "(Ultralytics' max_nms) per image, lower values fewer")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)

import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from converters.reference import randomize_batch_norm, random_torchvision  # noqa: E402
from xprune_jax import models, runs, timing  # noqa: E402
from xprune_jax.checkpoint import Model  # noqa: E402
from xprune_jax.evaluation.coco import detect, pipeline_for  # noqa: E402
from xprune_jax.fileio import atomic_path  # noqa: E402
from xprune_jax.models.rcnn import FeaturePyramidNetwork, widths as rcnn_widths  # noqa: E402
from xprune_jax.models.resnet import ResNetBackbone  # noqa: E402
from xprune_jax.models.yolov8 import YOLOv8  # noqa: E402

SHARPEN = {"fasterrcnn_resnet50_fpn": ("roi_heads.box_predictor.cls_score", 4.0),
           "retinanet_resnet50_fpn": ("head.classification_head.cls_logits", 60.0)}
YOLO_IMGSZ = 640


def landscape_images(root: str, count: int) -> list[tuple[str, np.ndarray]]:
    """The first ``count`` landscape 640x480 images of the subset (so every batch has one shape)."""
    folder = os.path.join(root, "val2017")
    picked = []
    for name in sorted(os.listdir(folder)):
        image = Image.open(os.path.join(folder, name))
        if image.size == (640, 480):
            picked.append((os.path.join(folder, name), np.asarray(image.convert("RGB"))))
        if len(picked) == count:
            return picked
    raise SystemExit(f"fewer than {count} 640x480 images in {folder}")


def _submodule_variables(variables: dict, name: str) -> dict:
    return {collection: tree[name] for collection, tree in variables.items() if name in tree}


def _freeze_batch_norm(module: torch.nn.Module) -> None:
    """BatchNorm2d -> FrozenBatchNorm2d(eps=0), as the COCO_V1 files leave the backbone."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = torchvision.ops.misc.FrozenBatchNorm2d(child.num_features, eps=0.0)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norm(child)


class _Preprocessed(torch.nn.Module):
    """``GeneralizedRCNNTransform`` for an already preprocessed batch: no resize or normalisation;
    torchvision's postprocessing runs, but leaves the boxes in input pixels (as the JAX forward does)."""

    def __init__(self, transform, image_sizes):
        super().__init__()
        self.transform, self.image_sizes = transform, image_sizes

    def forward(self, images, targets=None):
        return torchvision.models.detection.image_list.ImageList(images, self.image_sizes), targets

    def postprocess(self, detections, image_sizes, original_sizes):
        return self.transform.postprocess(detections, image_sizes, image_sizes)


@dataclasses.dataclass
class Detector:
    arch: str
    model: Model  # JAX
    torch_model: torch.nn.Module
    pipeline: object
    jax_stages: dict  # name -> jitted fn(variables, x), cumulative prefixes, the last one is the whole forward
    torch_stages: dict  # name -> fn(nchw tensor, image sizes), same prefixes
    torch_full_images: object  # fn(list of uint8 HWC arrays) -> detections: torch's own whole pipeline
    torch_detections: object  # torch's "all" output -> per image {"boxes" xyxy, "scores", "labels" COCO ids}
    device: object  # torch's


def random_rcnn(arch: str, calibration: list[np.ndarray], device=torch.device("cpu"), min_size: int = 800,
                max_size: int = 1333) -> Detector:
    """A random R-CNN shaped like a trained one on both sides, with GeneralizedRCNNTransform's sizes."""
    batch = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in calibration]
    torch_model = random_torchvision(arch, seed=1, weights_backbone=None, min_size=min_size, max_size=max_size)
    randomize_batch_norm(torch_model.backbone.body, torch_model.transform(batch)[0].tensors, seed=1)
    _freeze_batch_norm(torch_model.backbone.body)
    layer, factor = SHARPEN[arch]
    with torch.no_grad():
        torch_model.get_submodule(layer).weight.mul_(factor)
    torch_model.eval()
    with tempfile.TemporaryDirectory() as tmp:  # the real converter path
        path = os.path.join(tmp, f"{arch}.pth")
        torch.save(torch_model.state_dict(), path)
        from converters.torchvision_io import convert

        model = convert(arch, path)
    transform = dataclasses.replace(model.spec.transform, min_size=min_size, max_size=max_size)
    model = dataclasses.replace(model, spec=dataclasses.replace(model.spec, transform=transform))
    torch_model.to(device)
    pipeline = pipeline_for(model)
    s = model.spec
    fpn_mode = "pool" if arch.startswith("faster") else "p6p7"

    def body(variables, x):
        return ResNetBackbone(s.body).apply(_submodule_variables(variables, "backbone.body"), x)

    def body_fpn(variables, x):
        stages = body(variables, x)
        return FeaturePyramidNetwork(s.fpn_width, rcnn_widths(s)["fpn_inner_width"], fpn_mode).apply(
            _submodule_variables(variables, "backbone.fpn"), [stages[k] for k in s.fpn_stages])

    transform = torch_model.transform

    def torch_all(x, sizes):
        torch_model.transform = _Preprocessed(transform, sizes)
        try:
            return torch_model(x)
        finally:
            torch_model.transform = transform

    sync = functools.partial(bench_common.synchronized, device=device)
    return Detector(
        arch, model, torch_model, pipeline,
        {"body": jax.jit(body), "body+fpn": jax.jit(body_fpn), "all": jax.jit(pipeline.forward)},
        {"body": sync(lambda x, sizes: torch_model.backbone.body(x)), "body+fpn": sync(lambda x, sizes: torch_model.backbone(x)),
         "all": sync(torch_all)},
        sync(lambda images: torch_model([torch.from_numpy(im).permute(2, 0, 1).to(device).float() / 255 for im in images])),
        lambda out: [{k: v.cpu().numpy() for k, v in d.items()} for d in out], device)


def random_yolov8n(calibration: np.ndarray, class_bias: float, device=torch.device("cpu")) -> Detector:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.nms import non_max_suppression

    from converters.ultralytics_io import convert
    from xprune_jax.models.yolov8_pipeline import category_ids

    torch.manual_seed(0)
    torch_model = randomize_batch_norm(DetectionModel("yolov8n.yaml", verbose=False),
                                       torch.from_numpy(calibration).permute(0, 3, 1, 2), 0)
    with torch.no_grad():
        for branch in torch_model.model[22].cv3:
            branch[2].bias.normal_(class_bias, 1.0)
    with tempfile.TemporaryDirectory() as tmp:  # the release files' layout, through the real converter
        path = os.path.join(tmp, "yolov8n.pt")
        torch.save({"model": copy.deepcopy(torch_model).half(), "train_args": {"imgsz": YOLO_IMGSZ},
                    "version": "8.4.190"}, path)
        model = convert("yolov8n", path, fuse=True)
        torch_model = torch.load(path, weights_only=False)["model"].float().eval().fuse(verbose=False).to(device)
    pipeline = pipeline_for(model)
    sync = functools.partial(bench_common.synchronized, device=device)

    def nms(raw):
        return non_max_suppression(raw, 0.001, 0.7, multi_label=True, max_det=300)

    def torch_images(images):
        from ultralytics.data.augment import LetterBox

        letterbox = LetterBox((YOLO_IMGSZ, YOLO_IMGSZ), auto=False, stride=32)
        x = np.stack([letterbox(image=im[..., ::-1]) for im in images])[..., ::-1]  # Ultralytics reads BGR
        return nms(torch_model(torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float() / 255))

    return Detector(
        "yolov8n", model, torch_model, pipeline,
        {"network": jax.jit(lambda v, x: YOLOv8(model.spec).apply(v, x)), "all": jax.jit(pipeline.forward)},
        {"network": sync(lambda x, sizes: torch_model(x)), "all": sync(lambda x, sizes: nms(torch_model(x)))},
        sync(torch_images),
        lambda out: [{"boxes": d[:, :4].cpu().numpy(), "scores": d[:, 4].cpu().numpy(),
                      "labels": np.asarray(category_ids(80))[d[:, 5].long().cpu().numpy()]} for d in out], device)


def _iou(a, b):
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def _agreement(jax_out: dict, torch_out: list[dict]) -> dict:
    """Share of torch's boxes matched by JAX's (IoU >= 0.99, same label, score within 1e-3); boxes per image."""
    matched, counts = [], []
    for i, want in enumerate(torch_out):
        valid = jax_out["valid"][i]
        got = {k: jax_out[k][i][valid] for k in ("boxes", "scores", "labels")}
        counts.append(len(want["boxes"]))
        if len(want["boxes"]) == 0:
            matched.append(1.0 if len(got["boxes"]) == 0 else 0.0)
            continue
        same = ((_iou(want["boxes"], got["boxes"]) >= 0.99) & (want["labels"][:, None] == got["labels"][None])
                & (np.abs(want["scores"][:, None] - got["scores"][None]) <= 1e-3))
        matched.append(float(same.any(1).mean()))
    return {"matched_share_min": min(matched), "torch_boxes_per_image": counts}


def _batch(detector: Detector, images: list[np.ndarray]):
    (plan,) = detector.pipeline.plan([im.shape[:2] for im in images], len(images))
    arrays, metas = zip(*(detector.pipeline.preprocess(images[i], plan.input_shape) for i in plan.indices))
    x = np.stack(arrays)
    sizes = [meta[1] for meta in metas] if detector.arch != "yolov8n" else None
    return x, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(detector.device), sizes


def _time_end_to_end(detector: Detector, images, batch_size: int, args) -> dict:
    x, nchw, sizes = _batch(detector, images[:batch_size])
    x = jax.device_put(x)  # both sides' inputs are on their devices before timing
    variables = jax.device_put(detector.model.variables)
    jax_all, torch_all = detector.jax_stages["all"], detector.torch_stages["all"]
    tick = time.perf_counter()
    jax_out = jax.device_get(jax_all(variables, x))
    compile_seconds = time.perf_counter() - tick
    extra = {}
    if "network" in detector.jax_stages:  # YOLOv8: the (box, class) pairs above conf that reach NMS (at most 30000)
        raw = np.asarray(detector.jax_stages["network"](variables, x), np.float32)
        extra["nms_candidates_per_image"] = np.minimum((raw[:, 4:] > 0.001).sum((1, 2)), 30000).tolist()
    with torch.inference_mode():
        torch_out = torch_all(nchw, sizes)
        times = timing.time_side_by_side({"jax": lambda: jax_all(variables, x), "torch": lambda: torch_all(nchw, sizes)},
                                         repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    summary = timing.summarize(times, "torch")
    return {"input_shape": list(x.shape[1:3]), "compile_and_first_call_seconds": compile_seconds,
            "agreement": _agreement(jax_out, detector.torch_detections(torch_out)), **extra, "summary": summary, "times": times}


def _time_stages(detector: Detector, images, args) -> dict:
    """Cumulative prefixes on both sides at batch 1, then the per-stage differences of their medians."""
    x, nchw, sizes = _batch(detector, images[:1])
    x = jax.device_put(x)
    variables = jax.device_put(detector.model.variables)
    fns = {}
    for name, fn in detector.jax_stages.items():
        jax.block_until_ready(fn(variables, x))  # compile outside the timer
        fns[f"jax {name}"] = lambda fn=fn: fn(variables, x)
    for name, fn in detector.torch_stages.items():
        fns[f"torch {name}"] = lambda fn=fn: fn(nchw, sizes)
    with torch.inference_mode():
        times = timing.time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    medians = {name: float(np.median(t) * 1e3) for name, t in times.items()}
    stages = {}
    for side in ("jax", "torch"):
        previous = 0.0
        for name in detector.jax_stages:
            cumulative = medians[f"{side} {name}"]
            stages.setdefault(name, {})[side] = cumulative - previous
            previous = cumulative
    return {"prefix_medians_ms": medians, "stage_ms": stages, "times": times}


def _throughput(detector: Detector, paths: list[str], batch_size: int) -> dict:
    """Images per second of the whole evaluation path on both sides (the second pass, shapes compiled)."""
    sizes = [Image.open(p).size[::-1] for p in paths]
    ids = list(range(len(paths)))
    forward = detector.jax_stages["all"]
    detect(detector.model, paths, ids, sizes, batch_size, progress=False, forward=forward)  # compiles every shape
    _, record = detect(detector.model, paths, ids, sizes, batch_size, progress=False, forward=forward)
    tick = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            detector.torch_full_images([np.asarray(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
    torch_seconds = time.perf_counter() - tick
    return {"images": len(paths), "batch_size": batch_size, "compiled_shapes": record["compiled_shapes"],
            "jax_images_per_second": record["images_per_second"], "torch_images_per_second": len(paths) / torch_seconds}


def environment(args, device=torch.device("cpu")) -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    try:
        import ultralytics

        ultralytics_version = ultralytics.__version__
    except ImportError:  # only YOLOv8 needs it
        ultralytics_version = None
    from xprune_jax import precision

    return {"command": " ".join([sys.executable, *sys.argv]), "args": vars(args), "cpu": model,
            "cpus_used": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ultralytics": ultralytics_version,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend(),
            "precision": precision.current(), **bench_common.devices(device), **runs.cpu()}


def _tables(results: dict) -> str:
    lines = ["| detector | batch | input | torch ms | JAX ms | JAX / torch median [IQR] | n | boxes/img (torch) | matched |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, r in results["detectors"].items():
        for batch, e in r["end_to_end"].items():
            s = e["summary"]
            lines.append(f"| {arch} | {batch} | {e['input_shape'][0]}x{e['input_shape'][1]} | {s['torch']['median_ms']:.0f} | "
                         f"{s['jax']['median_ms']:.0f} | **{s['jax']['ratio_median']:.2f}** [{s['jax']['ratio_iqr'][0]:.2f}, "
                         f"{s['jax']['ratio_iqr'][1]:.2f}] | {s['jax']['n']} | "
                         f"{int(np.mean(e['agreement']['torch_boxes_per_image']))} | {e['agreement']['matched_share_min']:.3f} |")
    lines += ["", "| detector | stage (batch 1) | torch ms | JAX ms |", "|---|---|---|---|"]
    for arch, r in results["detectors"].items():
        for stage, ms in r["stages"]["stage_ms"].items():
            lines.append(f"| {arch} | {stage} | {ms['torch']:.0f} | {ms['jax']:.0f} |")
    lines += ["", "| detector | images | batch | compiled shapes | torch img/s | JAX img/s |", "|---|---|---|---|---|---|"]
    for arch, r in results["detectors"].items():
        if "throughput" not in r:
            continue
        t = r["throughput"]
        lines.append(f"| {arch} | {t['images']} | {t['batch_size']} | {t['compiled_shapes']} | "
                     f"{t['torch_images_per_second']:.2f} | {t['jax_images_per_second']:.2f} |")
    return "\n".join(lines)


def main(args) -> None:
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))  # 0: as many as the CPUs it may use
    device = bench_common.setup(args)
    batches = [int(b) for b in args.batches.split(",")]
    images = landscape_images(args.coco, max(batches))
    arrays = [image for _, image in images]
    folder = os.path.join(args.coco, "val2017")
    throughput_paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:args.throughput_images]]
    results = {"environment": environment(args, device), "detectors": {}}
    for arch in args.archs.split(","):
        load_before = os.getloadavg()[0]
        if arch == "yolov8n":
            from xprune_jax.models.yolov8_pipeline import YOLOv8Pipeline

            letterboxed = np.stack([YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec()).preprocess(
                a, (YOLO_IMGSZ, YOLO_IMGSZ))[0] for a in arrays])
            detector = random_yolov8n(letterboxed, args.yolo_class_bias, device)
        else:
            detector = random_rcnn(arch, arrays[:2], device, args.min_size, args.max_size)
        entry = {"end_to_end": {}}
        for batch in batches:
            print(f"{arch}: end to end, batch {batch}", flush=True)
            entry["end_to_end"][batch] = _time_end_to_end(detector, arrays, batch, args)
        print(f"{arch}: stages", flush=True)
        entry["stages"] = _time_stages(detector, arrays, args)
        if args.throughput_images:
            print(f"{arch}: eval throughput", flush=True)
            entry["throughput"] = _throughput(detector, throughput_paths, max(batches))
        entry["load_average"] = [load_before, os.getloadavg()[0]]
        results["detectors"][arch] = entry
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:  # partial results survive a crash
            json.dump(results, f, indent=1)
    print(_tables(results))


if __name__ == "__main__":
    main(ARGS)

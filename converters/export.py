"""The torch-based formats of ``xprune export``: a torch file that :func:`converters.load_pruned` reads
(``torch``), an Ultralytics checkpoint (``ultralytics``), and ONNX through either (``onnx``).

Every file is checked before it is written: the module built from the spec takes the state_dict with
``strict=True``.
"""

import datetime
import json
import os
import shutil
import tempfile

import torch

from converters import pruned
from converters.torchvision_io import to_torch_state_dict
from xprune_jax.checkpoint import Model
from xprune_jax.fileio import atomic_path
from xprune_jax.spec import spec_to_dict


def _spec(model: Model) -> dict:
    return json.loads(json.dumps(spec_to_dict(model.spec)))  # tuples -> lists: plain data for every reader


def torch_module(model: Model) -> torch.nn.Module:
    """The torchvision module of a (pruned) model, holding its weights, in eval mode."""
    state_dict = to_torch_state_dict(model.variables)
    module = pruned.build(model.arch, _spec(model), {k: tuple(v.shape) for k, v in state_dict.items()})
    module.load_state_dict(state_dict, strict=True)
    return module.eval()


def export_torch(model: Model, path: str) -> None:
    """``{"arch", "spec", "state_dict", "categories", "preprocess"}``, which :func:`converters.load_pruned`
    builds into the torchvision module (plain data and tensors: ``torch.load(weights_only=True)`` reads it)."""
    torch_module(model)  # the state_dict fits the module built from the spec
    with atomic_path(path) as tmp:
        torch.save({"arch": model.arch, "spec": _spec(model), "state_dict": to_torch_state_dict(model.variables),
                    "categories": model.meta.get("categories"), "preprocess": model.meta.get("preprocess")}, tmp)


def detection_model(model: Model):
    """The Ultralytics ``DetectionModel`` of a (pruned) YOLOv8 model, holding its weights (float32, eval mode)."""
    from converters.pruned_yolo import build_detection_model, ultralytics_state_dict
    from converters.ultralytics_io import DFL_KEY

    spec = _spec(model)
    weights = ultralytics_state_dict(spec, to_torch_state_dict(model.variables))
    module = build_detection_model(spec, {k: tuple(v.shape) for k, v in weights.items()}, model.meta.get("categories"))
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights and k != DFL_KEY and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:  # a bug, not bad input: the spec and the variables travel together
        raise RuntimeError(f"the YOLOv8 module does not fit the variables: missing {missing[:4]}, unexpected {unexpected[:4]}")
    module.load_state_dict({**expected, **weights}, strict=True)
    return module.eval()


def export_ultralytics(model: Model, path: str) -> None:
    """An Ultralytics checkpoint in the layout of the release files: the whole fp16 ``DetectionModel``
    under ``model``, its class names, and ``train_args`` (the task and the image size)."""
    import ultralytics

    module = detection_model(model)
    imgsz = (model.meta.get("preprocess") or {}).get("imgsz", 640)
    checkpoint = {"date": datetime.datetime.now().isoformat(), "version": ultralytics.__version__,
                  "license": "AGPL-3.0 License", "docs": "https://docs.ultralytics.com", "epoch": -1,
                  "best_fitness": None, "model": module.half(), "ema": None, "updates": None, "optimizer": None,
                  "train_args": {"task": "detect", "imgsz": imgsz, "model": f"yolov8{model.spec.scale}.yaml"},
                  "train_metrics": {}, "train_results": {}}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def export_onnx(model: Model, path: str, shape: tuple[int, int, int, int]) -> None:
    """ONNX through the torch module, traced at ``shape`` (NHWC ``(B, H, W, 3)``):

    - YOLOv8: Ultralytics' own exporter; input ``images`` ``[B, 3, H, W]`` (letterboxed RGB / 255), output
      the raw predictions ``[B, 4 + classes, anchors]`` (xywh boxes and class scores, before NMS);
    - classifiers: input ``images`` ``[batch, 3, H, W]`` (normalised), output ``logits``;
    - R-CNNs: torchvision's detector with its transform, input one RGB ``image`` ``[3, height, width]``
      in [0, 1] of any size, outputs ``boxes`` (xyxy in its pixels), ``scores`` and ``labels`` (named; in
      the order of torchvision's result dict).
    """
    batch, height, width, _ = shape
    if model.arch.startswith("yolov8"):
        from ultralytics import YOLO

        staging = tempfile.mkdtemp(prefix=".xprune-onnx-", dir=os.path.dirname(os.path.abspath(path)))
        try:
            export_ultralytics(model, os.path.join(staging, "model.pt"))
            written = YOLO(os.path.join(staging, "model.pt")).export(format="onnx", imgsz=(height, width),
                                                                      batch=batch, simplify=False, dynamic=False)
            with atomic_path(path) as tmp:
                shutil.copyfile(written, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    module = torch_module(model)
    if model.arch.startswith(("fasterrcnn", "retinanet")):  # outputs in the order of torchvision's result dicts
        outputs = ["boxes", "labels", "scores"] if model.arch.startswith("fasterrcnn") else ["boxes", "scores", "labels"]
        args, names = ([torch.rand(3, height, width)],), (["image"], outputs)
        dynamic = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names[1]}}
    else:
        args, names = (torch.zeros(batch, 3, height, width),), (["images"], ["logits"])
        dynamic = {"images": {0: "batch"}, "logits": {0: "batch"}}
    with atomic_path(path) as tmp:
        torch.onnx.export(module, args, tmp, dynamo=False, input_names=names[0], output_names=names[1],
                          dynamic_axes=dynamic)

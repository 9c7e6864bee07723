"""``xprune export``: which formats an architecture takes, its input shape, and the JAX format.

The torch-based formats (``torch``, ``ultralytics``, ``onnx``) are written by ``converters.export``.
``jax`` writes the jitted inference function with :mod:`jax.export`: serialized StableHLO for one
input shape, stored with the model's parameters in one ``.npz`` file, so any JAX program can call it
without this package:

    with np.load(path) as f:
        exported = jax.export.deserialize(bytearray(f["exported"]))
        params = [f[f"param_{i}"] for i in range(int(f["num_params"]))]
    outputs = exported.call(params, images)  # images: the preprocessed [B, H, W, 3] float32 batch

Classifiers return the logits; detectors their pipeline's padded detections (``boxes`` xyxy in
input pixels, ``scores``, ``labels`` as COCO category ids, ``valid``; R-CNNs also ``confidence``).
``info`` (JSON) records the architecture, the input shape, the preprocessing and the categories.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax import models
from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.fileio import atomic_path

FORMATS = ("ultralytics", "torch", "onnx", "jax")
STRIDE = 32  # YOLOv8 and the R-CNNs' size_divisible: detector inputs are multiples of it


def formats(arch: str) -> tuple[str, ...]:
    """The export formats ``arch`` takes: YOLOv8 leaves as an Ultralytics model, the others as torchvision's."""
    return ("ultralytics", "onnx", "jax") if arch.startswith("yolov8") else ("torch", "onnx", "jax")


def check_format(model: Model, fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown --format={fmt}; choose one of {', '.join(FORMATS)}")
    if fmt not in formats(model.arch):
        raise UserError(f"{model.arch} cannot be exported as {fmt}: choose --format="
                        f"{'|'.join(formats(model.arch))}")
    if fmt in ("ultralytics", "onnx") and getattr(model.spec, "fused", False):
        raise UserError(f"{model.arch} has its BatchNorms fused, which Ultralytics cannot train or save; "
                        "export the model converted without --fuse")


def parse_input_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise UserError(f"--input_shape={text} is not B,H,W,3 (positive integers, 3 channels), e.g. 1,224,224,3")
    return shape


def input_shape(model: Model, given: str | None, fmt: str = "jax") -> tuple[int, int, int, int]:
    """The preprocessed input shape ``(B, H, W, 3)``: ``given``, or the one the model's preprocessing fixes
    (a classifier's crop, YOLOv8's square ``imgsz``) with batch 1. R-CNN inputs take each image's own size:
    the ``jax`` format needs the padded shape given; their ONNX takes any image, traced at ``min_size``."""
    architecture = models.get_architecture(model.arch)
    preprocess = model.meta.get("preprocess") or {}
    rcnn = architecture.task == "detection" and not model.arch.startswith("yolov8")
    if given:
        shape = parse_input_shape(given)
    elif architecture.task == "classification" and "crop" in preprocess:
        shape = (1, preprocess["crop"], preprocess["crop"], 3)
    elif model.arch.startswith("yolov8") and "imgsz" in preprocess:
        shape = (1, preprocess["imgsz"], preprocess["imgsz"], 3)
    elif rcnn and fmt == "onnx":
        shape = (1, model.spec.transform.min_size, model.spec.transform.min_size, 3)
    else:
        raise UserError(f"{model.arch}'s preprocessing gives each image its own input shape: pass "
                        "--input_shape=B,H,W,3 (the padded batch the exported function takes)")
    if rcnn and fmt == "onnx" and shape[0] != 1:
        raise UserError(f"{model.arch}'s ONNX takes one image per call: give --input_shape=1,H,W,3")
    padded = architecture.task == "detection" and not (rcnn and fmt == "onnx")  # an R-CNN's ONNX pads itself
    if padded and (shape[1] % STRIDE or shape[2] % STRIDE):
        raise UserError(f"--input_shape H and W must be multiples of {STRIDE} for {model.arch}, got {shape[1]}x{shape[2]}")
    return shape


def export_model(model: Model, fmt: str, out: str, given_shape: str | None = None, overwrite: bool = False) -> None:
    """Write ``model`` to ``out`` as ``fmt``, after checking every input; the torch-based formats through
    ``converters.export`` (torch, with Ultralytics for YOLOv8)."""
    check_format(model, fmt)
    if os.path.isdir(out) or (os.path.exists(out) and not overwrite):
        raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
    shape = input_shape(model, given_shape, fmt) if fmt in ("jax", "onnx") else None
    if fmt == "jax":
        export_jax(model, out, shape)
        return
    try:
        from converters import export as torch_export
        if fmt == "ultralytics" or model.arch.startswith("yolov8"):
            import ultralytics  # noqa: F401
        if fmt == "onnx":
            import onnx  # noqa: F401
    except ImportError as e:
        extra = {"torch": "torch", "torchvision": "torch", "ultralytics": "yolo"}.get(e.name, "dev")
        raise UserError(f"--format={fmt} needs {e.name}; install it with `pip install -e '.[{extra}]'`") from None
    if fmt == "torch":
        torch_export.export_torch(model, out)
    elif fmt == "ultralytics":
        torch_export.export_ultralytics(model, out)
    else:
        torch_export.export_onnx(model, out, shape)


def inference_function(model: Model):
    """``f(variables, images)`` -> the model's outputs: logits, or a detector's padded detections."""
    architecture = models.get_architecture(model.arch)
    if architecture.pipeline is not None:
        return architecture.pipeline(model).forward
    return model.module.apply


def export_jax(model: Model, out: str, shape: tuple[int, int, int, int]) -> None:
    """Write the jitted inference function for ``shape`` inputs and its parameters to ``out`` (see the module doc)."""
    variables = {k: v for k, v in model.variables.items() if k in ("params", "batch_stats")}
    leaves, tree = jax.tree_util.tree_flatten(variables)
    forward = inference_function(model)
    function = jax.jit(lambda params, images: forward(jax.tree_util.tree_unflatten(tree, params), images))
    exported = jax.export.export(function)(
        [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves],
        jax.ShapeDtypeStruct(shape, jnp.float32))
    info = {"arch": model.arch, "input_shape": list(shape), "preprocess": model.meta.get("preprocess"),
            "categories": model.meta.get("categories"), "jax": jax.__version__}
    arrays = {"exported": np.frombuffer(exported.serialize(), np.uint8), "num_params": np.asarray(len(leaves)),
              "info": np.asarray(json.dumps(info)), **{f"param_{i}": np.asarray(x) for i, x in enumerate(leaves)}}
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to the name
        np.savez(f, **arrays)

"""Pruned models leave the project (``xprune export``) and run elsewhere as they ran here.

Every architecture is pruned for real (``remove+shrink`` at -30% FLOPs: blocks removed, channel groups
narrowed, ShuffleNetV2's routing rewritten, YOLOv8's C2f halves made unequal), exported, read back by
the other ecosystem and compared with the JAX model on real COCO images: torchvision modules from
``converters.load_pruned`` (logits to 1e-4, detections box for box), an Ultralytics checkpoint through
``YOLO(path)`` (outputs, ``val()`` AP against ``xprune eval`` on the synthetic split, two epochs of
``train()`` that keep the pruned widths, ``export(format="onnx")``), ONNX in onnxruntime, and the
``jax.export`` artifact in a fresh process that never imports this package. Inputs are tiny (64 px
classifiers, 128-192 px R-CNNs, 64-256 px YOLOv8) to keep the run short.
"""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import converters
from converters.reference import relative_error
from tests.test_rcnn import _matched
from xprune_jax import analysis, models, tree_paths
from xprune_jax.attribution.criteria import ScoringInputs, get_criterion
from xprune_jax.checkpoint import Model, model_fingerprint, save_model
from xprune_jax.errors import UserError
from xprune_jax.export import export_model
from xprune_jax.models.yolov8_pipeline import YOLOv8Pipeline
from xprune_jax.pruning.plan import apply_plan, make_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "xprune_jax", "data", "demo_shapes")
YOLO_FIXTURE = os.path.join(REPO, "benchmarks", "fixtures", "yolov8n_shapes.pt")
CLASSIFIERS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"]
SIZE = 64  # classifier inputs
RCNN_TRANSFORM = {"min_size": 128, "max_size": 192}
# Random R-CNN heads made to behave like trained ones: small box deltas (boxes stay boxes), spread scores.
RCNN_HEAD_GAINS = {"retinanet_resnet50_fpn": {"head.regression_head.bbox_reg": 0.01},
                   "fasterrcnn_resnet50_fpn": {"rpn.head.bbox_pred": 0.01, "roi_heads.box_predictor.bbox_pred": 0.01},
                   "fasterrcnn_mobilenet_v3_large_fpn": {"rpn.head.bbox_pred": 0.01, "roi_heads.box_predictor.bbox_pred": 0.01,
                                                         "roi_heads.box_predictor.cls_score": 10.0}}


def _random_variables(arch: str, spec, size: int, seed: int) -> dict:
    """Kernels with unit-variance outputs, random BN affine and statistics (no compilation needed)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        key = path[-1].key
        if key == "kernel":
            return rng.normal(0, 1 / math.sqrt(math.prod(shape.shape[:-1])), shape.shape).astype(np.float32)
        if key in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
        return rng.normal(0, 0.1, shape.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, models.variable_shapes(arch, spec, size))


def _scores(model: Model, criterion: str, seed: int = 0) -> dict:
    """A score file of a data-free criterion (tests/test_pruning.py's ``score_model_like``, any criterion)."""
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))  # the planner's trace
    scores = get_criterion(criterion)(ScoringInputs(layers, model.variables["params"], seed=seed))
    return {"criterion": criterion, "arch": model.arch, "model_fingerprint": model_fingerprint(model), "layers": [
        {"name": l.name, "score": scores[l.name].score, "channel_scores":
         None if scores[l.name].channel_scores is None else list(scores[l.name].channel_scores)} for l in layers]}


def _prune(model: Model, criterion: str = "random") -> Model:
    plan = make_plan(model, _scores(model, criterion, seed=1), "remove+shrink", "flops=-30%")
    assert plan.removed and plan.keep_channels, "a real cut: blocks removed and channels narrowed"
    return apply_plan(model, plan)


@functools.lru_cache(maxsize=None)
def _pruned_classifier(arch: str) -> Model:
    spec = models.get_architecture(arch).default_spec()
    meta = {"preprocess": {"resize": SIZE, "crop": SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "categories": [str(i) for i in range(spec.num_classes)]}
    return _prune(Model(arch, spec, _random_variables(arch, spec, SIZE, seed=2), meta))


@functools.lru_cache(maxsize=None)
def _pruned_rcnn(arch: str) -> Model:
    spec = models.get_architecture(arch).default_spec()
    variables = _random_variables(arch, spec, 256, seed=5)
    for layer, gain in RCNN_HEAD_GAINS[arch].items():
        tree_paths.get(variables["params"], layer)["kernel"] *= gain
    pruned = _prune(Model(arch, spec, variables, {"preprocess": {"crop": 256}}))
    small = dataclasses.replace(pruned.spec.transform, **RCNN_TRANSFORM)
    return dataclasses.replace(pruned, spec=dataclasses.replace(pruned.spec, transform=small))


@functools.lru_cache(maxsize=None)
def _jit(function):
    return jax.jit(function)


@pytest.fixture(scope="module")
def images(coco_images) -> np.ndarray:
    """Two real COCO images, resized to SIZE and normalised: NHWC float32."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return np.stack([(np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE)), np.float32) / 255 - mean) / std
                     for p in (coco_images[5], coco_images[9])])


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_torch_file_gives_the_jax_logits(arch, images, tmp_path):
    model = _pruned_classifier(arch)
    if arch.startswith("shufflenet"):  # the channel routing that torchvision's own unit cannot do
        assert any(name.endswith((".left", ".right", ".order")) for name, _ in model.spec.edits.channels)
    export_model(model, "torch", str(tmp_path / "pruned.pt"))
    data = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert data["arch"] == arch and data["preprocess"]["crop"] == SIZE and len(data["categories"]) == 1000
    module = converters.load_pruned(str(tmp_path / "pruned.pt"))
    with torch.no_grad():
        got = module(_nchw(images)).numpy()
    want = np.asarray(_jit(model.module.apply)(model.variables, images))
    assert relative_error(got, want) < 1e-4


def test_onnx_classifier_runs_in_onnxruntime(images, tmp_path):
    import onnxruntime

    model = _pruned_classifier("shufflenet_v2_x0_5")
    export_model(model, "onnx", str(tmp_path / "pruned.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "pruned.onnx"))
    (got,) = session.run(None, {"images": np.ascontiguousarray(images.transpose(0, 3, 1, 2))})  # batch 2: dynamic
    assert relative_error(got, np.asarray(_jit(model.module.apply)(model.variables, images))) < 1e-4


@pytest.mark.parametrize("arch", list(RCNN_HEAD_GAINS))
def test_torch_detector_gives_the_jax_detections_box_for_box(arch, coco_images, tmp_path):
    model = _pruned_rcnn(arch)
    export_model(model, "torch", str(tmp_path / "pruned.pt"))
    module = converters.load_pruned(str(tmp_path / "pruned.pt"))
    pipeline = models.get_architecture(arch).pipeline(model)
    loaded = [np.array(Image.open(p).convert("RGB")) for p in coco_images[:12]]
    loaded = [image for image in loaded if image.shape[1] > image.shape[0]][:2]  # landscape: one padded shape
    for plan in pipeline.plan([image.shape[:2] for image in loaded], batch_size=2):
        arrays, metas = zip(*(pipeline.preprocess(loaded[i], plan.input_shape) for i in plan.indices))
        out = jax.tree_util.tree_map(np.asarray, _jit(pipeline.forward)(model.variables, np.stack(arrays)))
        with torch.no_grad():
            wanted = module([torch.from_numpy(loaded[i]).permute(2, 0, 1).float() / 255 for i in plan.indices])
        for j, meta in enumerate(metas):
            valid = out["valid"][j]
            got = {"boxes": pipeline.to_original(out["boxes"][j][valid], meta), "scores": out["scores"][j][valid],
                   "labels": out["labels"][j][valid]}
            want = {k: v.numpy() for k, v in wanted[j].items()}
            assert len(want["boxes"]) > 10 and len(got["boxes"]) == len(want["boxes"])
            assert min(_matched(want, got)) >= 0.99


# --- YOLOv8 through Ultralytics ------------------------------------------------------------------


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """The trained fixture pruned by BN scale (so its AP stays meaningful), exported for Ultralytics,
    and the synthetic demo split in Ultralytics' layout (YOLO txt labels, data yaml)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from converters.ultralytics_io import convert

    folder = tmp_path_factory.mktemp("yolo")
    pruned = _prune(convert("yolov8n", YOLO_FIXTURE), "bn_scale")
    channels = dict(pruned.spec.edits.channels)
    halves = [[len(channels.get(f"{c.name}.{half}", range(width))) for half, width in (("first", c.first or c.hidden),
                                                                                        ("second", c.hidden))]
              for c in pruned.spec.c2fs]
    assert any(first != second for first, second in halves), "unequal C2f halves: Ultralytics' C3f"
    path = str(folder / "pruned.pt")
    export_model(pruned, "ultralytics", path)
    return pruned, path, _yolo_dataset(SHAPES, folder / "data"), folder


def _yolo_dataset(root: str, out) -> str:
    """The COCO-json dataset in Ultralytics' layout (images linked, class = category_id - 1); its data yaml."""
    names = None
    for split in ("train", "val"):
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json")) as f:
            coco = json.load(f)
        names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        boxes = {}
        for a in coco["annotations"]:
            boxes.setdefault(a["image_id"], []).append(a)
        for image in coco["images"]:
            (out / "images" / split / image["file_name"]).symlink_to(os.path.join(root, f"{split}2017", image["file_name"]))
            w, h = image["width"], image["height"]
            lines = [f"{a['category_id'] - 1} {(a['bbox'][0] + a['bbox'][2] / 2) / w} {(a['bbox'][1] + a['bbox'][3] / 2) / h} "
                     f"{a['bbox'][2] / w} {a['bbox'][3] / h}\n" for a in boxes.get(image["id"], [])]
            (out / "labels" / split / (os.path.splitext(image["file_name"])[0] + ".txt")).write_text("".join(lines))
    (out / "data.yaml").write_text(f"path: {out}\ntrain: images/train\nval: images/val\nnames:\n" +
                                   "".join(f"  {i}: {name}\n" for i, name in enumerate(names)))
    return str(out / "data.yaml")


def _half(variables: dict) -> dict:
    """The variables as the fp16 release layout stores them."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), variables)


def _letterboxed(coco_images, imgsz: int) -> np.ndarray:
    pipeline = YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec(), imgsz=imgsz)
    return np.stack([pipeline.preprocess(np.asarray(Image.open(p).convert("RGB")), (imgsz, imgsz))[0]
                     for p in coco_images[:2]])


def test_ultralytics_file_is_a_release_layout_yolo_model_with_the_jax_outputs(yolo, coco_images):
    from ultralytics import YOLO
    from ultralytics.nn.tasks import torch_safe_load

    pruned, path, _, _ = yolo
    checkpoint, _ = torch_safe_load(path, safe_only=True)  # Ultralytics' weights_only loader and allow-list
    assert all(p.dtype == torch.float16 for p in checkpoint["model"].parameters())
    assert checkpoint["train_args"]["imgsz"] == 256 and checkpoint["model"].names == dict(enumerate(pruned.meta["categories"]))
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert all(g.startswith(("torch.nn.modules.", "ultralytics.nn.", "collections.OrderedDict", "torch._utils"))
               for g in unsafe), unsafe
    model = YOLO(path)
    x = _letterboxed(coco_images, 160)
    with torch.no_grad():
        got = model.model.eval()(_nchw(x))[0].numpy()
    want = np.asarray(_jit(pruned.module.apply)(_half(pruned.variables), x))
    assert relative_error(got[:, :4], want[:, :4]) < 1e-4 and relative_error(got[:, 4:], want[:, 4:]) < 1e-4
    result = model.predict(str(coco_images[0]), imgsz=160, conf=0.001, verbose=False)[0]
    assert len(result.boxes) > 0


def test_ultralytics_model_of_an_unpruned_spec_keeps_the_standard_yaml():
    """Ultralytics' own trainer rebuilds it as it is, so no trainer of ours is needed."""
    from converters.pruned_yolo import SPEC_KEY, build_detection_model
    from xprune_jax.spec import spec_to_dict

    yaml = build_detection_model(json.loads(json.dumps(spec_to_dict(models.get_architecture("yolov8n").default_spec()))), {}).yaml
    assert SPEC_KEY not in yaml and yaml["scale"] == "n"


def test_ultralytics_val_gives_the_xprune_eval_ap(yolo):
    from ultralytics import YOLO

    from xprune_jax.evaluation.coco import evaluate

    pruned, path, data, folder = yolo
    ours = evaluate(pruned, SHAPES, str(folder / "eval"), batch_size=8, progress=False)
    theirs = YOLO(path).val(data=data, imgsz=256, batch=8, device="cpu", workers=0, plots=False, verbose=False,
                            project=str(folder / "runs"), name="val")
    assert ours["AP"] > 0.2, "a pruned model that still detects: the comparison means something"
    assert theirs.box.map == pytest.approx(ours["AP"], abs=0.005)


def test_ultralytics_train_keeps_the_pruned_widths(yolo):
    from ultralytics import YOLO

    from converters.pruned_yolo import PrunedDetectionTrainer

    _, path, data, folder = yolo
    settings = dict(data=data, epochs=2, imgsz=64, batch=8, device="cpu", workers=0, plots=False, amp=False, val=False,
                    project=str(folder / "runs"), exist_ok=True, verbose=False)
    with pytest.raises(KeyError, match="PrunedDetectionTrainer"):  # DetectionTrainer would rebuild it unpruned
        YOLO(path).train(name="plain", **settings)
    model = YOLO(path)
    before = {k: v.shape for k, v in model.model.state_dict().items()}
    model.train(trainer=PrunedDetectionTrainer, name="pruned", **settings)
    trained = YOLO(str(folder / "runs" / "pruned" / "weights" / "last.pt"))
    assert {k: v.shape for k, v in trained.model.state_dict().items()} == before
    assert any(not torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(),  # it trained
                                                     YOLO(path).model.state_dict().values()))


def test_yolo_onnx_runs_in_onnxruntime(yolo, coco_images, tmp_path):
    import onnxruntime

    pruned = yolo[0]
    export_model(pruned, "onnx", str(tmp_path / "pruned.onnx"), "1,160,160,3")
    session = onnxruntime.InferenceSession(str(tmp_path / "pruned.onnx"))
    x = _letterboxed(coco_images, 160)[:1]
    (got,) = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
    want = np.asarray(_jit(pruned.module.apply)(_half(pruned.variables), x))
    assert relative_error(got[:, :4], want[:, :4]) < 1e-4 and relative_error(got[:, 4:], want[:, 4:]) < 1e-4


# --- jax.export, and loading without this package ------------------------------------------------

FRESH_PROCESS = """
import sys

import numpy as np
import torch

from converters import load_pruned

torch_file, classifier, classifier_x, detector, detector_x, out = sys.argv[1:]
module = load_pruned(torch_file)
with torch.no_grad():
    outputs = {"torch": module(torch.from_numpy(np.load(classifier_x)).permute(0, 3, 1, 2)).numpy()}
assert not {"jax", "flax", "xprune_jax"} & {name.split(".")[0] for name in sys.modules}, "load_pruned imported JAX"

import jax


def call(path, x):
    with np.load(path) as f:
        exported = jax.export.deserialize(bytearray(f["exported"]))
        params = [f[f"param_{i}"] for i in range(int(f["num_params"]))]
    return exported.call(params, x)


outputs["jax"] = np.asarray(call(classifier, np.load(classifier_x)))
outputs.update({k: np.asarray(v) for k, v in call(detector, np.load(detector_x)).items()})
assert "xprune_jax" not in sys.modules
np.savez(out, **outputs)
"""


def test_torch_file_and_jax_artifacts_run_without_this_package(images, yolo, coco_images, tmp_path):
    """A fresh process, where only the loader's two files are importable, loads the torch file with torch
    alone, then calls the jax.export artifacts (a classifier's logits, YOLOv8's detections after NMS)
    with JAX alone."""
    classifier, detector = _pruned_classifier("resnet18"), yolo[0]
    x = _letterboxed(coco_images, 160)
    export_model(classifier, "torch", str(tmp_path / "c.pt"))
    export_model(classifier, "jax", str(tmp_path / "c.npz"), "2,64,64,3")
    export_model(detector, "jax", str(tmp_path / "d.npz"), "2,160,160,3")
    np.save(tmp_path / "c.npy", images)
    np.save(tmp_path / "d.npy", x)
    (tmp_path / "site" / "converters").mkdir(parents=True)
    for name in ("__init__.py", "pruned.py"):
        (tmp_path / "site" / "converters" / name).write_text(open(os.path.join(REPO, "converters", name)).read())
    files = [str(tmp_path / name) for name in ("c.pt", "c.npz", "c.npy", "d.npz", "d.npy", "out.npz")]
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, *files], cwd=tmp_path, check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
                       [str(tmp_path / "site")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                   if p and os.path.abspath(p) != REPO])})
    with np.load(tmp_path / "out.npz") as out:
        want = np.asarray(_jit(classifier.module.apply)(classifier.variables, images))
        assert relative_error(out["torch"], want) < 1e-4 and relative_error(out["jax"], want) < 1e-5
        pipeline = models.get_architecture("yolov8n").pipeline(detector)
        detections = jax.tree_util.tree_map(np.asarray, _jit(pipeline.forward)(detector.variables, x))
        assert detections["valid"].sum() > 0
        for key, value in detections.items():
            np.testing.assert_allclose(out[key], value, rtol=1e-5, atol=1e-3, err_msg=key)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, fmt, shape, message", [
    ("resnet18", "ultralytics", None, "resnet18 cannot be exported as ultralytics: choose --format=torch|onnx|jax"),
    ("yolov8n", "torch", None, "yolov8n cannot be exported as torch: choose --format=ultralytics|onnx|jax"),
    ("fasterrcnn_resnet50_fpn", "jax", None, "pass --input_shape=B,H,W,3"),
    ("retinanet_resnet50_fpn", "jax", "1,100,128,3", "must be multiples of 32"),
    ("resnet18", "jax", "1,64,64", "is not B,H,W,3"),
    ("fasterrcnn_resnet50_fpn", "onnx", "2,128,128,3", "takes one image per call"),
    ("resnet18", "torch", None, "already exists: choose another --out or pass --overwrite"),
])
def test_export_errors_name_the_fix(arch, fmt, shape, message, tmp_path):
    """Checked before any work: the unpruned architecture's default spec is enough."""
    spec = models.get_architecture(arch).default_spec()
    (tmp_path / "taken").write_bytes(b"")
    out = str(tmp_path / ("taken" if "exists" in message else "out"))
    with pytest.raises(UserError, match=message.replace("|", r"\|")):
        export_model(Model(arch, spec, {}, {"preprocess": {}}), fmt, out, shape)


def test_export_command_errors_are_one_line_with_exit_status_2(tmp_path):
    save_model(_pruned_classifier("resnet18"), str(tmp_path / "model"))
    result = subprocess.run([sys.executable, "-m", "xprune_jax", "export", f"--model={tmp_path / 'model'}",
                             "--format=ultralytics", f"--out={tmp_path / 'x.pt'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "resnet18 cannot be exported as ultralytics: choose --format=torch|onnx|jax" in result.stderr

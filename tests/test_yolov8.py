"""YOLOv8 parity with Ultralytics 8.4, through the real path: an Ultralytics DetectionModel with random
weights and BN statistics -> a .pt file laid out like the official release (fp16 whole module) ->
convert -> Orbax model dir -> load -> jitted apply, compared with the torch model read back from the
same file in float32, on real COCO images. The validation pipeline (rect batches, letterbox, NMS,
box scaling) is compared with Ultralytics' own code, and the predict pipeline with ``YOLO(file).predict``."""

import copy
import dataclasses
import functools
import json
import types

import cv2
import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.data.base import BaseDataset
from ultralytics.data.converter import coco80_to_coco91_class
from ultralytics.nn.tasks import DetectionModel, parse_model, yaml_model_load
from ultralytics.utils import downloads
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import scale_boxes
from ultralytics.utils.patches import imread

from converters.mapping import state_dict_to_variables
from converters.reference import gradient_x_activation, outputs_by_name, randomize_batch_norm, relative_error
from converters.ultralytics_io import DFL_KEY, convert
from tests.conftest import optimised
from tests.pseudo_ground_truth import pseudo_ground_truth
from tests.test_errors import RunsCode
from xprune_jax import models
from xprune_jax.checkpoint import load_model, save_model
from xprune_jax.evaluation.coco import (coco_metrics, evaluate, evaluation_images, evaluation_record, load_ground_truth,
                                         predict_folder)
from xprune_jax.errors import UserError
from xprune_jax.models.yolov8_pipeline import COCO80_TO_COCO91, YOLOv8Pipeline, YOLOv8PredictPipeline
from xprune_jax.ops import box_iou

IMGSZ = 320  # small inputs keep the CPU test fast; the code paths are those of 640
CLASS_BIAS = -5.0  # mean class logit bias: random heads then score like trained ones (many boxes above conf 0.001)
PREDICT_BIAS_SHIFT = 2.0  # added for predict's conf 0.25: hundreds of boxes per image pass it, few classes


@functools.lru_cache(maxsize=None)
def _apply(module):
    return jax.jit(functools.partial(models.apply_with_intermediates, module))


@functools.lru_cache(maxsize=None)
def _forward(pipeline):
    return jax.jit(pipeline.forward)


def _save_like_official(model: torch.nn.Module, path) -> None:
    """The layout of the release files (``strip_optimizer``): the whole module in fp16 under ``model``."""
    torch.save({"date": "2024-01-01T00:00:00", "version": "8.4.190", "license": "AGPL-3.0 License",
                "docs": "https://docs.ultralytics.com", "epoch": -1, "best_fitness": None,
                "model": copy.deepcopy(model).half(), "ema": None, "updates": None, "optimizer": None,
                "train_args": {"model": "yolov8n.yaml", "data": "coco.yaml", "imgsz": 640, "batch": 16},
                "train_metrics": {}, "train_results": {}}, path)


@pytest.fixture(scope="module")
def batch(coco_images):
    """Three real landscape COCO images letterboxed by the pipeline into one rectangular batch."""
    loaded = [(p, np.asarray(Image.open(p).convert("RGB"))) for p in coco_images[:12]]
    paths, images = zip(*[(p, im) for p, im in loaded if im.shape[1] > im.shape[0]][:3])
    pipeline = YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec(), imgsz=IMGSZ)
    (plan,) = pipeline.plan([im.shape[:2] for im in images], batch_size=4)
    arrays, metas = zip(*(pipeline.preprocess(images[i], plan.input_shape) for i in plan.indices))
    return types.SimpleNamespace(x=np.stack(arrays), metas=metas, shape=plan.input_shape,
                                 nchw=torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2),
                                 paths=[paths[i] for i in plan.indices])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, batch):
    """scale -> (official-layout .pt file of random YOLOv8 weights, torch model read back from it in float32)."""
    made = {}

    def make(scale: str):
        if scale not in made:
            seed = "nsmlx".index(scale)
            torch.manual_seed(seed)
            model = randomize_batch_norm(DetectionModel(f"yolov8{scale}.yaml", verbose=False), batch.nchw, seed)
            with torch.no_grad():
                for branch in model.model[22].cv3:
                    branch[2].bias.normal_(CLASS_BIAS, 1.0)
            path = tmp_path_factory.mktemp(f"yolov8{scale}") / f"yolov8{scale}.pt"
            _save_like_official(model, path)
            made[scale] = path, torch.load(path, weights_only=False)["model"].float().eval()
        return made[scale]

    return make


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """scale -> the model converted from its checkpoint file, saved as a model dir and loaded back."""
    made = {}

    def make(scale: str):
        if scale not in made:
            out = tmp_path_factory.mktemp(f"yolov8{scale}_model") / "model"
            save_model(convert(f"yolov8{scale}", str(checkpoint(scale)[0])), str(out))
            made[scale] = load_model(str(out))
        return made[scale]

    return make


def _assert_head_output_matches(got, want):
    assert got.shape == want.shape
    assert relative_error(got[:, :4], want[:, :4]) < 1e-4, "boxes"
    assert relative_error(got[:, 4:], want[:, 4:]) < 1e-4, "class scores"


@pytest.mark.parametrize("scale", ["n", "s"])
def test_every_layer_and_head_output_match_ultralytics(scale, checkpoint, converted, batch):
    _, torch_model = checkpoint(scale)
    model = converted(scale)
    out, acts = _apply(model.module)(model.variables, batch.x)
    (torch_out, _), torch_acts = outputs_by_name(torch_model, [n for n in acts if n != "model.22"], batch.nchw)
    assert len(acts) > 80 and {"model.0.conv", "model.2.m.0", "model.9", "model.22.cv3.2.2", "model.22"} <= set(acts)
    errors = {name: relative_error(acts[name], torch_acts[name]) for name in torch_acts}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"
    _assert_head_output_matches(np.asarray(out), torch_out.numpy())
    np.testing.assert_array_equal(acts["model.22"], np.swapaxes(out, 1, 2))  # captured channels-last


def test_model_dir_records_provenance(converted, checkpoint):
    model = converted("n")
    prov = model.meta["provenance"]
    assert model.arch == "yolov8n" and model.spec.scale == "n" and not model.spec.fused
    assert prov["source"] == "ultralytics" and prov["scale"] == "n" and len(prov["sha256"]) == 64
    assert prov["file"] == str(checkpoint("n")[0]) and prov["checkpoint_ultralytics_version"] == "8.4.190"
    assert model.meta["preprocess"]["imgsz"] == 640 and len(model.meta["categories"]) == 80
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(model.variables))


@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["above_max_nms", "below_max_nms"])
def test_detections_match_ultralytics_validation(bias_shift, checkpoint, converted, batch):
    """conf 0.001, IoU 0.7, multi-label, 300 per image, boxes scaled back to the original images.

    The class bias makes about 140k box-class pairs pass conf per image (so the 30000 cap applies);
    shifted by -3, about 23k (the cap does not)."""
    torch_model = copy.deepcopy(checkpoint("n")[1])
    model = converted("n")
    variables = jax.tree_util.tree_map(np.array, model.variables)
    with torch.no_grad():
        for i, branch in enumerate(torch_model.model[22].cv3):
            branch[2].bias += bias_shift
            variables["params"]["model.22"][f"cv3.{i}.2"]["bias"] = branch[2].bias.numpy().copy()
    pipeline = YOLOv8Pipeline(model.spec, imgsz=IMGSZ)
    out = jax.tree_util.tree_map(np.asarray, _forward(pipeline)(variables, batch.x))
    with torch.no_grad():
        reference = non_max_suppression(torch_model(batch.nchw)[0], 0.001, 0.7, multi_label=True, max_det=300,
                                        max_time_img=1e3)
    coco91 = np.asarray(coco80_to_coco91_class())
    matched = total = 0
    for i, (want, meta) in enumerate(zip(reference, batch.metas)):
        want_boxes = scale_boxes(batch.shape, want[:, :4].clone(), meta.original_shape,
                                 ratio_pad=(meta.gain, meta.pad)).numpy()
        valid = out["valid"][i]
        boxes = pipeline.to_original(out["boxes"][i][valid], meta)
        assert 200 <= len(want) == valid.sum()
        iou = np.asarray(box_iou(want_boxes, boxes))
        same = ((coco91[want[:, 5].numpy().astype(int)][:, None] == out["labels"][i][valid][None])
                & (np.abs(want[:, 4].numpy()[:, None] - out["scores"][i][valid][None]) <= 1e-3))
        matched += int(np.sum(np.any(same & (iou >= 0.99), axis=1)))
        total += len(want)
    assert matched >= 0.99 * total, f"{matched} of {total} Ultralytics detections matched"


def test_fused_conversion_matches_unfused(checkpoint, converted, batch):
    path, torch_model = checkpoint("n")
    fused = convert(None, str(path), fuse=True)
    assert fused.spec.fused and set(fused.variables) == {"params"}
    assert set(fused.variables["params"]["model.0"]["conv"]) == {"kernel", "bias"}
    out, acts = _apply(fused.module)(fused.variables, batch.x)
    with torch.no_grad():
        torch_out = torch_model(batch.nchw)[0].numpy()
    _assert_head_output_matches(np.asarray(out), torch_out)
    fused_torch = copy.deepcopy(torch_model).fuse(verbose=False)
    _, torch_acts = outputs_by_name(fused_torch, ["model.4.m.1.cv2.conv", "model.21"], batch.nchw)
    for name, want in torch_acts.items():  # the fused convs output what Ultralytics' fused convs do
        assert relative_error(acts[name], want) < 1e-4, name


@pytest.mark.parametrize("imgsz", [320, 800], ids=["shrink", "enlarge"])
def test_preprocess_matches_ultralytics_loader_and_letterbox(imgsz, coco_images):
    pipeline = YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec(), imgsz=imgsz)
    for path in coco_images[:3]:
        loader = types.SimpleNamespace(ims=[None], im_files=[str(path)], npy_files=[path.with_suffix(".none.npy")],
                                       cache=None, channels=3, cv2_flag=cv2.IMREAD_COLOR, imgsz=imgsz, augment=False)
        image, original, resized = BaseDataset.load_image(loader, 0)
        shape = tuple(int(s) for s in pipeline.plan([original], 1)[0].input_shape)
        labels = LetterBox(new_shape=imgsz, scaleup=False)(
            {"img": image, "rect_shape": shape, "ratio_pad": (resized[0] / original[0], resized[1] / original[1])})
        got, meta = pipeline.preprocess(imread(str(path))[..., ::-1], shape)
        np.testing.assert_array_equal(got, labels["img"][..., ::-1].astype(np.float32) / 255.0)
        assert (meta.gain, meta.pad, meta.original_shape) == (*labels["ratio_pad"], original)


@pytest.mark.parametrize("imgsz,batch_size", [(640, 16), (320, 5)])
def test_rect_batches_match_ultralytics(imgsz, batch_size, coco_images):
    sizes = []
    for path in coco_images:
        with Image.open(path) as im:
            sizes.append(im.size[::-1])
    dataset = types.SimpleNamespace(ni=len(sizes), batch_size=batch_size, labels=[{"shape": s} for s in sizes],
                                    im_files=list(range(len(sizes))), imgsz=imgsz, stride=32, pad=0.5)
    BaseDataset.set_rectangle(dataset)
    plans = YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec(), imgsz=imgsz).plan(sizes, batch_size)
    assert [i for plan in plans for i in plan.indices] == dataset.im_files
    assert [plan.input_shape for plan in plans] == [tuple(s) for s in dataset.batch_shapes.tolist()]
    assert len({plan.input_shape for plan in plans}) > 1


@pytest.mark.parametrize("imgsz", [320, 640])
def test_predict_letterbox_and_box_scaling_match_ultralytics_predictor(imgsz, coco_images):
    """Each image alone through ``LetterBox(auto=True)`` (shrunk, enlarged, thin) and its boxes back
    through ``scale_boxes`` without ``ratio_pad``: at 200x333 the latter's gain is not the letterbox's."""
    pipeline = YOLOv8PredictPipeline(models.get_architecture("yolov8n").default_spec(), imgsz=imgsz)
    real = [imread(str(p)) for p in coco_images[:3]]
    images = real + [cv2.resize(real[0], (333, 200)), cv2.resize(real[1], (900, 5))]
    rng = np.random.default_rng(0)
    for bgr in images:
        want = LetterBox(imgsz, auto=True, stride=32)(image=bgr)
        (plan,) = pipeline.plan([bgr.shape[:2]], 1)
        assert plan.input_shape == want.shape[:2]
        got, meta = pipeline.preprocess(bgr[..., ::-1], plan.input_shape)
        np.testing.assert_array_equal(got, want[..., ::-1].astype(np.float32) / 255.0)
        corners = np.sort(rng.uniform(0, 1, (2, 50, 2)) * plan.input_shape[::-1], axis=0)
        boxes = np.concatenate(corners, axis=1).astype(np.float32)
        want_boxes = scale_boxes(plan.input_shape, torch.from_numpy(boxes.copy()), bgr.shape[:2]).numpy()
        np.testing.assert_allclose(pipeline.to_original(boxes, meta), want_boxes, rtol=0, atol=1e-3)
    sizes = [im.shape[:2] for im in images]
    for batch_size in (1, 2, 5):  # each image at its own shape, whatever its neighbours
        plans = pipeline.plan(sizes, batch_size)
        assert sorted(i for p in plans for i in p.indices) == list(range(len(sizes)))
        assert all(p.input_shape == pipeline.plan([sizes[i]], 1)[0].input_shape for p in plans for i in p.indices)


@pytest.fixture(scope="module")
def predict_checkpoint(checkpoint, tmp_path_factory):
    """An official-layout yolov8n file whose class scores reach predict's conf 0.25."""
    torch_model = copy.deepcopy(checkpoint("n")[1])
    with torch.no_grad():
        for branch in torch_model.model[22].cv3:
            branch[2].bias += PREDICT_BIAS_SHIFT
    path = tmp_path_factory.mktemp("yolov8n_predict") / "yolov8n.pt"
    _save_like_official(torch_model, path)
    return path


def _detections_by_file(entries: list[dict]) -> dict[str, dict]:
    by_file = {}
    for e in entries:
        by_file.setdefault(e["file_name"], []).append(e)
    return {name: {"boxes": np.asarray([[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in es)]),
                   "scores": np.asarray([e["score"] for e in es]), "labels": np.asarray([e["category_id"] for e in es])}
            for name, es in by_file.items()}


def test_predict_matches_ultralytics_predict_whatever_the_folder_and_batch_size(predict_checkpoint, coco_images,
                                                                                tmp_path):
    """``xprune predict`` gives each image what Ultralytics' ``YOLO(file).predict(image)`` gives (box for
    box: IoU > 0.99, the same class, the score within 1e-3 relative), and the same detections alone,
    in a folder of four and with batch sizes 1 and 4. The four share one predict input shape (two
    compilations), while the validator's rectangular batch of them is not the first one's alone."""
    model = convert("yolov8n", str(predict_checkpoint))
    model = dataclasses.replace(model, meta={**model.meta, "preprocess": {"imgsz": IMGSZ}})
    sizes = {p: Image.open(p).size[::-1] for p in coco_images}
    pipeline = YOLOv8PredictPipeline(model.spec, IMGSZ)
    same_shape = [p for p in coco_images if pipeline.input_shape(*sizes[p]) == pipeline.input_shape(*sizes[coco_images[0]])]
    first = min(same_shape, key=lambda p: sizes[p][0] / sizes[p][1])
    paths = [first] + [p for p in same_shape if p != first][:3]
    validator = YOLOv8Pipeline(model.spec, IMGSZ)
    assert validator.plan([sizes[first]], 1)[0].input_shape != validator.plan([sizes[p] for p in paths], 4)[0].input_shape
    four, alone = tmp_path / "four", tmp_path / "alone"
    for folder, chosen in ((four, paths), (alone, paths[:1])):
        folder.mkdir()
        for path in chosen:
            (folder / path.name).write_bytes(path.read_bytes())
    by_batch = {batch_size: predict_folder(model, str(four), batch_size, progress=False) for batch_size in (1, 4)}
    assert by_batch[1] == by_batch[4]
    alone_entries = predict_folder(model, str(alone), 1, progress=False)
    assert alone_entries == [e for e in by_batch[4] if e["file_name"] == first.name]

    ours, yolo, coco91 = _detections_by_file(by_batch[4]), YOLO(str(predict_checkpoint)), np.asarray(coco80_to_coco91_class())
    for path in paths:
        result = yolo.predict(str(path), imgsz=IMGSZ, verbose=False)[0].boxes
        want = {"boxes": result.xyxy.numpy(), "scores": result.conf.numpy(), "labels": coco91[result.cls.numpy().astype(int)]}
        got = ours[path.name]
        assert 100 <= len(want["boxes"]) == len(got["boxes"]) and len(set(want["labels"])) >= 3, path.name
        same = ((np.asarray(box_iou(want["boxes"], got["boxes"])) > 0.99) & (want["labels"][:, None] == got["labels"][None])
                & (np.abs(want["scores"][:, None] - got["scores"][None]) <= 1e-3 * want["scores"][:, None]))
        assert same.any(1).mean() >= 0.99 and same.any(0).mean() >= 0.99, path.name


def test_class_ids_map_to_coco91_like_ultralytics():
    assert list(COCO80_TO_COCO91) == coco80_to_coco91_class()


@pytest.mark.parametrize("scale", "nsmlx")
def test_every_scale_fits_ultralytics_state_dict(scale):
    """The spec derived from the scale constants gives Ultralytics' module tree, key for key and shape for shape."""
    arch = f"yolov8{scale}"
    layers, _ = parse_model(yaml_model_load(f"{arch}.yaml"), ch=3, verbose=False)  # DetectionModel's .model
    state_dict = {f"model.{k}": v.numpy() for k, v in layers.state_dict().items()}
    np.testing.assert_array_equal(state_dict.pop(DFL_KEY).reshape(-1), np.arange(16))
    spec = models.get_architecture(arch).default_spec()
    variables = state_dict_to_variables(state_dict, models.variable_shapes(arch, spec, input_size=64), arch)
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
    assert n_params == sum(v.size for k, v in state_dict.items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")))


def _save_like_trainer(ema: torch.nn.Module, path, older: bool) -> None:
    """The layout of ``BaseTrainer.save_model`` (Ultralytics 8.4.190): the fp16 EMA module (``ema``, changed
    here) with the trainer's ``args``, the optimizer state, metrics and run records. ``older``: as trainers
    before 8.4 left it, with the loss object on the EMA model, numpy scalars in ``best_fitness`` and the
    metrics, and a path pickled on Windows in ``train_args``."""
    import pathlib

    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace
    from ultralytics.utils.torch_utils import convert_optimizer_state_dict_to_fp16

    ema.float()
    ema.args = IterableSimpleNamespace(**DEFAULT_CFG_DICT)
    params = list(ema.parameters())[:6]  # the optimizer state of a few is the same kind of data, and cheaper
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # a state per parameter, values unchanged
    ema.criterion = ema.init_criterion() if older else None
    train_args = {**DEFAULT_CFG_DICT, "imgsz": 640}
    if older:
        train_args["save_dir"] = pathlib.PureWindowsPath("C:/runs/detect/train")
        train_args["save_dir"].__class__ = pathlib.WindowsPath  # pickled as on Windows: pathlib.WindowsPath
    torch.save({"epoch": 3, "best_fitness": np.float64(0.25) if older else 0.25,
                "stopper": {"best_fitness": 0.25, "best_epoch": 3}, "model": None, "ema": ema.half(), "updates": 12,
                "modelopt": None, "optimizer": convert_optimizer_state_dict_to_fp16(optimizer.state_dict()),
                "scaler": {}, "train_args": train_args,
                "train_metrics": {"metrics/mAP50-95(B)": 0.25, "fitness": np.float32(0.25) if older else 0.25},
                "train_results": {"epoch": [1, 2, 3], "train/box_loss": [1.5, 1.2, 1.1]},
                "date": "2026-01-01T00:00:00+00:00", "version": "8.4.190",
                "git": {"root": "/x", "branch": "main", "commit": "0" * 40, "message": None, "origin": None},
                "license": "AGPL-3.0 (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com"}, path)


def _save_with_pre_8_0_44_paths(model: torch.nn.Module, path) -> None:
    """A release-layout file of ``model`` (changed here) whose classes are pickled under early 8.0's module
    paths (``ultralytics.nn.modules.Conv``, ``ultralytics.yolo.utils.IterableSimpleNamespace``), as files
    made before 8.0.44 name them."""
    from ultralytics.nn import modules
    from ultralytics.nn.tasks import temporary_modules
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    from converters.ultralytics_io import _LEGACY_MODULES

    moved = {cls: cls.__module__ for cls in (modules.Conv, modules.C2f, modules.Bottleneck, modules.SPPF,
                                              modules.Concat, modules.Detect, modules.DFL)}
    moved[IterableSimpleNamespace] = IterableSimpleNamespace.__module__
    model.args = IterableSimpleNamespace(**DEFAULT_CFG_DICT)
    try:
        for cls in moved:
            cls.__module__ = "ultralytics.yolo.utils" if cls is IterableSimpleNamespace else "ultralytics.nn.modules"
        with temporary_modules(modules=_LEGACY_MODULES):  # pickle checks that the name finds the class
            torch.save({"model": model, "train_args": {"imgsz": 640}, "version": "8.0.20"}, path)
    finally:
        for cls, module_name in moved.items():
            cls.__module__ = module_name


@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint", "older_training_checkpoint",
                                    "pre_8_0_44_paths"])
def test_other_layouts_convert_like_the_release_file(layout, checkpoint, converted, tmp_path):
    """A plain state_dict file, training checkpoints (``model`` None, the weights under ``ema``) and a
    file with early 8.0's module paths: all read with weights_only and the allow-list."""
    module = torch.load(checkpoint("n")[0], weights_only=False)["model"]  # the test's own file
    path = tmp_path / "weights.pt"
    if layout == "state_dict":
        torch.save(module.state_dict(), path)
    elif layout == "pre_8_0_44_paths":
        _save_with_pre_8_0_44_paths(module, path)
        assert {"ultralytics.nn.modules.C2f", "ultralytics.yolo.utils.IterableSimpleNamespace"} <= set(
            torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    else:
        _save_like_trainer(module, path, older=layout.startswith("older"))
    variables = convert(None, str(path)).variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, converted("n").variables)


def test_a_file_that_would_run_code_is_refused_without_running_it(checkpoint, converted, tmp_path):
    """A release-layout file with one crafted object: refused in one line naming the global, and nothing
    of it ran; converted as before once trusted (and then the code does run)."""
    module = torch.load(checkpoint("n")[0], weights_only=False)["model"]
    path, marker = tmp_path / "yolov8n.pt", tmp_path / "ran"
    torch.save({"date": RunsCode(marker), "version": "8.4.190", "model": module, "ema": None,
                "train_args": {"imgsz": 640}}, path)
    with pytest.raises(UserError, match=r"needs the Python global \w+\.open, which is not on the allow-list .*"
                                        r"if you trust the file, pass --trust_pickle") as error:
        convert(None, str(path))
    assert "\n" not in str(error.value)
    assert not marker.exists()
    model = convert(None, str(path), trust_pickle=True)
    assert marker.exists() and model.meta["provenance"]["trust_pickle"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, model.variables, converted("n").variables)


def test_official_name_is_looked_up_where_ultralytics_looks(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolov8n.pt").write_bytes(checkpoint("n")[0].read_bytes())
    model = convert(None, "yolov8n.pt")
    assert model.arch == "yolov8n" and model.meta["provenance"]["weights"] == "yolov8n.pt"

    def offline(*args, **kwargs):
        raise ConnectionError("Download failure. Environment may be offline.")

    monkeypatch.setattr(downloads, "safe_download", offline)
    with pytest.raises(UserError, match=r"could not download yolov8s.pt .*place the official file in") as error:
        convert(None, "yolov8s.pt")
    assert "\n" not in str(error.value)


def _truncated(path, good):
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _resnet_state_dict(path, _):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)


def _foreign_pickle(path, _):
    torch.save({"model": torch.nn.Linear(2, 2), "epoch": -1}, path)


def _empty(path, _):
    path.write_bytes(b"")


def _json(path, _):
    path.write_text(json.dumps({"model": "yolov8n", "epoch": 3}))


def _pickled_list(path, _):
    torch.save([torch.zeros(3)], path)


def _yolo11(path, _):
    _save_like_official(DetectionModel("yolo11n.yaml", verbose=False), path)


def _yolo26_state_dict(path, _):
    torch.save(DetectionModel("yolo26n.yaml", verbose=False).state_dict(), path)


@pytest.mark.parametrize("write,message,trusted_message", [
    (_truncated, "cannot read weights file .*not a readable torch checkpoint .*failed finding central directory\\)",
     None),
    (_empty, "weights file .* is empty; re-download it", None),
    (_json, "not a readable torch checkpoint \\(neither a zip archive nor a pickle: it starts with b'{", None),
    (_pickled_list, "holds neither an Ultralytics checkpoint .* nor a state_dict of tensors", None),
    (_resnet_state_dict, "holds no YOLOv8 weights", None),
    (_foreign_pickle, "needs the Python global torch.nn.modules.linear.Linear, .*pass --trust_pickle",
     "holds a Linear, not an Ultralytics DetectionModel"),
    (_yolo11, r"holds an Ultralytics C3k2 \(ultralytics.nn.modules.block.C3k2\), which no YOLOv8 detection checkpoint "
              "has; supported are YOLOv8 n/s/m/l/x detection .*YOLO11/12",
     "is a yolo11n model; supported are YOLOv8 n/s/m/l/x detection .*YOLO11/12"),
    (_yolo26_state_dict, "end-to-end .*; supported are YOLOv8 n/s/m/l/x detection .*YOLO26", None),
], ids=["truncated", "empty", "json", "pickled_list", "resnet_state_dict", "foreign_pickle", "yolo11",
        "yolo26_state_dict"])
def test_bad_checkpoints_fail_with_one_line_user_error(write, message, trusted_message, checkpoint, tmp_path):
    """Each ends in one line, also when the file is trusted (unpickled as Ultralytics does)."""
    path = tmp_path / "weights.pt"
    write(path, checkpoint("n")[0])
    for trust_pickle, expected in ((False, message), (True, trusted_message or message)):
        with pytest.raises(UserError, match=expected) as error:
            convert(None, str(path), trust_pickle=trust_pickle)
        assert "\n" not in str(error.value) and "\x1b" not in str(error.value)


def test_arch_must_agree_with_the_checkpoint(checkpoint):
    with pytest.raises(UserError, match="holds yolov8n weights, not yolov8s: pass --arch=yolov8n"):
        convert("yolov8s", str(checkpoint("n")[0]))


def test_coco_eval_resumes_and_gives_the_same_map_as_ultralytics(checkpoint, converted, coco_root, tmp_path):
    """`xprune eval`'s harness on real COCO images: files, compiled shapes, resume after a crash, and
    the same pycocotools AP as Ultralytics' own postprocessed detections of the same model."""
    model = converted("n")
    model = dataclasses.replace(model, meta={**model.meta, "preprocess": {"imgsz": IMGSZ}})
    out = tmp_path / "eval"
    metrics = evaluate(model, str(coco_root), str(out), batch_size=2, max_images=4, progress=False)
    detections = json.loads((out / "detections.json").read_text())
    latency = json.loads((out / "latency.json").read_text())
    assert metrics["images"] == 4 and metrics["detections"] == len(detections) > 0
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert {"image_id", "file_name", "category_id", "bbox", "score"} == set(detections[0])
    assert latency["compiled_shapes"] == len({p.input_shape for p in YOLOv8Pipeline(model.spec, IMGSZ).plan(
        [(e["height"], e["width"]) for e in _first_images(coco_root, 4)], 2)})
    assert not (out / "detections.partial.jsonl").exists()

    # A crashed run left the first batch's images in the partial log: the rerun does only the rest.
    first_batch = YOLOv8Pipeline(model.spec, IMGSZ).plan([(e["height"], e["width"]) for e in _first_images(coco_root, 4)], 2)[0]
    ids = [_first_images(coco_root, 4)[i]["id"] for i in first_batch.indices]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    with open(resumed / "detections.partial.jsonl", "w") as f:
        made_by = evaluation_record(model, evaluation_images(str(coco_root), 4)[2], 2, 4)
        f.write(json.dumps({"made_by": made_by}) + "\n")  # what made the partial file: resumed only by the same
        for image_id in ids:
            f.write(json.dumps({"image_id": image_id, "detections": [d for d in detections if d["image_id"] == image_id]}) + "\n")
        f.write('{"image_id": 1, "detec')  # a line cut short by the crash
    again = evaluate(model, str(coco_root), str(resumed), batch_size=2, max_images=4, progress=False)
    assert json.loads((resumed / "latency.json").read_text())["images_this_run"] == 2
    assert json.loads((resumed / "detections.json").read_text()) == detections and again == metrics

    # Ultralytics' detections of the same model on the same letterboxed batches, through the same metric code.
    pipeline, torch_model = YOLOv8Pipeline(model.spec, IMGSZ), checkpoint("n")[1]
    entries, coco91 = _first_images(coco_root, 4), np.asarray(coco80_to_coco91_class())
    reference = []
    for plan in pipeline.plan([(e["height"], e["width"]) for e in entries], 2):
        arrays, metas = zip(*(pipeline.preprocess(np.asarray(Image.open(coco_root / "val2017" / entries[i]["file_name"]).convert("RGB")),
                                                  plan.input_shape) for i in plan.indices))
        with torch.no_grad():
            results = non_max_suppression(torch_model(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))[0], 0.001, 0.7,
                                          multi_label=True, max_det=300, max_time_img=1e3)
        for i, want, meta in zip(plan.indices, results, metas):
            boxes = scale_boxes(plan.input_shape, want[:, :4].clone(), meta.original_shape, ratio_pad=(meta.gain, meta.pad)).numpy()
            reference += [{"image_id": entries[i]["id"], "category_id": int(coco91[int(c)]), "score": float(s),
                           "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
                          for (x1, y1, x2, y2), s, c in zip(boxes, want[:, 4].numpy(), want[:, 5].numpy())]
    ids = [e["id"] for e in entries]
    ground_truth = load_ground_truth(str(coco_root / "annotations" / "instances_val2017.json"))
    theirs = coco_metrics(ground_truth, reference, ids)
    assert abs(theirs["AP"] - metrics["AP"]) <= 1e-3 and abs(theirs["AP50"] - metrics["AP50"]) <= 1e-3
    # A random net scores AP 0 on real labels, which would make that check vacuous: also score both
    # against labels made from Ultralytics' top boxes, jittered, where the AP is far from 0 and 1.
    pseudo_gt = pseudo_ground_truth(coco_root / "annotations" / "instances_val2017.json", reference, ids)
    ours_vs_pseudo, theirs_vs_pseudo = coco_metrics(pseudo_gt, detections, ids), coco_metrics(pseudo_gt, reference, ids)
    assert 0.05 < theirs_vs_pseudo["AP"] < 0.95
    assert abs(ours_vs_pseudo["AP"] - theirs_vs_pseudo["AP"]) <= 1e-3
    assert abs(ours_vs_pseudo["AP50"] - theirs_vs_pseudo["AP50"]) <= 1e-3


def _first_images(coco_root, n):
    dataset = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    return sorted(dataset["images"], key=lambda e: e["file_name"])[:n]


def test_harness_gives_ap_1_for_ground_truth(coco_root):
    ground_truth = load_ground_truth(str(coco_root / "annotations" / "instances_val2017.json"))
    ids = sorted(ground_truth.getImgIds())[:20]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=ids, iscrowd=False))]
    metrics = coco_metrics(ground_truth, perfect, ids)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] * 0.3, *d["bbox"][1:]]} for d in perfect]
    assert coco_metrics(ground_truth, shifted, ids)["AP"] < 0.9  # the harness can tell a bad detector


def test_cli_convert_eval_predict(predict_checkpoint, coco_root, tmp_path):
    """The command line on a detector: convert an official-layout file that also holds an object outside
    the allow-list (``--trust_pickle``), evaluate two COCO images (in bfloat16, recorded as such),
    predict a folder (image ids from COCO-style file names)."""
    from tests.test_cli import xprune

    weights, marker = tmp_path / "yolov8n.pt", tmp_path / "ran"
    torch.save({**torch.load(predict_checkpoint, weights_only=False), "date": RunsCode(marker)}, weights)
    xprune("convert", "--arch=yolov8n", f"--weights={weights}", f"--out={tmp_path / 'model'}", "--trust_pickle")
    assert marker.exists()  # unpickled as Ultralytics would
    xprune("eval", f"--model={tmp_path / 'model'}", f"--coco={coco_root}", f"--out={tmp_path / 'eval'}",
           "--max_images=2", "--batch_size=2", "--precision=bfloat16")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["arch"] == "yolov8n" and metrics["precision"] == "bfloat16"
    assert json.loads((tmp_path / "eval" / "latency.json").read_text())["precision"] == "bfloat16"
    images = tmp_path / "images"
    images.mkdir()
    first = sorted((coco_root / "val2017").glob("*.jpg"))[0]
    (images / first.name).write_bytes(first.read_bytes())
    xprune("predict", f"--model={tmp_path / 'model'}", f"--images={images}", f"--out={tmp_path / 'pred.json'}")
    predictions = json.loads((tmp_path / "pred.json").read_text())
    assert predictions and {p["image_id"] for p in predictions} == {int(first.stem)}
    assert all(p["file_name"] == first.name and len(p["bbox"]) == 4 for p in predictions)
    missing = xprune("eval", f"--model={tmp_path / 'model'}", f"--coco={tmp_path}", f"--out={tmp_path / 'e2'}", check=False)
    assert missing.returncode == 2 and "has no val2017" in missing.stderr


def _grad_x_act_errors(stats, want) -> dict[str, float]:
    """Per layer, the worst relative error of the JAX statistics (sum |a g|, sum over images of |sum a g|,
    and both per channel) against torch's ``a * g``. Sums that cancel to near zero are judged against
    a floor: 1e-5 for the per-image signed sum (an absolute 1e-9 at 1e-4), 1e-4 of the layer's largest
    |a g| for the channels (an absolute 1e-8 of it at 1e-4)."""
    errors = {}
    for name, ag in want.items():
        channel_floor = max(1e-4 * np.abs(ag).max(), 1e-300)
        reference = {"abs": (np.abs(ag).sum(), 1e-300), "signed": (np.abs(ag.sum((1, 2))).sum(), 1e-5),
                     "channel_abs": (np.abs(ag).sum((0, 1)), channel_floor),
                     "channel_signed": (np.abs(ag.sum(1)).sum(0), channel_floor)}
        errors[name] = max(float(np.max(np.abs(np.asarray(stats[name][key]) - w) / np.maximum(np.abs(w), floor)))
                           for key, (w, floor) in reference.items())
    return errors


def _float64_statistics(model, objective, batch: dict) -> dict:
    from xprune_jax.attribution.statistics import statistics_step

    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), model.variables)
        batch = {**batch, "images": np.asarray(batch["images"], np.float64), "weights": np.ones(len(batch["images"]))}
        return jax.tree_util.tree_map(np.asarray, optimised(statistics_step(model.module, objective), variables, batch))


def test_grad_x_act_matches_torch_autograd(checkpoint, converted, batch):
    """The confidence objective (top-100 best-class scores before NMS), every layer's gradient x
    activation statistics against torch autograd with forward hooks, in float64 on both sides."""
    from xprune_jax.attribution.objectives import confidence
    from xprune_jax.detection import CONFIDENCE_TOP_K

    torch_model = copy.deepcopy(checkpoint("n")[1]).double()
    stats = _float64_statistics(converted("n"), confidence, {"images": batch.x[:2]})
    names = [n for n in stats if n != "model.22"]  # the head's capture is its (transposed) output
    want = gradient_x_activation(torch_model, names, lambda: torch.topk(
        torch_model(batch.nchw[:2].double())[0][:, 4:, :].max(1).values, CONFIDENCE_TOP_K, dim=-1).values.sum())
    assert len(names) > 80 and set(want) == set(names)
    errors = _grad_x_act_errors(stats, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"


def test_grad_x_act_with_the_loss_objective_matches_torch_autograd(checkpoint, converted, batch, coco_root):
    """The loss objective (Ultralytics' v8DetectionLoss of each image as a batch of one, summed) against
    the real COCO ground truth of two letterboxed images: every layer's gradient x activation statistics
    against torch autograd of Ultralytics' own loss on the eval-mode model's raw head maps, in float64
    on both sides. Ground truth as ``xprune score --objective=loss`` builds it: the non-crowd COCO boxes
    (``detection_targets``) mapped into the input by the letterbox (``to_input``), padded with a mask.
    Dropping one box on the JAX side must break the match."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    from xprune_jax.attribution.objectives import loss
    from xprune_jax.attribution.score import detection_targets

    n_images, max_boxes = 2, 32
    height, width = batch.shape
    pipeline = YOLOv8Pipeline(models.get_architecture("yolov8n").default_spec(), imgsz=IMGSZ)
    targets = detection_targets(str(coco_root / "annotations" / "instances_val2017.json"),
                                [str(p) for p in batch.paths[:n_images]], pipeline.class_indices)
    gt = {"gt_boxes": np.zeros((n_images, max_boxes, 4), np.float32),
          "gt_classes": np.zeros((n_images, max_boxes), np.int32), "gt_mask": np.zeros((n_images, max_boxes), bool)}
    torch_batches = []
    for i, ((xywh, classes), meta) in enumerate(zip(targets, batch.metas)):
        xyxy = pipeline.to_input(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), meta)
        n = len(classes)
        assert 0 < n <= max_boxes
        gt["gt_boxes"][i, :n], gt["gt_classes"][i, :n], gt["gt_mask"][i, :n] = xyxy, classes, True
        xyxy = xyxy.astype(np.float64)  # the float32 boxes JAX gets, exactly
        centre_size = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        torch_batches.append({"batch_idx": torch.zeros(n, dtype=torch.float64),
                              "cls": torch.from_numpy(classes.astype(np.float64)).view(-1, 1),
                              "bboxes": torch.from_numpy(centre_size / [width, height, width, height])})
    assert sum(len(c) for c, _ in targets) >= 4  # real, several-object ground truth

    torch_model = copy.deepcopy(checkpoint("n")[1]).double()
    torch_model.args = get_cfg()  # default.yaml: box 7.5, cls 0.5, dfl 1.5
    criterion = v8DetectionLoss(torch_model)

    def torch_loss(out):
        raw = out[1]  # eval mode: (decoded, raw head maps)
        return sum(criterion({"boxes": raw["boxes"][i:i + 1], "scores": raw["scores"][i:i + 1],
                              "feats": [f[i:i + 1] for f in raw["feats"]]}, torch_batches[i])[0].sum()
                   for i in range(n_images))

    stats = _float64_statistics(converted("n"), loss, {"images": batch.x[:n_images], **gt})
    names = [n for n in stats if n != "model.22"]  # the head's capture is its (transposed) output
    # Ultralytics pads the targets and holds the loss in tensors of the default dtype: float64 for them
    # too, else its float32 assigner and boxes move the tiny gradients of saturated heads by ~1e-3.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        want = gradient_x_activation(torch_model, names, lambda: torch_loss(torch_model(batch.nchw[:n_images].double())))
    finally:
        torch.set_default_dtype(default_dtype)
    assert len(names) > 80 and set(want) == set(names)
    assert np.abs(want["model.22.cv3.0.2"]).sum() > 0 and np.abs(want["model.2.m.0"]).sum() > 0
    errors = _grad_x_act_errors(stats, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"

    dropped = {**gt, "gt_mask": gt["gt_mask"].copy()}
    dropped["gt_mask"][0, 0] = False  # one ground-truth box fewer on the JAX side only
    stats = _float64_statistics(converted("n"), loss, {"images": batch.x[:n_images], **dropped})
    errors = _grad_x_act_errors(stats, want)
    assert max(errors.values()) > 1e-2, "the comparison cannot tell a missing ground-truth box"


def test_score_then_prune_a_detector(converted, coco_root):
    """Scoring calibrates through the detector's own letterbox; the scores drive a plan whose pruned
    model runs through the validation pipeline."""
    from xprune_jax.attribution.score import score_model
    from xprune_jax.pruning.plan import apply_plan, make_plan

    model = converted("n")
    model = dataclasses.replace(model, meta={**model.meta, "preprocess": {"imgsz": IMGSZ}})
    scores = score_model(model, ["grad_x_act", "l1"], "confidence", coco_root=str(coco_root), calib_images=2,
                         batch_size=2, seed=1, progress=False, calib_split="val2017")
    assert scores["objective"] == "confidence" and len(scores["calibration"]["images"]) == 2
    # by default a detector calibrates on its training loss where the split has annotations
    assert score_model(model, ["l1"], coco_root=str(coco_root), calib_split="val2017")["objective"] == "loss"
    assert score_model(model, ["l1"], coco_root=str(coco_root), calib_split="train2017")["objective"] == "confidence"
    by_name = {l["name"]: l for l in scores["layers"]}
    assert by_name["model.2.m.0.cv1.conv"]["score"] > 0 and by_name["model.0.conv"]["kind"] == "stem"
    plan = make_plan(model, scores, "remove", "layers=50%")
    pruned = apply_plan(model, plan)
    # C2f bottlenecks: any of the backbone's, the last of each neck C2f's (one each in yolov8n)
    removable = {"model.2.m.0", "model.4.m.0", "model.4.m.1", "model.6.m.0", "model.6.m.1", "model.8.m.0",
                 "model.12.m.0", "model.15.m.0", "model.18.m.0", "model.21.m.0"}
    assert len(plan.selected) == 5 and set(plan.selected) <= removable
    pipeline = YOLOv8Pipeline(pruned.spec, imgsz=IMGSZ)
    x = np.zeros((1, IMGSZ, IMGSZ, 3), np.float32)
    assert jax.jit(pipeline.forward)(pruned.variables, x)["boxes"].shape == (1, 300, 4)

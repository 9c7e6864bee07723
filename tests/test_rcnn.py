"""Parity of torchvision's Faster R-CNN and RetinaNet (ResNet-50-FPN, COCO_V1) through the real path.

A torch detector with random weights and calibrated, randomised FrozenBN (eps 0) statistics is saved
in the official file's layout (version-1 keys, FrozenBN without ``num_batches_tracked``) under its
official name in the torch hub cache, converted by weights name, and run by its DetectionPipeline.
Three real COCO images of different sizes share one padded shape (so one compilation per model, and
per-image clipping inside a batch is exercised). The FPN levels, RPN objectness and proposals, the
detections (box for box) and the pycocotools AP (against labels made from torchvision's own
boxes, as random weights score 0 on the real ones) are compared with torchvision's.

The random classifiers are sharpened so that class scores spread over (0, 1) and the real test-time
thresholds (0.05) keep boxes; small transform sizes keep the run short.
"""

import copy
import dataclasses
import json
import re

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from converters.torchvision_io import convert, upgrade_legacy_keys
from tests.conftest import optimised
from tests.pseudo_ground_truth import pseudo_ground_truth
from converters.reference import detection_confidence, gradient_x_activation, randomize_batch_norm, random_torchvision, relative_error
from xprune_jax import models
from xprune_jax.evaluation.coco import coco_metrics
from xprune_jax.models.rcnn import TorchvisionDetectionPipeline
from xprune_jax.spec import spec_from_dict, spec_to_dict

SMALL = {"min_size": 320, "max_size": 512}
INPUT_SHAPE = (320, 448)
# arch -> (weights name, classification layer, factor that spreads its random scores)
DETECTORS = {
    "fasterrcnn_resnet50_fpn": ("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "roi_heads.box_predictor.cls_score", 4.0),
    "retinanet_resnet50_fpn": ("RetinaNet_ResNet50_FPN_Weights.COCO_V1", "head.classification_head.cls_logits", 60.0),
    "fasterrcnn_mobilenet_v3_large_fpn": ("FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
                                          "roi_heads.box_predictor.cls_score", 11.0),
}
STEMS = {"fasterrcnn_mobilenet_v3_large_fpn": "backbone.body.0.0"}  # else backbone.body.conv1


def _small_pipeline(arch: str, spec) -> TorchvisionDetectionPipeline:
    return TorchvisionDetectionPipeline(models.build(arch, dataclasses.replace(
        spec, transform=dataclasses.replace(spec.transform, **SMALL))))


@pytest.fixture(scope="module")
def images(coco_images) -> list[tuple[int, np.ndarray]]:
    """(COCO id, uint8 RGB) of the first three images padded to INPUT_SHAPE with distinct resized sizes."""
    arch = "retinanet_resnet50_fpn"
    pipeline = _small_pipeline(arch, models.get_architecture(arch).default_spec())
    picked, sizes = [], set()
    for path in coco_images:
        width, height = Image.open(path).size
        size = pipeline.resized_size(height, width)
        if pipeline.plan([(height, width)], 1)[0].input_shape == INPUT_SHAPE and size not in sizes:
            sizes.add(size)
            picked.append((int(path.stem), np.array(Image.open(path).convert("RGB"))))
        if len(picked) == 3:
            return picked
    pytest.fail(f"fewer than three COCO subset images pad to {INPUT_SHAPE}")


def _freeze_batch_norm(module: torch.nn.Module, eps: float = 0.0) -> None:
    """BatchNorm2d -> FrozenBatchNorm2d, as the COCO_V1 builders leave the backbone (the ResNet-50 ones with eps 0)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = torchvision.ops.misc.FrozenBatchNorm2d(child.num_features, eps=eps)
            frozen.load_state_dict(child.state_dict())  # FrozenBN drops num_batches_tracked
            setattr(module, name, frozen)
        else:
            _freeze_batch_norm(child, eps)


def _legacy_layout(state_dict: dict) -> dict:
    """The version-1 keys of the official COCO_V1 files (the inverse of torchvision's upgrades)."""
    legacy = {}
    for key, value in state_dict.items():
        key = re.sub(r"(fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
        key = re.sub(r"(_head\.conv)\.(\d+)\.0\.", lambda m: f"{m[1]}.{2 * int(m[2])}.", key)
        legacy[key] = value
    return legacy


def _torch_outputs(model, batch) -> dict:
    """Detections, FPN levels (NHWC) and, for Faster R-CNN, objectness and proposals."""
    captured, hooks = {}, [model.backbone.register_forward_hook(lambda m, i, out: captured.update(fpn=out))]
    if hasattr(model, "rpn"):
        hooks.append(model.rpn.head.register_forward_hook(lambda m, i, out: captured.update(rpn_head=out)))
        hooks.append(model.rpn.register_forward_hook(lambda m, i, out: captured.update(proposals=out[0])))
    with torch.no_grad():
        detections = model(batch)
    for hook in hooks:
        hook.remove()
    out = {"detections": [{k: v.numpy() for k, v in d.items()} for d in detections],
           "fpn": {k: v.permute(0, 2, 3, 1).numpy() for k, v in captured["fpn"].items()}}
    if "rpn_head" in captured:
        objectness, _ = torchvision.models.detection.rpn.concat_box_prediction_layers(*captured["rpn_head"])
        out["objectness"] = objectness.reshape(len(batch), -1).numpy()
        out["proposals"] = [p.numpy() for p in captured["proposals"]]
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module", params=list(DETECTORS))
def run(request, images, tmp_path_factory, monkeypatch_module) -> dict:
    arch = request.param
    weights, classifier, sharpen = DETECTORS[arch]
    batch = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for _, image in images]
    torch_model = random_torchvision(arch, seed=1, weights_backbone=None, **SMALL)
    randomize_batch_norm(torch_model.backbone.body, torch_model.transform(batch)[0].tensors, seed=1)
    _freeze_batch_norm(torch_model.backbone.body, models.get_architecture(arch).default_spec().body.bn_eps)
    with torch.no_grad():
        torch_model.get_submodule(classifier).weight.mul_(sharpen)
    torch_model.eval()

    legacy = _legacy_layout(torch_model.state_dict())
    torch_model.load_state_dict(legacy)  # torchvision itself reads this layout (and upgrades its keys)
    home = tmp_path_factory.mktemp(arch) / "torch_home"
    path = home / "hub" / "checkpoints" / torchvision.models.get_weight(weights).url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(legacy, path)
    monkeypatch_module.setenv("TORCH_HOME", str(home))
    model = convert(arch, weights)

    pipeline = _small_pipeline(arch, model.spec)
    (plan,) = pipeline.plan([image.shape[:2] for _, image in images], batch_size=len(images))
    inputs, metas = zip(*(pipeline.preprocess(image, plan.input_shape) for _, image in images))
    apply = jax.jit(lambda variables, x: models.apply_with_intermediates(pipeline.module, variables, x))
    out, acts = jax.tree_util.tree_map(np.asarray, apply(model.variables, np.stack(inputs)))
    detections = [{"boxes": pipeline.to_original(out["boxes"][i][out["valid"][i]], meta),
                   "scores": out["scores"][i][out["valid"][i]], "labels": out["labels"][i][out["valid"][i]]}
                  for i, meta in enumerate(metas)]
    torch_inputs = torch_model.transform(batch)[0].tensors.permute(0, 2, 3, 1).numpy()
    return {"arch": arch, "weights": weights, "model": model, "input_shape": plan.input_shape, "pipeline": pipeline,
            "torch_model": torch_model, "torch_image_sizes": torch_model.transform(batch)[0].image_sizes,
            "jax": {"inputs": np.stack(inputs), "detections": detections, "acts": acts},
            "torch": {"inputs": torch_inputs, **_torch_outputs(torch_model, batch)}}


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    return inter / (_area(a)[:, None] + _area(b)[None] - inter)


def _matched(want: dict, got: dict) -> tuple[float, float]:
    """Fractions of ``want``'s and of ``got``'s boxes with a counterpart at IoU >= 0.99, the same label
    and a score within 1e-3."""
    same = ((_iou(want["boxes"], got["boxes"]) >= 0.99) & (want["labels"][:, None] == got["labels"][None])
            & (np.abs(want["scores"][:, None] - got["scores"][None]) <= 1e-3))
    return same.any(1).mean(), same.any(0).mean()


def test_converted_by_weights_name_with_the_weights_metadata(run):
    model, enum = run["model"], torchvision.models.get_weight(run["weights"])
    assert run["input_shape"] == INPUT_SHAPE
    assert model.meta["provenance"]["weights"] == str(enum)
    assert model.meta["categories"] == list(enum.meta["categories"]) and len(model.meta["categories"]) == 91
    assert model.meta["preprocess"]["min_size"] == 800 and model.meta["preprocess"]["max_size"] == 1333


def test_inputs_fpn_levels_objectness_and_proposals_match_torch(run):
    acts, want = run["jax"]["acts"], run["torch"]
    # resize, normalise, pad. torch's own bilinear resize differs by up to 7e-5 between 1 and 2 threads
    # (float32 rounding); a wrong sampling grid is off by 1e-2 and more
    assert np.abs(run["jax"]["inputs"] - want["inputs"]).max() < 2e-4
    for name, level in want["fpn"].items():
        assert relative_error(acts[f"backbone.fpn.{name}"], level) < 1e-4, name
    if "objectness" not in want:
        return
    assert relative_error(acts["rpn.objectness"], want["objectness"]) < 1e-4
    for got, proposals in zip(acts["rpn.proposals"], want["proposals"]):
        got = got[np.any(got != 0, axis=1)]
        assert len(got) == len(proposals)
        # Ranks can swap between proposals whose objectness ties to ~1e-6; the boxes are the same.
        assert (_iou(proposals, got).max(1) >= 0.99).mean() >= 0.99


def test_detections_match_torch_box_for_box(run):
    for got, want in zip(run["jax"]["detections"], run["torch"]["detections"]):
        assert len(want["boxes"]) > 10
        assert abs(len(got["boxes"]) - len(want["boxes"])) <= 0.01 * len(want["boxes"])
        assert min(_matched(want, got)) >= 0.99


def _coco_results(image_ids: list[int], detections: list[dict]) -> list[dict]:
    """Per-image boxes (x1, y1, x2, y2 in original pixels), scores and labels as COCO results."""
    return [{"image_id": image_id, "category_id": int(label), "score": float(score),
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
            for image_id, d in zip(image_ids, detections)
            for (x1, y1, x2, y2), score, label in zip(d["boxes"], d["scores"], d["labels"])]


def test_coco_ap_matches_torch(run, coco_root, images):
    """The same pycocotools stats (all twelve, within 1e-3) for the JAX and the torchvision detections.
    Random weights score AP 0 on the real labels, where agreeing proves nothing, so both are scored
    against labels made from torchvision's top 15 boxes per image, jittered: there the AP is far from
    0 and 1 and moves when a few boxes, scores or labels move."""
    ids = [image_id for image_id, _ in images]
    ours, theirs = _coco_results(ids, run["jax"]["detections"]), _coco_results(ids, run["torch"]["detections"])
    ground_truth = pseudo_ground_truth(coco_root / "annotations" / "instances_val2017.json", theirs, ids)
    assert len(ground_truth.getAnnIds()) == 15 * len(ids)
    ours, theirs = coco_metrics(ground_truth, ours, ids), coco_metrics(ground_truth, theirs, ids)
    assert 0.05 < theirs["AP"] < 0.95, theirs  # Faster R-CNN 0.332, RetinaNet 0.176
    for name, value in theirs.items():
        assert abs(ours[name] - value) <= 1e-3, (name, ours, theirs)


def test_plan_batches_each_image_once_at_few_padded_shapes(coco_root):
    """At the real 800/1333 sizes, the COCO subset needs 19 exact torchvision shapes (10 with bucket 128)."""
    with open(coco_root / "annotations" / "instances_val2017.json") as f:
        sizes = [(image["height"], image["width"]) for image in json.load(f)["images"]]
    for bucket, num_shapes in ((32, 19), (128, 10)):
        pipeline = TorchvisionDetectionPipeline(models.build("fasterrcnn_resnet50_fpn", models.get_architecture(
            "fasterrcnn_resnet50_fpn").default_spec()), bucket=bucket)
        batches = pipeline.plan(sizes, batch_size=8)
        assert sorted(i for b in batches for i in b.indices) == list(range(len(sizes)))
        assert len({b.input_shape for b in batches}) == num_shapes and max(len(b.indices) for b in batches) == 8
        for b in batches:
            for i in b.indices:
                resized = pipeline.resized_size(*sizes[i])
                assert all(r <= s < r + bucket and s % bucket == 0 for r, s in zip(resized, b.input_shape))


def test_predict_pads_each_image_as_torchvision_pads_it_alone(coco_images):
    """torchvision pads a batch to its largest image, so an image's detections depend on its neighbours;
    ``predict`` (the evaluation pipeline, bucket 32) batches only images of one padded shape, which is
    the shape torchvision gives the image alone, whatever the other images and the batch size."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    arch = "fasterrcnn_resnet50_fpn"
    assert models.get_architecture(arch).predict_pipeline is None
    spec = models.get_architecture(arch).default_spec()
    pipeline = TorchvisionDetectionPipeline(models.build(arch, spec))
    transform = GeneralizedRCNNTransform(spec.transform.min_size, spec.transform.max_size, spec.transform.mean,
                                         spec.transform.std).eval()
    images, sizes = [], set()
    for path in coco_images:
        with Image.open(path) as im:
            if im.size not in sizes and len(images) < 5:
                sizes.add(im.size)
                images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255)
    alone = [tuple(transform([image])[0].tensors.shape[2:]) for image in images]
    assert len(set(alone)) > 1 and tuple(transform(images)[0].tensors.shape[2:]) not in alone[:1]
    for batch_size in (1, 2, 5):
        plans = pipeline.plan([tuple(image.shape[1:]) for image in images], batch_size)
        assert sorted(i for p in plans for i in p.indices) == list(range(len(images)))
        assert all(p.input_shape == alone[i] for p in plans for i in p.indices)


def test_specs_match_torchvision_builders():
    """Every test-time hyper-parameter of the default specs equals the torchvision model's; specs round-trip."""
    faster = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None)
    mobile = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_fpn", weights=None, weights_backbone=None)
    retina = torchvision.models.get_model("retinanet_resnet50_fpn", weights=None, weights_backbone=None)
    f, m, r = (models.get_architecture(a).default_spec()
               for a in ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn"))
    # the COCO_V1 builders freeze the backbone's BatchNorms: eps 0 in the ResNet-50 ones, FrozenBatchNorm2d's own in MobileNet's
    for spec, torch_model, anchors, eps in ((f, faster, faster.rpn.anchor_generator, 0.0),
                                            (m, mobile, mobile.rpn.anchor_generator, torchvision.ops.misc.FrozenBatchNorm2d(1).eps),
                                            (r, retina, retina.anchor_generator, 0.0)):
        t = torch_model.transform
        assert (t.min_size, t.max_size, t.size_divisible) == ((spec.transform.min_size,), spec.transform.max_size, 32)
        assert (list(t.image_mean), list(t.image_std)) == (list(spec.transform.mean), list(spec.transform.std))
        assert anchors.sizes == spec.anchor_sizes and anchors.aspect_ratios == (spec.aspect_ratios,) * len(spec.anchor_sizes)
        assert spec.body.bn_eps == eps and spec.num_classes == 91
        assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec  # stored in model dirs
    for spec, torch_model in ((f, faster), (m, mobile)):
        rpn, heads = torch_model.rpn, torch_model.roi_heads
        assert (rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], rpn.nms_thresh, rpn.score_thresh) == (
            spec.rpn_pre_nms_top_n, spec.rpn_post_nms_top_n, spec.rpn_nms_thresh, spec.rpn_score_thresh)
        assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (spec.score_thresh, spec.nms_thresh,
                                                                                   spec.detections_per_img)
        assert heads.box_roi_pool.output_size == (spec.roi_size, spec.roi_size) and heads.box_roi_pool.sampling_ratio == 2
        # torchvision's default pooler names four levels and pools those the backbone has (MobileNet's: two)
        assert {str(i) for i in range(len(spec.fpn_stages))} <= set(heads.box_roi_pool.featmap_names)
    assert (retina.score_thresh, retina.nms_thresh, retina.detections_per_img, retina.topk_candidates) == (
        r.score_thresh, r.nms_thresh, r.detections_per_img, r.topk_candidates)
    state_dict = faster.state_dict()
    assert upgrade_legacy_keys(state_dict).keys() == state_dict.keys()  # current keys pass unchanged


def test_confidence_grad_x_act_matches_torch_autograd(run):
    """The label-free confidence objective: every captured layer's gradient x activation statistics
    against torch autograd of the same objective (forward hooks that retain the gradient), in float64
    on both sides, on one real image (float64 runs slowly on CPU; the objective over a batch of three is
    checked against torch's in float32 below). Heads shared over levels are captured as all their levels
    packed ``[B, sum HW, C]``: the torch side concatenates each level's hook output in level order.
    Layers without a gradient in torch (the RPN head: proposals are detached; box regression) must
    have zero statistics in JAX too."""
    from xprune_jax.attribution.objectives import confidence
    from xprune_jax.attribution.statistics import statistics_step

    torch_model = copy.deepcopy(run["torch_model"]).double()
    inputs = run["jax"]["inputs"][:1]
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), run["model"].variables)
        batch = {"images": np.asarray(inputs, np.float64), "weights": np.ones(1)}
        stats = optimised(statistics_step(run["pipeline"].module, confidence), variables, batch)
        stats = jax.tree_util.tree_map(np.asarray, stats)

    modules = dict(torch_model.named_modules())
    skipped = {n for n in stats if n not in modules}
    assert all(n.startswith("backbone.fpn.") or n in ("rpn.objectness", "rpn.proposals") for n in skipped), skipped
    names = sorted(set(stats) - skipped)
    x = torch.from_numpy(inputs).permute(0, 3, 1, 2).double()
    # Levels of a shared head are concatenated in order; linear layers give one row per RoI.
    want = gradient_x_activation(torch_model, names, lambda: detection_confidence(torch_model, x, run["torch_image_sizes"][:1]))
    assert len(names) > 60
    gradient_free = []
    for name in names:
        ag = want[name]
        if np.abs(ag).max() == 0:
            gradient_free.append(name)
        s = stats[name]
        assert s["abs"] == pytest.approx(np.abs(ag).sum(), rel=1e-4, abs=1e-12), name
        assert s["signed"] == pytest.approx(np.abs(ag.sum((1, 2))).sum(), rel=1e-4, abs=1e-12), name
        np.testing.assert_allclose(s["channel_abs"], np.abs(ag).sum((0, 1)), rtol=1e-4,
                                   atol=1e-8 * np.abs(ag).max() + 1e-15, err_msg=name)
    # Besides these, FPN convs of levels that pool no RoI (Faster R-CNN) or hold none of the top-100
    # scores (RetinaNet) at this small size get no gradient.
    if run["arch"].startswith("fasterrcnn"):
        expected = {"roi_heads.box_predictor.bbox_pred", "rpn.head.bbox_pred", "rpn.head.cls_logits", "rpn.head.conv.0.0"}
    else:
        expected = {n for n in names if n.startswith("head.regression_head.")}
    assert expected <= set(gradient_free), gradient_free
    assert all(n.startswith("backbone.fpn.") for n in set(gradient_free) - expected), gradient_free
    assert stats[STEMS.get(run["arch"], "backbone.body.conv1")]["abs"] > 0


def test_confidence_outputs_are_the_top_100_pre_nms_scores(run):
    """``outputs["confidence"]`` [B, 100], by decreasing score, equals torch's own pre-NMS scores (float32)."""
    from xprune_jax.attribution.objectives import confidence

    torch_model = run["torch_model"]
    inputs = run["jax"]["inputs"]
    out = jax.jit(run["pipeline"].module.apply)(run["model"].variables, inputs)
    got = np.asarray(out["confidence"])
    assert got.shape == (len(inputs), 100) and np.all(np.diff(got, axis=1) <= 0)
    with torch.no_grad():
        want = [detection_confidence(torch_model, torch.from_numpy(inputs[i:i + 1]).permute(0, 3, 1, 2),
                                  run["torch_image_sizes"][i:i + 1]).item() for i in range(len(inputs))]
    np.testing.assert_allclose(got.sum(1), want, rtol=1e-4)
    weights = np.array([1.0, 0.0, 1.0])
    assert float(confidence(out, {"weights": weights})) == pytest.approx(got.sum(1) @ weights, rel=1e-6)


def test_score_model_calibrates_through_the_detector_pipeline(run, coco_root):
    """Calibration pads every image to the pipeline's square side (max_size rounded up) and scores with
    the confidence objective."""
    from xprune_jax.attribution.score import calibration_loader, score_model

    if run["arch"] != "retinanet_resnet50_fpn":
        pytest.skip("one detector is enough: the same loader serves both")
    spec = run["model"].spec
    model = dataclasses.replace(run["model"], spec=dataclasses.replace(
        spec, transform=dataclasses.replace(spec.transform, **SMALL)))
    assert calibration_loader(model)(sorted((coco_root / "val2017").glob("*.jpg"))[0]).shape == (512, 512, 3)
    scores = score_model(model, ["grad_x_act"], "confidence", coco_root=str(coco_root), calib_images=2, batch_size=2,
                         progress=False, calib_split="val2017")
    assert scores["objective"] == "confidence" and len(scores["calibration"]["images"]) == 2
    by_name = {layer["name"]: layer for layer in scores["layers"]}
    assert by_name["backbone.body.layer1.0.conv1"]["score"] > 0

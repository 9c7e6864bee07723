"""torchvision's RetinaNet and Faster R-CNN training losses in JAX (:mod:`xprune_jax.losses.rcnn`) against
``model.train()(images, targets)`` of torchvision 0.29, on torch models with random weights and randomised
FrozenBN statistics (as tests/test_rcnn.py builds them), converted through a weights file, on two real COCO
images at a small size with their real (non-crowd) COCO annotations as targets.

Both sides get the same input tensors: torchvision's own transformed batch. Faster R-CNN runs in float64 on
both sides, so that its training proposals (top-2000 and NMS) are the same boxes; its samplers are made
identical by replacing torch's ``fg_bg_sampler``s with :func:`balanced_sample` of the same keys.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.reference import randomize_batch_norm, random_torchvision
from converters.torchvision_io import convert
from tests.test_rcnn import SMALL, _freeze_batch_norm, images  # noqa: F401 (pytest fixture)
from xprune_jax import models
from xprune_jax.losses.rcnn import balanced_sample, retinanet_loss
from xprune_jax.models.rcnn import TorchvisionDetectionPipeline, retinanet_intermediates_loss

jax.config.update("jax_default_matmul_precision", "highest")

MAX_BOXES = 24  # static padding of the ground truth per image
TOLERANCE = 1e-4  # relative


@pytest.fixture(scope="module")
def samples(images, coco_root) -> list[dict]:
    """The first two images of tests/test_rcnn.py (same padded shape) with their non-crowd COCO boxes
    (xyxy, original pixels, float32) and category ids."""
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    out = []
    for image_id, image in images[:2]:
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a.get("iscrowd", 0)]
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        out.append({"image": image, "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                    "labels": np.array([a["category_id"] for a in anns], np.int64)})
    assert all(0 < len(s["labels"]) <= MAX_BOXES for s in out) and sum(len(s["labels"]) for s in out) >= 4
    return out


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """arch -> (torch model, converted Model), built once per arch: random weights, randomised FrozenBN."""
    built = {}

    def build(arch: str):
        if arch not in built:
            torch_model = random_torchvision(arch, seed=2, weights_backbone=None, **SMALL)
            calibration = torch.rand(2, 3, 320, 448)
            randomize_batch_norm(torch_model.backbone.body, calibration, seed=2)
            _freeze_batch_norm(torch_model.backbone.body)
            path = tmp_path_factory.mktemp(arch) / f"{arch}.pth"
            torch.save(torch_model.state_dict(), path)
            path.with_suffix(".json").write_text(json.dumps({"transform": SMALL}))  # the small sizes in the spec
            built[arch] = torch_model, convert(arch, str(path))
        return built[arch]

    return build


def _torch_inputs(samples, dtype=torch.float32):
    return ([torch.from_numpy(s["image"]).permute(2, 0, 1).to(dtype) / 255 for s in samples],
            [{"boxes": torch.from_numpy(s["boxes"]).to(dtype), "labels": torch.from_numpy(s["labels"])}
             for s in samples])


def _jax_targets(pipeline, samples, batch, dtype=np.float32, drop_last_box=False) -> dict:
    """The padded ground truth in input pixels (``to_input``, torchvision's resize_boxes), in ``dtype``."""
    n_images = len(samples)
    gt = {"gt_boxes": np.zeros((n_images, MAX_BOXES, 4), dtype),
          "gt_classes": np.zeros((n_images, MAX_BOXES), np.int32), "gt_mask": np.zeros((n_images, MAX_BOXES), bool)}
    for i, (s, resized) in enumerate(zip(samples, batch.image_sizes)):
        meta = (s["image"].shape[:2], tuple(resized))
        ratio = pipeline.to_input(np.ones((1, 4)), meta).astype(dtype)  # float32 ratios, as resize_boxes
        n = len(s["labels"]) - (drop_last_box and i == 0)
        gt["gt_boxes"][i, :n] = s["boxes"][:n].astype(dtype) * ratio
        gt["gt_classes"][i, :n], gt["gt_mask"][i, :n] = s["labels"][:n], True
    return gt


def _rel(got, want) -> float:
    return abs(float(got) - float(want)) / abs(float(want))


def test_retinanet_loss_matches_torchvision(detector, samples):
    """torchvision's RetinaNet losses (float32): (1) the JAX loss on torch's own head outputs and anchors, with
    the gradient w.r.t. the head outputs; (2) end to end from the converted Flax model's captured head and
    FPN levels; (3) dropping one ground-truth box moves the loss far beyond the tolerance."""
    torch_model, model = detector("retinanet_resnet50_fpn")
    torch_model = copy.deepcopy(torch_model).train()
    pipeline = TorchvisionDetectionPipeline(model.module)
    captured = {}

    def keep_head(module, inputs, out):
        captured["head"] = out
        for value in out.values():
            value.retain_grad()

    torch_model.head.register_forward_hook(keep_head)
    torch_model.anchor_generator.register_forward_hook(lambda m, i, out: captured.update(anchors=out))
    images, targets = _torch_inputs(samples)
    want = torch_model(images, targets)
    sum(want.values()).backward()
    want = {k: v.detach() for k, v in want.items()}
    batch = torch_model.transform(images)[0]
    gt = _jax_targets(pipeline, samples, batch)
    assert all(torch.equal(a, captured["anchors"][0]) for a in captured["anchors"])  # one padded shape
    head = {k: v.detach().numpy() for k, v in captured["head"].items()}

    def loss(cls_logits, bbox_regression):
        out = retinanet_loss(cls_logits, bbox_regression, captured["anchors"][0].numpy(), **gt)
        return out["classification"] + out["bbox_regression"], out

    (_, got), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        head["cls_logits"], head["bbox_regression"])
    errors = {k: _rel(got[k], want[k]) for k in want}
    print("retinanet loss-only relative errors", errors)
    assert max(errors.values()) < 1e-5, errors
    for g, name in zip(grads, ("cls_logits", "bbox_regression")):
        w = captured["head"][name].grad.numpy()
        assert np.max(np.abs(np.asarray(g) - w)) <= 1e-5 * np.max(np.abs(w)), name
    np.testing.assert_allclose(np.mean([got["per_image"][k] for k in want], axis=1), [got[k] for k in want], rtol=1e-6)

    x = batch.tensors.permute(0, 2, 3, 1).numpy()

    @jax.jit
    def end_to_end(variables, gt):
        _, acts = models.apply_with_intermediates(model.module, variables, x)
        return retinanet_intermediates_loss(model.spec, acts, x.shape[1:3], **gt)

    got = end_to_end(model.variables, gt)
    errors = {k: _rel(got[k], want[k]) for k in want}
    print("retinanet end-to-end relative errors", errors)
    assert max(errors.values()) < TOLERANCE, errors
    dropped = end_to_end(model.variables, _jax_targets(pipeline, samples, batch, drop_last_box=True))
    assert max(_rel(dropped[k], want[k]) for k in want) > 10 * TOLERANCE


def test_retinanet_image_without_boxes_is_all_background(detector, samples):
    """An image without ground truth: every anchor is background and there is no box loss (torchvision's
    empty-target path), and it leaves the other image's loss unchanged."""
    torch_model, model = detector("retinanet_resnet50_fpn")
    torch_model = copy.deepcopy(torch_model).train()
    images, targets = _torch_inputs(samples)
    targets[1] = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    with torch.no_grad():
        want = torch_model(images, targets)
    batch = torch_model.transform(images)[0]
    gt = _jax_targets(TorchvisionDetectionPipeline(model.module), samples, batch)
    gt["gt_mask"][1] = False
    x = batch.tensors.permute(0, 2, 3, 1).numpy()
    _, acts = jax.jit(lambda v: models.apply_with_intermediates(model.module, v, x))(model.variables)
    got = retinanet_intermediates_loss(model.spec, acts, x.shape[1:3], **gt)
    assert max(_rel(got[k], want[k]) for k in want) < TOLERANCE
    assert float(got["per_image"]["bbox_regression"][1]) == 0 and float(got["per_image"]["classification"][1]) > 0


class _InjectedSampler:
    """torch's ``BalancedPositiveNegativeSampler`` replaced by :func:`balanced_sample` with the JAX model's
    keys, on the JAX side's candidate layout (RoI heads: ``slots`` proposals, then the padded ground truth)."""

    def __init__(self, keys, stage: int, batch_size: int, fraction: float, num_boxes=None, slots: int = 0):
        self.keys, self.stage, self.batch_size, self.fraction = keys, stage, batch_size, fraction
        self.num_boxes, self.slots = num_boxes, slots

    def __call__(self, matched_idxs):
        positives, negatives = [], []
        for i, labels in enumerate(matched_idxs):
            labels = labels.numpy()
            index = np.arange(len(labels))
            if self.num_boxes is not None:  # proposals, then the ground truth at slots + m
                proposals = len(labels) - self.num_boxes[i]
                index = np.concatenate([np.arange(proposals), self.slots + np.arange(self.num_boxes[i])])
            layout = np.full(self.slots + MAX_BOXES if self.num_boxes is not None else len(labels), -1, labels.dtype)
            layout[index] = labels
            key = jax.random.split(jnp.asarray(self.keys[i]))[self.stage]
            pos, neg = (np.asarray(m)[index] for m in balanced_sample(jnp.asarray(layout), key, self.batch_size,
                                                                       self.fraction))
            positives.append(torch.from_numpy(pos.astype(np.uint8)))
            negatives.append(torch.from_numpy(neg.astype(np.uint8)))
        return positives, negatives


def test_fasterrcnn_loss_matches_torchvision(detector, samples):
    """torchvision's four Faster R-CNN losses (RPN objectness and box, RoI classifier and box) from the JAX
    training forward, in float64 on both sides with the same sampled anchors and proposals; dropping one
    ground-truth box moves them far beyond the tolerance."""
    from xprune_jax.losses.rcnn import FasterRCNNLossConfig

    torch_model, model = detector("fasterrcnn_resnet50_fpn")
    torch_model = copy.deepcopy(torch_model).double().train()
    config = FasterRCNNLossConfig()
    keys = np.array([[7, i] for i in range(len(samples))], np.uint32)
    images, targets = _torch_inputs(samples, torch.float64)
    num_boxes = [len(s["labels"]) for s in samples]
    torch_model.rpn.fg_bg_sampler = _InjectedSampler(keys, 0, config.rpn_batch_size_per_image,
                                                     config.rpn_positive_fraction)
    torch_model.roi_heads.fg_bg_sampler = _InjectedSampler(keys, 1, config.box_batch_size_per_image,
                                                           config.box_positive_fraction, num_boxes,
                                                           config.rpn_post_nms_top_n)
    with jax.enable_x64(True):
        with torch.no_grad():
            want = torch_model(images, targets)
        batch = torch_model.transform(images)[0]
        pipeline = TorchvisionDetectionPipeline(model.module)
        x = batch.tensors.permute(0, 2, 3, 1).numpy()
        variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), model.variables)
        forward = jax.jit(lambda v, gt: model.module.apply(v, x, {**gt, "keys": keys}))
        got = jax.tree_util.tree_map(np.asarray, forward(variables, _jax_targets(pipeline, samples, batch, np.float64)))
        dropped = forward(variables, _jax_targets(pipeline, samples, batch, np.float64, drop_last_box=True))
    errors = {k: _rel(got[k], want[k]) for k in want}
    print("fasterrcnn relative errors", errors)
    assert set(want) == set(got) - {"per_image"} and max(errors.values()) < TOLERANCE, errors
    assert max(_rel(dropped[k], want[k]) for k in want) > 10 * TOLERANCE


@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn"])
def test_score_with_the_loss_objective(arch, detector, coco_root):
    """``xprune score --objective=loss`` runs for the torchvision detectors: one real image with its COCO
    ground truth at a tiny size, every layer of the backbone scored."""
    import dataclasses

    from xprune_jax.attribution.score import score_model

    _, model = detector(arch)
    transform = dataclasses.replace(model.spec.transform, min_size=128, max_size=192)
    model = dataclasses.replace(model, spec=dataclasses.replace(model.spec, transform=transform))
    path = str(sorted((coco_root / "val2017").glob("*.jpg"))[0])
    scores = score_model(model, ["grad_x_act"], objective="loss", batch_size=1, progress=False,
                         calibration=([path], str(coco_root / "annotations" / "instances_val2017.json")))
    by_name = {layer["name"]: layer["score"] for layer in scores["layers"]}
    assert scores["objective"] == "loss" and scores["calibration"]["ground_truth"]
    assert by_name["backbone.body.layer1.0.conv1"] > 0 and np.isfinite(list(by_name.values())).all()

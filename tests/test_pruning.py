"""Pruning surgery is exact, budgets are honoured, pruned checkpoints round-trip, bad plans fail clearly.

The reference for "exact" is the *original* network with the pruned units masked:
- removed residual blocks: the BN that feeds the residual add gets scale and shift 0, so the
  branch adds nothing (ResNet: relu(0 + x) = x, since x is itself a ReLU output);
- a removed ShuffleNetV2 branch: its weights turned into an exact identity (its input is >= 0);
- shrunk channels: scale and shift 0 in every BN of the group (fused YOLOv8: kernel and bias 0 in
  every producing conv), at each slot's offset, so the channel carries 0 onwards.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from converters.mapping import state_dict_to_variables
from tests.conftest import COCO_SUBSET
from converters.reference import random_torchvision, relative_error
from xprune_jax import analysis, models, tree_paths
from xprune_jax.attribution.score import score_model
from xprune_jax.checkpoint import Model, load_model, model_fingerprint, save_model
from xprune_jax.errors import UserError
from xprune_jax.models.yolov8 import fuse_batch_norms
from xprune_jax.pruning.plan import Plan, apply_plan, make_plan
from xprune_jax.pruning.surgery import graph_of

ARCHS = ["resnet50", "mobilenet_v2", "shufflenet_v2_x1_0"]


def _load(paths) -> torch.Tensor:
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module")
def images(coco_images):
    return _load([coco_images[5], coco_images[9]])


@functools.lru_cache(maxsize=None)
def _model(arch: str, seed: int = 2) -> Model:
    """A converted model with random weights and BN statistics calibrated on real images."""
    calibration = _load(sorted((COCO_SUBSET / "val2017").glob("*.jpg"))[:4])
    torch_model = random_torchvision(arch, calibration, seed=seed)
    spec = models.get_architecture(arch).default_spec()
    variables = state_dict_to_variables({k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                                        models.variable_shapes(arch, spec), arch)
    return Model(arch, spec, variables, {"preprocess": {"crop": 224}})


@functools.lru_cache(maxsize=None)
def _forward(module):
    return jax.jit(module.apply)


def _run(model: Model, images) -> np.ndarray:
    return np.asarray(_forward(model.module)(model.variables, images.permute(0, 2, 3, 1).numpy()))


def _mask_removed(model: Model, units) -> dict:
    variables = jax.tree_util.tree_map(np.array, model.variables)
    for unit in units:
        if model.arch.startswith("shufflenet"):
            _identity_branch(variables, unit)
        else:
            last = _norm_names(variables, unit)[-1]  # the BN whose output meets the skip connection
            tree_paths.get(variables["params"], last)["scale"][:] = 0
            tree_paths.get(variables["params"], last)["bias"][:] = 0
    return variables


def _norm_names(variables, unit):
    """The block's BN layers in order (bn1 < bn3, conv.1 < conv.3)."""
    block = tree_paths.get(variables["batch_stats"], unit)
    return [f"{unit}.{n}" for n in sorted(block, key=lambda n: [int(t) if t.isdigit() else t for t in n.replace("bn", "bn.").split(".")])]


def _identity_branch(variables, unit):
    """A ShuffleNetV2 unit's branch (``stageK.I.branch2``) turned into an exact identity (its input is >= 0)."""
    params, stats = variables["params"], variables["batch_stats"]
    for conv in ("0", "5"):
        kernel = tree_paths.get(params, f"{unit}.{conv}")["kernel"]
        kernel[:] = np.eye(kernel.shape[2], kernel.shape[3])[None, None]
    dw = tree_paths.get(params, f"{unit}.3")["kernel"]
    dw[:] = 0
    dw[1, 1] = 1
    for bn in ("1", "4", "6"):
        tree_paths.get(params, f"{unit}.{bn}")["scale"][:] = 1
        tree_paths.get(params, f"{unit}.{bn}")["bias"][:] = 0
        tree_paths.get(stats, f"{unit}.{bn}")["mean"][:] = 0
        tree_paths.get(stats, f"{unit}.{bn}")["var"][:] = 1 - 1e-5


def _mask_channels(model: Model, plan: Plan) -> dict:
    """Zero the dropped channels where they are made: scale and shift of every BN of the group, or
    (fused, no BN) the kernel and bias of every producing conv, at each slot's offset."""
    variables = jax.tree_util.tree_map(np.array, model.variables)
    groups = {g.name: g for g in graph_of(model.arch, model.spec).groups}
    for name in plan.selected:
        group = groups[name]
        dropped = np.setdiff1d(np.arange(group.width), plan.keep_channels[name])
        for slot in group.norms:
            tree_paths.get(variables["params"], slot.layer)["scale"][slot.positions(dropped)] = 0
            tree_paths.get(variables["params"], slot.layer)["bias"][slot.positions(dropped)] = 0
        if not group.norms:
            for slot in group.producers:
                layer = tree_paths.get(variables["params"], slot.layer)
                layer["kernel"][..., slot.positions(dropped)] = 0
                layer["bias"][slot.positions(dropped)] = 0
    return variables


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode, budget", [("remove", "layers=30%"), ("shrink", "flops=-20%")])
def test_surgery_equals_masking(arch, mode, budget, images):
    model = _model(arch)
    scores = score_model(model, ["random"], seed=1, progress=False)  # any ranking will do; random is fast
    plan = make_plan(model, scores, mode, budget)
    pruned = apply_plan(model, plan)
    masked = _mask_removed(model, plan.selected) if mode == "remove" else _mask_channels(model, plan)
    want = _run(dataclasses.replace(model, variables=masked), images)
    got = _run(pruned, images)
    assert relative_error(got, want) < 1e-5
    assert relative_error(want, _run(model, images)) > 1e-3  # the pruning changed the network: a real test
    if mode == "remove":
        assert all(tree_paths.get(pruned.variables["params"], u) is None for u in plan.selected)
        assert len(jax.tree_util.tree_leaves(pruned.variables)) < len(jax.tree_util.tree_leaves(model.variables))


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_is_honoured_and_predicted(arch, tmp_path):
    model = _model(arch)
    scores = score_model(model, ["l1"], progress=False)
    for mode, budget, target in [("remove", "flops=-15%", 0.15), ("shrink", "flops=-30%", 0.30),
                                 ("shrink", "params=-5%", None), ("remove+shrink", "flops=-70%", 0.70)]:
        plan = make_plan(model, scores, mode, budget)
        save_model(apply_plan(model, plan), str(tmp_path / mode), overwrite=True)
        pruned = load_model(str(tmp_path / mode))
        flops = analysis.total_flops(analysis.describe_layers(arch, pruned.spec))
        assert flops == plan.flops_after and analysis.count_params(arch, pruned.spec) == plan.params_after
        assert plan.params_after == sum(np.size(x) for x in jax.tree_util.tree_leaves(pruned.variables["params"]))
        if target:
            assert flops <= (1 - target) * plan.flops_before
        else:
            assert plan.params_after <= 0.95 * plan.params_before
        assert pruned.meta["plans"][-1]["selected"] == plan.selected
        assert plan.removed if mode == "remove+shrink" else not plan.removed


def test_abstract_traces_are_cached_per_spec_and_handed_out_as_copies():
    """Planning and loading ask for the same specs' shapes and counts again and again: each spec is
    traced once (per x64 mode), its parameter count comes from the trace that describes its layers, and
    a caller that edits what it got edits no cached copy. A spec that can't be hashed is traced every time."""
    from tests.test_finetune import tiny_spec

    spec = tiny_spec(num_classes=7)
    before = models._variable_shapes.cache_info()
    first = models.variable_shapes("resnet18", spec, 64)
    first["params"].clear()
    shapes = models.variable_shapes("resnet18", spec, 64)
    after = models._variable_shapes.cache_info()
    assert shapes["params"] and (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    traced = analysis._traced.cache_info().misses
    layers = analysis.describe_layers("resnet18", spec, 64)
    assert analysis.count_params("resnet18", spec, 64) == sum(np.size(x) for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert analysis._traced.cache_info().misses == traced + 1 and layers[-1].params == 512 * 7 + 7
    unhashable = dataclasses.replace(spec, blocks=list(spec.blocks))
    assert models.variable_shapes("resnet18", unhashable, 64) == shapes
    assert models._variable_shapes.cache_info().misses == after.misses
    with jax.enable_x64(True):  # init makes float64 leaves there: not the float32 entry
        assert models.variable_shapes("resnet18", spec, 64) == models._variable_shapes.__wrapped__("resnet18", spec, 64, True) \
            != shapes


def test_flops_agree_with_xla_cost_analysis():
    """Independent check of the analytic counts: XLA's compiled FLOPs shrink by the same ratio."""
    model = _model("resnet50")
    plan = make_plan(model, score_model(model, ["l1"], progress=False), "shrink", "flops=-30%")
    pruned = apply_plan(model, plan)

    def xla_flops(m):
        x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
        return jax.jit(m.module.apply).lower(m.variables, x).compile().cost_analysis()["flops"]

    xla_ratio = xla_flops(pruned) / xla_flops(model)
    assert xla_ratio == pytest.approx(plan.flops_after / plan.flops_before, abs=0.01)


def test_zero_mode_keeps_the_graph_and_zeroes_the_layers():
    model = _model("mobilenet_v2")
    plan = make_plan(model, score_model(model, ["l1"], progress=False), "zero", "layers=5%")
    pruned = apply_plan(model, plan)
    assert pruned.spec == model.spec and plan.flops_after == plan.flops_before
    assert len(plan.selected) == round(0.05 * (sum(1 for l in analysis.describe_layers("mobilenet_v2", model.spec)
                                                   if l.kind not in ("block", "stem", "head"))))
    for name in plan.selected:
        assert not np.any(tree_paths.get(pruned.variables["params"], name)["kernel"])
    assert np.any(tree_paths.get(pruned.variables["params"], "features.3.conv.2")["kernel"]) or \
        "features.3.conv.2" in plan.selected


def test_pruning_a_pruned_model_and_reloading(tmp_path, images):
    model = _model("resnet50")
    once = apply_plan(model, make_plan(model, score_model(model, ["random"], seed=0, progress=False), "remove", "layers=20%"))
    twice = apply_plan(once, make_plan(once, score_model(once, ["l1"], progress=False), "shrink", "flops=-10%"))
    save_model(twice, str(tmp_path / "twice"))
    loaded = load_model(str(tmp_path / "twice"))
    assert len(loaded.meta["plans"]) == 2 and loaded.spec == twice.spec
    np.testing.assert_array_equal(_run(loaded, images), _run(twice, images))
    with pytest.raises(UserError, match="made for another model"):  # scores of the unpruned model don't fit
        make_plan(once, score_model(model, ["l1"], progress=False), "remove", "layers=10%")


def test_invalid_plans_get_clear_errors():
    model = _model("resnet50")
    scores = score_model(model, ["l1"], progress=False)
    with pytest.raises(UserError, match="can't be met by remove on resnet50"):
        make_plan(model, scores, "remove", "flops=-90%")
    with pytest.raises(UserError, match="bad --budget"):
        make_plan(model, scores, "remove", "half")
    with pytest.raises(UserError, match="zero mode keeps every FLOP"):
        make_plan(model, scores, "zero", "flops=-30%")
    plan = make_plan(model, scores, "remove", "layers=10%")
    with pytest.raises(UserError, match="names 'layer9.1', which is not a remove-able unit"):
        apply_plan(model, dataclasses.replace(plan, selected=["layer9.1"]))
    with pytest.raises(UserError, match="prunes 'layer2.1', which is protected"):
        apply_plan(model, dataclasses.replace(plan, selected=["layer2.1"], protected=[*plan.protected, "layer2.1"]))
    protected = make_plan(model, scores, "remove", "layers=99%", protect=["layer3"])
    assert not any(u.startswith("layer3.") for u in protected.selected)


@functools.lru_cache(maxsize=None)
def _yolo_model(fused: bool = False) -> Model:
    """yolov8n with random weights and random BN statistics (surgery exactness needs no torch)."""
    spec = models.get_architecture("yolov8n").default_spec()
    variables = jax.tree_util.tree_map(np.array, models.init_variables("yolov8n", spec, seed=3, input_size=320))
    rng = np.random.default_rng(3)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        key = path[-1].key
        if key in ("mean", "bias"):
            leaf[...] = rng.normal(0, 0.1, leaf.shape)
        elif key in ("var", "scale"):
            leaf[...] = rng.uniform(0.5, 1.5, leaf.shape)
    if fused:
        spec, variables = fuse_batch_norms(spec, variables)
    return Model("yolov8n", spec, variables, {"preprocess": {"imgsz": 320}})


@functools.lru_cache(maxsize=None)
def _yolo_images(paths: tuple) -> np.ndarray:
    from xprune_jax.models.yolov8_pipeline import YOLOv8Pipeline

    pipeline = YOLOv8Pipeline(_yolo_model().spec, imgsz=320)
    return np.stack([pipeline.preprocess(np.asarray(Image.open(p).convert("RGB")), (320, 320))[0] for p in paths])


def _yolo_run(model: Model, variables, x) -> np.ndarray:
    return np.asarray(_forward(model.module)(variables, x))


def _check_yolo_surgery(model: Model, plan: Plan, x) -> Model:
    """The pruned model equals the original with the plan's units masked; returns the pruned model."""
    pruned = apply_plan(model, plan)
    if plan.mode == "remove":
        masked = jax.tree_util.tree_map(np.array, model.variables)
        for unit in plan.selected:  # a masked bottleneck outputs 0: with a shortcut it is the identity
            tree_paths.get(masked["params"], f"{unit}.cv2.bn")["scale"][:] = 0
            tree_paths.get(masked["params"], f"{unit}.cv2.bn")["bias"][:] = 0
    else:
        masked = _mask_channels(model, plan)
    want = _yolo_run(model, masked, x)
    assert relative_error(_yolo_run(pruned, pruned.variables, x), want) < 1e-5
    assert relative_error(want, _yolo_run(model, model.variables, x)) > 1e-4
    assert plan.flops_after < plan.flops_before and not any(s.startswith("model.0.") for s in plan.selected)
    return pruned


# one group of every kind: a downsample conv, a neck conv read through a concat (slot 0), outputs read
# through upsampling and concats at other offsets (C2f, SPPF), SPPF's hidden width, both C2f halves with
# and without residual adds, a bottleneck's inner width
YOLO_GROUP_KINDS = {"model.1.conv", "model.16.conv", "model.4.cv2.conv", "model.12.cv2.conv", "model.9.cv2.conv",
                    "model.9.cv1.conv", "model.2.cv1.conv[0]", "model.2.cv1.conv[1]", "model.12.cv1.conv[0]",
                    "model.12.cv1.conv[1]", "model.4.m.1.cv1.conv"}


@pytest.mark.parametrize("mode, budget, fused", [("remove", "layers=50%", False), ("remove", "layers=99.9%", False),
                                                 ("shrink", "layers=99.9%", False), ("shrink", "layers=99.9%", True)])
def test_yolov8_surgery_equals_masking(mode, budget, fused, coco_images):
    model = _yolo_model(fused)
    plan = make_plan(model, score_model_like(model, seed=4), mode, budget, round_to=4, allocation="layer",
                     shrink_ratio=0.875)
    if budget == "layers=99.9%" and mode == "remove":  # every backbone bottleneck and each neck C2f's last one
        assert {"model.2.m.0", "model.8.m.0", "model.12.m.0", "model.21.m.0"} <= set(plan.selected)
        # a FLOPs budget just under what they all cut is met: the planner counts a neck C2f's dropped concat slot
        most = 100 * (1 - plan.flops_after / plan.flops_before) - 0.01
        assert len(make_plan(model, score_model_like(model, seed=4), mode, f"flops=-{most:.2f}%").selected) == 10
    if mode == "shrink":  # every group at once, each to 1/8 of its width: all exact together, whatever shares a layer
        assert YOLO_GROUP_KINDS <= set(plan.selected) and "model.0.conv" not in plan.selected  # the stem stays
    _check_yolo_surgery(model, plan, _yolo_images(tuple(coco_images[:2])))


@pytest.mark.parametrize("mode", ["shrink", "remove+shrink"])
def test_yolov8_global_allocation_at_a_large_cut(mode, coco_images, tmp_path):
    """-70% FLOPs, channels allocated globally (with the removals first for remove+shrink): exact against
    masking, the budget met exactly as predicted, every group kept at a multiple of round_to above its floor."""
    model = _yolo_model()
    plan = make_plan(model, score_model_like(model, seed=4), mode, "flops=-70%")
    assert plan.allocation == "global" and bool(plan.removed) == (mode == "remove+shrink")
    x = _yolo_images(tuple(coco_images[:2]))
    start = model
    if plan.removed:  # the removals alone, then the channels of what remains
        start = apply_plan(model, dataclasses.replace(plan, mode="remove", selected=plan.removed, keep_channels={}))
    pruned = apply_plan(model, plan)
    masked = _mask_channels(start, plan)
    assert relative_error(_yolo_run(pruned, pruned.variables, x), _yolo_run(start, masked, x)) < 1e-5
    assert plan.flops_after <= 0.3 * plan.flops_before
    assert plan.flops_after == analysis.total_flops(analysis.describe_layers("yolov8n", pruned.spec, 320))
    assert plan.params_after == analysis.count_params("yolov8n", pruned.spec)
    groups = {g.name: g for g in graph_of(start.arch, start.spec).groups}
    assert any(name.startswith("model.22.") for name in plan.selected)  # the Detect head's hidden widths too
    for name, keep in plan.keep_channels.items():
        assert len(keep) % 8 == 0 and len(keep) >= groups[name].width / 8, name


def test_yolov8_pruning_a_pruned_model(coco_images, tmp_path):
    """shrink (C2f halves of unequal widths) -> remove (a dropped neck bottleneck's concat slot at its new
    offset) -> shrink again, each step exact; a spec with unequal halves round-trips."""
    x = _yolo_images(tuple(coco_images[:2]))
    model = _yolo_model()
    plan = make_plan(model, score_model_like(model, seed=7), "shrink", "layers=99.9%", allocation="layer", round_to=4)
    plan = dataclasses.replace(plan, selected=[s for s in plan.selected if not s.endswith("[0]")])
    shrunk = _check_yolo_surgery(model, plan, x)
    split = dict(shrunk.spec.edits.channels)  # each C2f's split of cv1's output, as edited
    assert all(len(split[f"{c.name}.first"]) == 2 * len(split[f"{c.name}.second"]) for c in shrunk.spec.c2fs)
    save_model(shrunk, str(tmp_path / "shrunk"))
    assert load_model(str(tmp_path / "shrunk")).spec == shrunk.spec
    removed = _check_yolo_surgery(shrunk, make_plan(shrunk, score_model_like(shrunk, seed=8), "remove", "layers=50%"), x)
    plan = make_plan(removed, score_model_like(removed, seed=9), "shrink", "layers=99.9%", allocation="layer", round_to=2)
    _check_yolo_surgery(removed, plan, x)


def test_identity_removals_save_their_own_layers_as_the_trace_counts():
    """A unit removed as the identity saves exactly its own layers' FLOPs and its parameters, read from
    the unpruned trace: the count on the spec without it agrees for every such YOLOv8n unit (the dropped
    ones, whose concat slot goes too, are counted on that spec)."""
    from xprune_jax.pruning.plan import _Context, _traced_unit_costs, _unit_costs

    model = _yolo_model()
    graph = graph_of(model.arch, model.spec)
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))
    context = _Context(model, {}, {}, layers, set(), [], analysis.total_flops(layers), 0)
    removals = {u.name: u.removal for u in graph.units}
    assert sorted(set(removals.values())) == ["drop", "identity"]
    for unit in (u for u, removal in removals.items() if removal == "identity"):
        flops, params = _unit_costs(context, graph, unit)
        assert flops > 0 and params > 0 and (flops, params) == _traced_unit_costs(context, graph, unit), unit


def test_yolov8_spec_without_first_half_width_loads():
    from xprune_jax.spec import spec_from_dict, spec_to_dict

    spec = models.get_architecture("yolov8n").default_spec()
    data = spec_to_dict(spec)
    for c2f in data["c2fs"]:
        del c2f["first"]  # a model file from before C2f halves could differ
    assert spec_from_dict(data) == spec and all(c.first == c.hidden for c in spec.c2fs)


@pytest.mark.parametrize("fused", [False, True])
def test_yolov8_shrink_budget_is_honoured_and_predicted(fused, tmp_path):
    """flops=-30% is feasible with the default shrink ratio, and the savings the plan predicts while
    choosing are exactly those of the pruned spec."""
    from xprune_jax.pruning.plan import _shrink_savings

    model = _yolo_model(fused)
    scores = score_model_like(model, seed=5)
    by_layer = {l.name: l for l in analysis.describe_layers(model.arch, model.spec, 320)}
    groups = {g.name: g for g in graph_of(model.arch, model.spec).groups}
    for budget, target in [("flops=-30%", 0.30), ("params=-30%", None)]:
        plan = make_plan(model, scores, "shrink", budget)
        flops, params = _shrink_savings([groups[n] for n in plan.selected], plan.keep_channels, by_layer,
                                        model.variables["params"])
        save_model(apply_plan(model, plan), str(tmp_path / "pruned"), overwrite=True)
        pruned = load_model(str(tmp_path / "pruned"))
        assert plan.flops_before - flops == plan.flops_after == \
            analysis.total_flops(analysis.describe_layers(model.arch, pruned.spec, 320))
        assert plan.params_before - params == plan.params_after == analysis.count_params(model.arch, pruned.spec) == \
            sum(np.size(x) for x in jax.tree_util.tree_leaves(pruned.variables["params"]))
        if target:
            assert plan.flops_after <= (1 - target) * plan.flops_before
        else:
            assert plan.params_after <= 0.7 * plan.params_before


def score_model_like(model: Model, seed: int) -> dict:
    """A random-criterion score file for any model (layers from the analysis, seeded scores)."""
    from xprune_jax.attribution.criteria import ScoringInputs, get_criterion

    layers = analysis.describe_layers(model.arch, model.spec, 320)
    scores = get_criterion("random")(ScoringInputs(layers, {}, seed=seed))
    return {"criterion": "random", "arch": model.arch, "model_fingerprint": model_fingerprint(model), "layers": [
        {"name": l.name, "score": scores[l.name].score, "channel_scores": list(scores[l.name].channel_scores)} for l in layers]}


DETECTOR_HEAD_OUTPUTS = {  # continuous in the weights (no top-k or NMS selection in between)
    "fasterrcnn_resnet50_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred"],
    "retinanet_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg", "confidence"],
    "fasterrcnn_mobilenet_v3_large_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred"],
}
NECK_AND_HEAD_GROUPS = {  # the FPN's lateral and output widths are named by their first producer
    "fasterrcnn_resnet50_fpn": {"backbone.fpn.inner_blocks.0.0", "backbone.fpn.layer_blocks.3.0", "rpn.head.conv.0.0",
                                "roi_heads.box_head.fc6", "roi_heads.box_head.fc7"},
    "retinanet_resnet50_fpn": {"backbone.fpn.inner_blocks.0.0", "backbone.fpn.layer_blocks.2.0",
                               *(f"head.{s}_head.conv.{i}.0" for s in ("classification", "regression") for i in range(4))},
    # ported with no pruning code: squeeze-excitation gates couple with the widths they scale, and have their own
    "fasterrcnn_mobilenet_v3_large_fpn": {"backbone.fpn.inner_blocks.0.0", "backbone.fpn.layer_blocks.1.0",
                                          "rpn.head.conv.0.0", "roi_heads.box_head.fc6", "roi_heads.box_head.fc7",
                                          "backbone.body.4.block.0.0", "backbone.body.4.block.2.fc1",
                                          "backbone.body.13.block.3.0", "backbone.body.16.0"},
}


@functools.lru_cache(maxsize=None)
def _detector(arch: str) -> Model:
    """A detector with random weights and random FrozenBN statistics, at 256 px."""
    spec = models.get_architecture(arch).default_spec()
    variables = jax.tree_util.tree_map(np.array, models.init_variables(arch, spec, seed=5, input_size=256))
    rng = np.random.default_rng(5)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
        leaf[...] = rng.uniform(0.5, 1.5, leaf.shape) if path[-1].key == "var" else rng.normal(0, 0.1, leaf.shape)
    return Model(arch, spec, variables, {"preprocess": {"crop": 256}})


@functools.lru_cache(maxsize=None)
def _detector_apply(arch: str, spec):
    """One compiled forward per spec: the original and its masked variables share it."""
    return jax.jit(functools.partial(models.apply_with_intermediates, models.build(arch, spec)))


@functools.lru_cache(maxsize=None)
def _roi_heads_apply(spec):
    from xprune_jax.models.rcnn import RoIHeads

    return jax.jit(RoIHeads(spec).apply, static_argnums=3)


@pytest.mark.parametrize("arch, mode, budget", [("fasterrcnn_resnet50_fpn", "remove", "layers=40%"),
                                                ("fasterrcnn_resnet50_fpn", "shrink", "layers=99.9%"),
                                                ("retinanet_resnet50_fpn", "shrink", "layers=99.9%"),
                                                ("fasterrcnn_mobilenet_v3_large_fpn", "remove", "layers=99.9%"),
                                                ("fasterrcnn_mobilenet_v3_large_fpn", "shrink", "layers=99.9%")])
def test_detector_surgery_equals_masking(arch, mode, budget, coco_images):
    """Whole detectors: the body's blocks, or every channel group at once (the body's, the FPN's, the
    RPN's conv, the box head's fc6 and fc7, RetinaNet's subnets). The predictors' outputs of the
    pruned detector equal those of the original with the same units masked; Faster R-CNN's RoI heads
    are compared on the same proposals. (Which of two near-tied proposals or detections survive top-k
    and NMS is not a property of the surgery: rounding at 1e-7 may flip them.)"""
    model = _detector(arch)
    x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((256, 256)), np.float32) / 255 - 0.45
                  for p in coco_images[:2]])
    plan = make_plan(model, score_model_like(model, seed=6), mode, budget, allocation="layer")
    pruned = apply_plan(model, plan)
    if mode == "remove":
        assert plan.selected and all(s.startswith("backbone.body.") for s in plan.selected)
        masked = _mask_removed(model, plan.selected)
    else:
        assert NECK_AND_HEAD_GROUPS[arch] <= set(plan.selected)
        masked = _mask_channels(model, plan)
    rois = None

    def outputs(m, v):
        nonlocal rois
        detections, acts = _detector_apply(m.arch, m.spec)(v, x)
        acts = {**acts, "confidence": detections["confidence"]}
        got = {k: np.asarray(acts[k]) for k in DETECTOR_HEAD_OUTPUTS[arch]}
        if arch.startswith("faster"):
            rois = acts["rpn.proposals"] if rois is None else rois
            levels = [acts[f"backbone.fpn.{k}"] for k in range(len(m.spec.fpn_stages))]
            roi_heads = {"params": tree_paths.get(v["params"], "roi_heads")}
            got["roi_heads"] = np.concatenate([np.asarray(y).reshape(-1) for y in _roi_heads_apply(m.spec)(
                roi_heads, levels, rois, x.shape[1:3])])
        return got

    want, got = outputs(model, masked), outputs(pruned, pruned.variables)
    for key in want:
        assert relative_error(got[key], want[key]) < 1e-5, key
    original = outputs(model, model.variables)
    assert max(relative_error(want[key], original[key]) for key in want) > 1e-3  # the cut changed the outputs


def test_normalisations():
    from xprune_jax.pruning.plan import normalized

    values = np.array([4.0, 1.0, 3.0, 2.0])
    np.testing.assert_allclose(normalized(values, "mean"), values / 2.5)
    np.testing.assert_allclose(normalized(values, "max"), values / 4)
    np.testing.assert_allclose(normalized(values, "lamp"), [4 / 4, 1 / 10, 3 / 7, 2 / 9])  # w / sum of those >= w
    np.testing.assert_array_equal(normalized(values, "none"), values)
    np.testing.assert_array_equal(normalized(np.zeros(3), "mean"), np.zeros(3))


@pytest.mark.parametrize("normalize", ["mean", "lamp"])
def test_global_allocation_removes_the_globally_least_important_channels(normalize):
    """Every channel a plan removes is less important (normalised within its group) than any channel
    whose removal step it did not take, unless that group is at its floor; each group keeps its best."""
    from xprune_jax.pruning.plan import group_importance, normalized

    model = _yolo_model()
    scores = score_model_like(model, seed=2)
    plan = make_plan(model, scores, "shrink", "flops=-40%", normalize=normalize)
    by_layer = {l.name: l for l in analysis.describe_layers(model.arch, model.spec, 320)}
    taken, untaken = [], []
    for group in graph_of(model.arch, model.spec).groups:
        if any(s.layer.startswith("model.0.") for s in group.producers + group.consumers):
            continue  # touches the stem
        importance = normalized(group_importance(scores, group, by_layer), normalize)
        keep = plan.keep_channels.get(group.name, list(range(group.width)))
        dropped = np.setdiff1d(np.arange(group.width), keep)
        assert not len(dropped) or importance[dropped].max() <= importance[keep].min(), group.name
        taken += list(importance[dropped])
        if len(keep) - 8 >= max(8, np.ceil(group.width / 8 / 8) * 8):  # another step was possible
            untaken.append(np.sort(importance[keep])[(len(keep) - 1) % 8])
    assert max(taken) <= min(untaken)


def test_global_allocation_leaves_every_shuffled_branch_an_input():
    """ShuffleNetV2's shuffle scatters each branch output over the later units, so a unit's branch reads
    channels of several groups. Where those are each group's least important ones, the groups' floors
    keep none for that branch: global allocation then narrows such a group no further, rather than leave
    the branch's first conv without inputs (it raised ZeroDivisionError building that conv)."""
    arch = "shufflenet_v2_x0_5"
    spec = models.get_architecture(arch).default_spec()
    variables = jax.tree_util.tree_map(lambda x: np.ones(x.shape, x.dtype), models.variable_shapes(arch, spec, 64))
    model = Model(arch, spec, variables, {"preprocess": {"crop": 64}})  # the planner reads shapes; scores are made up
    half = spec.units[0].branch1 // 2  # the second unit's branch reads the second halves of the first unit's outputs

    def channels(layer):
        values = np.ones(layer.shape[-1])
        if layer.name in ("stage2.0.branch1.2", "stage2.0.branch2.5"):
            values[half:] = 1e-3
        return values.tolist()

    scores = {"arch": arch, "criterion": "made up", "model_fingerprint": model_fingerprint(model), "layers": [
        {"name": l.name, "score": 1.0, "channel_scores": channels(l), "input_channel_scores": None}
        for l in analysis.describe_layers(arch, spec, 64)]}
    plan = make_plan(model, scores, "shrink", "flops=-70%")
    assert plan.flops_after <= 0.7 * plan.flops_before
    pruned = apply_plan(model, plan)
    for unit in pruned.spec.units:
        if unit.stride == 1:
            assert tree_paths.get(pruned.variables["params"], f"{unit.name}.branch2.0")["kernel"].shape[-2] > 0, unit.name

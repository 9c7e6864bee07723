"""Coupled channel groups (ResNet stage widths, MobileNetV2 skip chains, a detector's FPN levels):
shrinking them is exact and exactly predicted, and a detector's predictors keep their outputs.

The reference is the original network with the group's channels masked in every BN that produces
them (each block's last BN and the downsample's), so they are 0 after every residual add.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from tests.test_pruning import _detector, _load, _mask_channels, _mask_removed, _model, _run, score_model_like
from converters.reference import relative_error
from xprune_jax import analysis, tree_paths
from xprune_jax.checkpoint import load_model, save_model
from xprune_jax.errors import UserError
from xprune_jax.models.mobilenet_v2 import mobilenet_v2_spec
from xprune_jax.models.resnet import resnet_spec
from xprune_jax.models.shufflenet_v2 import shufflenet_v2_spec
from xprune_jax.pruning.plan import _shrink_savings, apply_plan, make_plan
from xprune_jax.pruning.surgery import graph_of
from xprune_jax.spec import spec_from_dict, spec_to_dict

PREDICTORS = {"fasterrcnn_resnet50_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
                                          "roi_heads.box_predictor.bbox_pred"],
              "retinanet_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]}
SIZE = 64  # small inputs keep ResNet-50's runs short; the groups don't depend on the size
COUPLED_GROUPS = {
    "resnet50": ["layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3", "layer4.0.conv3"],  # the stage widths
    "mobilenet_v2": ["features.1.conv.1", "features.2.conv.2", "features.4.conv.2", "features.7.conv.2",
                     "features.11.conv.2", "features.14.conv.2", "features.17.conv.2", "features.18.0"],
    # scattered by the channel shuffle: through a stage, into the next stage's first unit, into conv5
    "shufflenet_v2_x1_0": ["stage2.0.branch1.2", "stage2.2.branch2.5", "stage3.0.branch2.5", "stage4.3.branch2.5",
                           "conv5.0"],
}
# groups also run alone through the network (each run compiles a network): MobileNetV2's last inverted residual
# narrowed to its input's width must still add no skip; a branch output the shuffle scatters over the next units
RUN_ALONE = {"mobilenet_v2": ["features.17.conv.2"], "shufflenet_v2_x1_0": ["stage2.0.branch1.2"]}


@pytest.fixture(scope="module")
def small_images(coco_images):
    return torch.nn.functional.interpolate(_load([coco_images[5], coco_images[9]]), size=SIZE, mode="bilinear",
                                           antialias=True)


@pytest.mark.parametrize("arch", COUPLED_GROUPS)
def test_coupled_groups_surgery_equals_masking_and_is_predicted(arch, small_images):
    """Each coupled group alone, then every group at once (inner widths included): the savings predicted
    exactly; the pruned network equals the masked one with every group at once and with RUN_ALONE's alone."""
    model = dataclasses.replace(_model(arch), meta={"preprocess": {"crop": SIZE}})
    everything = make_plan(model, score_model_like(model, seed=11), "shrink", "layers=99.9%", allocation="layer")
    assert set(COUPLED_GROUPS[arch]) <= set(everything.selected)
    groups = {g.name: g for g in graph_of(arch, model.spec).groups}
    by_layer = {l.name: l for l in analysis.describe_layers(arch, model.spec, SIZE)}
    original = _run(model, small_images)
    for names in [[name] for name in COUPLED_GROUPS[arch]] + [everything.selected]:
        plan = dataclasses.replace(everything, selected=names,
                                   keep_channels={n: everything.keep_channels[n] for n in names})
        pruned = apply_plan(model, plan)
        if len(names) > 1 or names[0] in RUN_ALONE.get(arch, ()):
            want = _run(dataclasses.replace(model, variables=_mask_channels(model, plan)), small_images)
            assert relative_error(_run(pruned, small_images), want) < 1e-5, names
            assert relative_error(want, original) > 1e-3, names  # the masking changed the network: a real test
        flops, params = _shrink_savings([groups[n] for n in names], plan.keep_channels, by_layer,
                                        model.variables["params"])
        flops_after = analysis.total_flops(analysis.describe_layers(arch, pruned.spec, SIZE))
        assert flops_after == everything.flops_before - flops
        assert sum(np.size(x) for x in jax.tree_util.tree_leaves(pruned.variables["params"])) == \
            analysis.count_params(arch, pruned.spec) == everything.params_before - params
    assert (everything.flops_after, everything.params_after) == (everything.flops_before - flops,
                                                                 everything.params_before - params)


def _layers(slots) -> set[str]:
    return {s.layer for s in slots}


def test_coupled_group_layers():
    """ResNet-50's last stage is read by the classifier; resnet18's layer1 adds the stem's output, so its
    blocks' last convs make the stem's (protected) group; MobileNetV2's chains end at features.18."""
    groups = {g.name: g for g in graph_of("resnet50", resnet_spec("resnet50")).groups}
    assert _layers(groups["layer4.0.conv3"].producers) == \
        {"layer4.0.downsample.0", "layer4.0.conv3", "layer4.1.conv3", "layer4.2.conv3"}
    assert _layers(groups["layer4.0.conv3"].consumers) == {"layer4.1.conv1", "layer4.2.conv1", "fc"}
    assert _layers(groups["layer1.0.conv3"].consumers) == \
        {"layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    groups = {g.name: g for g in graph_of("resnet18", resnet_spec("resnet18")).groups}
    assert [n for n in groups if not n.endswith(".conv1")] == ["conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    assert _layers(groups["conv1"].producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert _layers(groups["layer2.0.conv2"].norms) == {"layer2.0.downsample.1", "layer2.0.bn2", "layer2.1.bn2"}
    groups = {g.name: g for g in graph_of("mobilenet_v2", mobilenet_v2_spec()).groups}
    assert _layers(groups["features.14.conv.2"].norms) == \
        {"features.14.conv.3", "features.15.conv.3", "features.16.conv.3"}
    assert _layers(groups["features.14.conv.2"].consumers) == \
        {"features.15.conv.0.0", "features.16.conv.0.0", "features.17.conv.0.0"}
    assert _layers(groups["features.17.conv.2"].consumers) == {"features.18.0"}


@pytest.mark.parametrize("arch", ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"])
def test_detector_groups_are_predicted_and_protectable(arch):
    """Every detector group shrinks by exactly the FLOPs and parameters the plan predicts (fc6 reads
    49 inputs a channel). The predictors keep their outputs; protecting the FPN keeps the stage
    outputs it reads and its own groups."""
    model = _detector(arch)
    graph = graph_of(arch, model.spec)
    groups = {g.name: g for g in graph.groups}
    plan = make_plan(model, score_model_like(model, seed=12), "shrink", "layers=99.9%", allocation="layer")
    assert {f"backbone.body.layer{i}.0.conv3" for i in range(1, 5)} <= set(plan.selected)  # the stage widths
    by_layer = {l.name: l for l in analysis.describe_layers(arch, model.spec, 256)}
    flops, params = _shrink_savings([groups[n] for n in plan.selected], plan.keep_channels, by_layer,
                                    model.variables["params"])
    pruned = apply_plan(model, plan)
    assert plan.flops_after == analysis.total_flops(analysis.describe_layers(arch, pruned.spec, 256)) == \
        plan.flops_before - flops < 0.6 * plan.flops_before
    assert plan.params_after == analysis.count_params(arch, pruned.spec) == plan.params_before - params == \
        sum(np.size(x) for x in jax.tree_util.tree_leaves(pruned.variables["params"]))
    heads = graph.heads
    assert set(heads) == set(PREDICTORS[arch]) <= set(plan.protected) and not set(heads) & set(groups)
    for head in heads:
        assert np.shape(tree_paths.get(pruned.variables["params"], head)["kernel"])[-1] == \
            np.shape(tree_paths.get(model.variables["params"], head)["kernel"])[-1]
    assert spec_from_dict(spec_to_dict(pruned.spec)) == pruned.spec
    stages = {f"backbone.body.{s}.0.conv3" for s in model.spec.fpn_stages}
    guarded = make_plan(model, score_model_like(model, seed=12), "shrink", "layers=99.9%", allocation="layer",
                        protect=["backbone.fpn"])
    assert not [n for n in guarded.selected if n in stages or n.startswith("backbone.fpn")]
    with pytest.raises(UserError, match=r"prunes 'backbone.fpn.inner_blocks.0.0', which is protected"):
        apply_plan(model, dataclasses.replace(guarded, selected=["backbone.fpn.inner_blocks.0.0"]))


@pytest.mark.parametrize("arch", ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"])
def test_detector_global_allocation_reaches_70_percent(arch):
    """remove+shrink at -70% FLOPs on a whole detector: met exactly as predicted, predictors untouched."""
    model = _detector(arch)
    plan = make_plan(model, score_model_like(model, seed=3), "remove+shrink", "flops=-70%")
    pruned = apply_plan(model, plan)
    assert plan.removed and plan.flops_after <= 0.3 * plan.flops_before
    assert plan.flops_after == analysis.total_flops(analysis.describe_layers(arch, pruned.spec, 256))
    assert plan.params_after == analysis.count_params(arch, pruned.spec) == \
        sum(np.size(x) for x in jax.tree_util.tree_leaves(pruned.variables["params"]))
    assert any(n.startswith(("backbone.fpn.layer_blocks.", "backbone.fpn.inner_blocks.")) for n in plan.selected)


def test_mobilenet_v2_skips_are_stated_by_the_spec():
    """The spec says which blocks add their input; model files from before the flag still load."""
    spec = mobilenet_v2_spec()
    assert [b.name for b in spec.blocks if b.residual] == [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]
    data = spec_to_dict(spec)
    for block in data["blocks"]:
        del block["residual"]
    assert spec_from_dict(data) == spec


def test_the_last_group_narrows_only_as_far_as_the_budget_needs():
    """Faster R-CNN's groups are coarse (the FPN output group alone cuts ~15% of the FLOPs): the last
    group taken keeps as many channels as still meet the budget, one rounding step more would miss."""
    model = _detector("fasterrcnn_resnet50_fpn")
    plan = make_plan(model, score_model_like(model, seed=1), "shrink", "flops=-30%", allocation="layer")
    assert 0.30 <= 1 - plan.flops_after / plan.flops_before < 0.31
    groups = {g.name: g for g in graph_of(model.arch, model.spec).groups}
    by_layer = {l.name: l for l in analysis.describe_layers(model.arch, model.spec, 256)}
    last = plan.selected[-1]
    wider = {**plan.keep_channels, last: list(range(len(plan.keep_channels[last]) + 8))}
    assert len(wider[last]) < groups[last].width
    saved, _ = _shrink_savings([groups[n] for n in plan.selected], wider, by_layer, model.variables["params"])
    assert saved < 0.3 * plan.flops_before


def test_shufflenet_v2_groups_follow_the_channel_shuffle():
    """torchvision's shuffle interleaves a unit's two branches; the next unit passes its first half by
    the branch and reads the second half. So stage2.0's branch1 channels 0-28 pass stage2.1 and
    channels 29-57 are its branch's even inputs; the last unit's branch feeds conv5's odd inputs."""
    spec = shufflenet_v2_spec("shufflenet_v2_x1_0")
    groups = {g.name: g for g in graph_of("shufflenet_v2_x1_0", spec).groups}
    reader = {s.layer: s.index for s in groups["stage2.0.branch1.2"].consumers}["stage2.1.branch2.0"]
    assert reader == (-1,) * 29 + tuple(range(0, 58, 2))
    assert [(s.layer, s.index) for s in groups["stage4.3.branch2.5"].consumers] == [("conv5.0", tuple(range(1, 464, 2)))]
    into_stage3 = groups["stage2.3.branch2.5"]  # read by both branches of stage3.0, through its depthwise conv and BN
    assert [s.layer for s in into_stage3.depthwise] == ["stage3.0.branch1.0"]
    assert [s.layer for s in into_stage3.norms] == ["stage2.3.branch2.6", "stage3.0.branch1.1"]
    assert [s.layer for s in into_stage3.consumers] == ["stage3.0.branch1.2", "stage3.0.branch2.0"]
    assert _layers(groups["conv1.0"].producers) == {"conv1.0"}  # the stem's channels: protected
    assert "stage2.0.branch1.0" not in groups  # a depthwise conv makes no channels of its own


def _check_surgery(model, plan, images):
    """The pruned model equals the original with the plan's units masked; returns the pruned model."""
    pruned = apply_plan(model, plan)
    masked = _mask_removed(model, plan.selected) if plan.mode == "remove" else _mask_channels(model, plan)
    want = _run(dataclasses.replace(model, variables=masked), images)
    assert relative_error(_run(pruned, images), want) < 1e-5
    assert relative_error(want, _run(model, images)) > 1e-3
    assert plan.flops_after == analysis.total_flops(analysis.describe_layers(model.arch, pruned.spec, SIZE))
    assert plan.params_after == analysis.count_params(model.arch, pruned.spec)
    return pruned


def test_shufflenet_v2_remove_shrink_and_shrink_again(small_images, tmp_path):
    """remove -> shrink every group (stage widths through identity units) -> reload -> shrink again
    (over explicit channel orders), each step exact. A unit whose branch no longer keeps its input's
    width can't become the identity."""
    model = dataclasses.replace(_model("shufflenet_v2_x1_0"), meta={"preprocess": {"crop": SIZE}})
    removed = _check_surgery(model, make_plan(model, score_model_like(model, seed=13), "remove", "layers=40%"), small_images)
    plan = make_plan(removed, score_model_like(removed, seed=14), "shrink", "layers=99.9%", allocation="layer")
    assert {"stage2.0.branch1.2", "stage3.0.branch2.5", "conv5.0"} <= set(plan.selected)
    shrunk = _check_surgery(removed, plan, small_images)
    selections = dict(shrunk.spec.edits.channels)  # the shuffles and splits, edited
    assert sum(n.endswith(".order") for n in selections) > 8 and any(n.endswith(".left") for n in selections)
    save_model(shrunk, str(tmp_path / "shrunk"))
    reloaded = load_model(str(tmp_path / "shrunk"))
    assert reloaded.spec == shrunk.spec
    np.testing.assert_array_equal(_run(reloaded, small_images), _run(shrunk, small_images))
    removable = {u.name for u in graph_of(shrunk.arch, shrunk.spec).units} | dict(shrunk.spec.edits.removed).keys()
    stuck = [f"{u.name}.branch2" for u in shrunk.spec.units if u.stride == 1 and f"{u.name}.branch2" not in removable]
    assert stuck
    with pytest.raises(UserError, match=f"names '{stuck[0]}', which is not a remove-able unit"):
        apply_plan(shrunk, dataclasses.replace(plan, mode="remove", selected=[stuck[0]], keep_channels={}))
    again = make_plan(reloaded, score_model_like(reloaded, seed=15), "shrink", "layers=99.9%", allocation="layer", round_to=2)
    _check_surgery(reloaded, again, small_images)

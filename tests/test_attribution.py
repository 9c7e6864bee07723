"""Attribution parity with torch autograd (the Captum LayerGradientXActivation recipe: forward hooks
keep each layer's output and its gradient), and the consistency of the baselines."""

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from converters.mapping import state_dict_to_variables
from converters.reference import gradient_x_activation, random_torchvision
from tests.conftest import optimised
from xprune_jax import analysis, models
from xprune_jax.attribution.criteria import ScoringInputs, get_criterion
from xprune_jax.attribution.objectives import cross_entropy
from xprune_jax.attribution.statistics import statistics_step

ARCHS = ["resnet50", "mobilenet_v2", "shufflenet_v2_x1_0"]


@pytest.fixture(scope="module")
def images(coco_images):
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in (coco_images[3], coco_images[11])])


def torch_grad_x_act(model, names, x, labels=None):
    """Per layer: sum |a*g|, sum over images of |sum a*g|, and per-channel sums, by torch autograd.

    ``names=None`` hooks every Conv2d and Linear and every residual block / unit.
    """
    modules = dict(model.named_modules())
    if names is None:
        block_types = ("Bottleneck", "BasicBlock", "InvertedResidual")
        names = [n for n, m in modules.items()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) or type(m).__name__ in block_types]

    def objective():
        logits = model(x)
        target = logits.argmax(-1) if labels is None else labels
        return torch.nn.functional.cross_entropy(logits, target, reduction="sum")

    result = {}
    for name, ag in gradient_x_activation(model, names, objective).items():
        ag = ag.astype(np.float64)
        result[name] = {"abs": np.abs(ag).sum(), "signed": np.abs(ag.sum((1, 2))).sum(),
                        "channel_abs": np.abs(ag).sum((0, 1)), "channel_signed": np.abs(ag.sum(1)).sum(0)}
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_grad_x_act_matches_torch_autograd(arch, images):
    """Every layer's statistics equal torch autograd's, in float64 on both sides.

    Float64 because the signed reduction |sum_i a_i g_i| cancels heavily: in float32 the two
    frameworks' roundoff alone moves it by up to ~2% on random nets, which would hide a real error.
    """
    torch_model = random_torchvision(arch, images, seed=1).double()
    spec = models.get_architecture(arch).default_spec()
    module = models.build(arch, spec)
    with torch.no_grad():
        own_top1 = torch_model(images.double()).argmax(-1)
    labels = np.array([-1, 7], np.int32)  # image 0: the model's own top-1; image 1: a given label
    want = torch_grad_x_act(torch_model, None, images.double(), torch.tensor([own_top1[0].item(), 7]))
    with jax.enable_x64(True):
        variables = state_dict_to_variables({k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                                            models.variable_shapes(arch, spec), arch)
        variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables)
        batch = {"images": images.permute(0, 2, 3, 1).double().numpy(), "weights": np.ones(2), "labels": labels}
        stats = jax.tree_util.tree_map(np.asarray, optimised(statistics_step(module, cross_entropy), variables, batch))
    assert set(stats) == set(want) and len(stats) > 50
    for name, s in stats.items():
        for key in ("abs", "signed"):
            assert s[key] == pytest.approx(want[name][key], rel=1e-4), (name, key)
        for key in ("channel_abs", "channel_signed"):
            np.testing.assert_allclose(s[key], want[name][key], rtol=1e-4, atol=1e-6 * np.abs(want[name][key]).max(),
                                       err_msg=f"{name} {key}")

    layers = analysis.describe_layers(arch, spec)
    inputs = ScoringInputs(layers, variables["params"], stats, n_images=2)
    paper, mean = get_criterion("grad_x_act")(inputs), get_criterion("grad_x_act:mean")(inputs)
    signed = get_criterion("grad_x_act:signed")(inputs)
    for layer in layers:
        w = want[layer.name]
        assert paper[layer.name].score == pytest.approx(w["abs"] / 2, rel=1e-4)
        assert mean[layer.name].score == pytest.approx(w["abs"] / 2 / np.prod(layer.shape), rel=1e-4)
        assert signed[layer.name].score == pytest.approx(w["signed"] / 2, rel=1e-4)


def test_l1_matches_the_torch_state_dict():
    arch = "resnet18"
    torch.manual_seed(0)
    torch_model = torchvision.models.get_model(arch, weights=None)
    spec = models.get_architecture(arch).default_spec()
    variables = state_dict_to_variables({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                        models.variable_shapes(arch, spec), arch)
    layers = analysis.describe_layers(arch, spec)
    inputs = ScoringInputs(layers, variables["params"])
    l1, l1_mean = get_criterion("l1")(inputs), get_criterion("l1:mean")(inputs)
    sd = torch_model.state_dict()
    for layer in layers:
        keys = [k for k in sd if k.startswith(layer.name + ".") and k.endswith("weight") and sd[k].ndim in (2, 4)]
        want = sum(sd[k].abs().sum().item() for k in keys)
        assert l1[layer.name].score == pytest.approx(want, rel=1e-5), layer.name
        assert l1_mean[layer.name].score == pytest.approx(want / sum(sd[k].numel() for k in keys), rel=1e-5)
        if layer.kind != "block":
            (key,) = keys
            np.testing.assert_allclose(l1[layer.name].channel_scores, sd[key].abs().flatten(1).sum(1).numpy(), rtol=1e-5)


def test_random_is_seeded_and_reproducible():
    layers = analysis.describe_layers("resnet18", models.get_architecture("resnet18").default_spec())
    a = get_criterion("random")(ScoringInputs(layers, {}, seed=3))
    b = get_criterion("random")(ScoringInputs(layers, {}, seed=3))
    c = get_criterion("random")(ScoringInputs(layers, {}, seed=4))
    assert all(a[n].score == b[n].score for n in a) and any(a[n].score != c[n].score for n in a)
    np.testing.assert_array_equal(a["layer1.0.conv1"].channel_scores, b["layer1.0.conv1"].channel_scores)
    # A layer's score depends on the seed and its name only, not on which other layers exist.
    alone = get_criterion("random")(ScoringInputs([layers[5]], {}, seed=3))
    assert alone[layers[5].name].score == a[layers[5].name].score


def test_flops_match_torchvision_metadata():
    for arch, weights in [("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
                          ("mobilenet_v2", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1),
                          ("shufflenet_v2_x1_0", torchvision.models.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1)]:
        spec = models.get_architecture(arch).default_spec()
        layers = analysis.describe_layers(arch, spec)
        assert analysis.total_flops(layers) / 1e9 == pytest.approx(weights.meta["_ops"], abs=0.0015), arch
        assert analysis.count_params(arch, spec) == weights.meta["num_params"], arch


def test_taylor_weight_magnitudes_and_bn_scale_match_torch(images):
    """Channel-level peers' criteria against torch: Taylor ``sum |w dL/dw|`` from torch autograd (the
    gradient of the summed cross-entropy, float64), L1/L2 filter magnitudes per output and input
    channel, and |gamma| of the BatchNorm after each conv. MobileNetV2 has depthwise convs too."""
    arch = "mobilenet_v2"
    x = images[:, :, :96, :96].double()
    torch_model = random_torchvision(arch, images, seed=2).double()
    loss = torch.nn.functional.cross_entropy(torch_model(x), torch.tensor([3, 7]), reduction="sum")
    loss.backward()
    spec = models.get_architecture(arch).default_spec()
    layers = analysis.describe_layers(arch, spec, 96)
    with jax.enable_x64(True):
        variables = state_dict_to_variables({k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                                            models.variable_shapes(arch, spec), arch)
        variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables)
        batch = {"images": x.permute(0, 2, 3, 1).numpy(), "weights": np.ones(2), "labels": np.array([3, 7], np.int32)}
        stats, grads = jax.tree_util.tree_map(np.asarray, optimised(
            statistics_step(models.build(arch, spec), cross_entropy, True), variables, batch))
    inputs = ScoringInputs(layers, variables["params"], stats, grads, n_images=2)
    scores = {name: get_criterion(name)(inputs) for name in ("taylor_weight", "l1", "l2", "bn_scale")}
    modules = dict(torch_model.named_modules())
    checked = 0
    for layer in (l for l in layers if l.kind != "block"):
        w = modules[layer.name].weight.detach().numpy()
        w = w if w.ndim == 4 else w[:, :, None, None]  # (out, in, kh, kw)
        g = modules[layer.name].weight.grad.numpy().reshape(w.shape)
        depthwise = layer.kind == "depthwise"
        want = {"taylor_weight": np.abs(w * g) / 2, "l1": np.abs(w), "l2": w ** 2}
        for name, values in want.items():
            got = scores[name][layer.name]
            out, inp = values.sum((1, 2, 3)), values.sum((0, 2, 3))
            if name == "l2":
                out, inp = np.sqrt(out), np.sqrt(inp)
            np.testing.assert_allclose(got.channel_scores, out, rtol=1e-6, err_msg=f"{name} {layer.name}")
            assert (got.input_channel_scores is None) == depthwise
            if not depthwise:
                np.testing.assert_allclose(got.input_channel_scores, inp, rtol=1e-6, err_msg=f"{name} {layer.name}")
        bn = scores["bn_scale"][layer.name]
        if layer.norm is None:
            assert bn.score is None and bn.channel_scores is None and layer.name == "classifier.1"
        else:
            np.testing.assert_array_equal(bn.channel_scores, np.abs(modules[layer.norm].weight.detach().numpy()))
            checked += 1
    assert checked == 52 and scores["taylor_weight"]["features.3"].score > 0  # every conv has its BN; blocks scored



def test_criteria_are_compared_on_the_layers_both_score():
    """``bn_scale`` leaves layers without a BatchNorm unscored (a classifier): ``score`` compares it with
    another criterion, in either order, on the layers both score."""
    from xprune_jax.attribution.compare import compare

    l1 = {"features.1": 3.0, "features.2": 1.0, "features.3": 2.0, "classifier.1": 0.5}
    bn_scale = {"features.1": 0.2, "features.2": 0.1, "features.3": 0.3}
    for scores in ({"l1": l1, "bn_scale": bn_scale}, {"bn_scale": bn_scale, "l1": l1}):
        (row,) = compare(scores, bottom_fraction=0.34)
        assert row["layers"] == 3 and row["bottom_k"] == 1 and row["bottom_k_overlap"] == 1.0  # features.2 in both
        assert row["spearman"] == pytest.approx(0.5)

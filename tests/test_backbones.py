"""Parity of the ported torchvision backbones, through the real path: torch model with random
weights and BN statistics -> .pth file laid out like the official download -> convert -> Orbax
model dir -> load -> jitted apply. Every conv, every block and the logits are compared with torch
on real COCO images."""

import functools

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from converters.torchvision_io import convert, to_torch_state_dict
from converters.mapping import state_dict_to_variables
from converters.reference import outputs_by_name, random_torchvision, relative_error
from xprune_jax import models
from xprune_jax.checkpoint import load_model, save_model

ARCHS = ["resnet50", "mobilenet_v2", "shufflenet_v2_x1_0"]


@functools.lru_cache(maxsize=None)
def _apply(module):
    return jax.jit(functools.partial(models.apply_with_intermediates, module))


@pytest.fixture(scope="module")
def image_batch(coco_images):
    """Two real images (one portrait, one landscape) through torchvision's own eval transform."""
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    picks = [coco_images[0], coco_images[7]]
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in picks])


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory, monkeypatch_module, image_batch):
    """(torch model, model loaded back from its converted Orbax dir) for each architecture.

    resnet50 goes through the torch hub cache by weights name; the others through a file path.
    """
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    torch_model = random_torchvision(arch, image_batch, seed=ARCHS.index(arch))
    if arch == "resnet50":
        monkeypatch_module.setenv("TORCH_HOME", str(tmp / "torch_home"))
        enum = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        path = tmp / "torch_home" / "hub" / "checkpoints" / enum.url.rsplit("/", 1)[1]
        path.parent.mkdir(parents=True)
        weights = "ResNet50_Weights.IMAGENET1K_V2"
    else:
        path, weights = tmp / f"{arch}.pth", str(tmp / f"{arch}.pth")
    torch.save(torch_model.state_dict(), path)
    save_model(convert(arch, weights), str(tmp / "model"))
    return torch_model, load_model(str(tmp / "model"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_layer_and_logits_match_torch(converted, image_batch):
    torch_model, model = converted
    logits, acts = _apply(model.module)(model.variables, image_batch.permute(0, 2, 3, 1).numpy())
    torch_logits, torch_acts = outputs_by_name(torch_model, list(acts), image_batch)
    assert len(acts) > 20 and set(torch_acts) == set(acts)
    errors = {name: relative_error(acts[name], torch_acts[name]) for name in acts}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"
    assert relative_error(logits, torch_logits.numpy()) < 1e-4
    # Real images give a non-degenerate check: the two images are told apart.
    assert not np.allclose(logits[0], logits[1], atol=1e-3)


def test_model_dir_records_provenance_and_transform(converted):
    _, model = converted
    prov = model.meta["provenance"]
    assert prov["source"] == "torchvision" and len(prov["sha256"]) == 64
    if model.arch == "resnet50":
        assert prov["weights"] == "ResNet50_Weights.IMAGENET1K_V2"
        assert model.meta["preprocess"]["resize"] == 232  # the V2 weights' own transform
    assert model.meta["preprocess"]["crop"] == 224 and len(model.meta["categories"]) == 1000


def test_round_trip_flax_torch_flax_is_identity(converted):
    torch_model, model = converted
    state_dict = to_torch_state_dict(model.variables)
    fresh = torchvision.models.get_model(model.arch, weights=None)
    fresh.load_state_dict(state_dict, strict=True)  # loads into torchvision as it is
    for key, value in torch_model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], value), key
    back = state_dict_to_variables({k: v.numpy() for k, v in state_dict.items()},
                                   models.variable_shapes(model.arch, model.spec), what=model.arch)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.tree_util.tree_map(np.asarray, model.variables))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet101", "shufflenet_v2_x0_5",
                                  "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"])
def test_other_widths_fit_torchvision_state_dicts(arch):
    """The same code builds the other family members: their torchvision state_dicts map onto the
    Flax variables key for key and shape for shape."""
    torch.manual_seed(0)
    state_dict = {k: v.numpy() for k, v in torchvision.models.get_model(arch, weights=None).state_dict().items()}
    variables = state_dict_to_variables(state_dict, models.variable_shapes(arch, models.get_architecture(arch).default_spec()), arch)
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
    assert n_params == sum(v.size for k, v in state_dict.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


@pytest.mark.parametrize("groups, kernel, stride, pad, dilation, size", [
    (8, 3, 1, 1, 1, (13, 11)), (8, 3, 2, 1, 1, (13, 11)), (8, 5, 2, 2, 1, (13, 11)), (8, 3, 1, 2, 2, (13, 11)),
    (1, 1, 1, 0, 1, (13, 11)), (1, 1, 2, 0, 1, (13, 11)), (1, 3, 2, 1, 1, (13, 11)), (2, 3, 1, 1, 1, (13, 11)),
    (1, 3, 1, 1, 1, (2, 2)), (1, 3, 2, 1, 1, (4, 3)), (1, 3, 1, 2, 2, (2, 1)), (1, 5, 1, 2, 1, (1, 1)),
    (2, 3, 1, 1, 1, (2, 2))])
def test_cpu_conv_lowerings_equal_xla_conv(groups, kernel, stride, pad, dilation, size):
    """The CPU lowerings of depthwise, 1x1 and dense convs on small maps (im2col) compute what lax's conv computes."""
    from xprune_jax.models.layers import _conv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *size, 8)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 8 // groups, 8)).astype(np.float32)
    want = jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    got = jax.jit(_conv, static_argnums=(2, 3, 4, 5))(x, w, stride, pad, dilation, groups)
    lowered = not (groups == 2 or (groups == 1 and kernel > 1 and size == (13, 11)))  # else lax's own conv
    jaxpr = str(jax.make_jaxpr(_conv, static_argnums=(2, 3, 4, 5))(x, w, stride, pad, dilation, groups))
    assert ("conv_general_dilated" not in jaxpr) == lowered
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

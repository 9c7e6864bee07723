"""Resolve, read and convert torchvision weights; the torchvision model of unpruned Flax variables."""

import dataclasses
import json
import os
import re
import sys
import urllib.error

import numpy as np
import torch
import torchvision

from converters.mapping import state_dict_to_variables, variables_to_state_dict
from converters.safe_load import DisallowedGlobal, load_weights_only
from xprune_jax import __version__, models
from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.fileio import file_sha256


def _weights_enum(arch: str, name: str):
    """A torchvision weights enum from 'ResNet50_Weights.IMAGENET1K_V1', 'IMAGENET1K_V1' or 'DEFAULT'."""
    try:
        if "." in name:
            return torchvision.models.get_weight(name)
        return torchvision.models.get_model_weights(arch)[name]
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"unknown weights {name!r} for {arch}: give a .pth file or one of "
                        f"{', '.join(w.name for w in torchvision.models.get_model_weights(arch))}") from None


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pth", ".pt", ".bin")) or os.path.exists(weights)


def official_weights(arch: str, path: str):
    """The weights enum of ``arch`` whose download has this file's name (``resnet50-0676ba61.pth`` is
    ``ResNet50_Weights.IMAGENET1K_V1``), or None."""
    name = os.path.basename(path)
    return next((w for w in torchvision.models.get_model_weights(arch) if os.path.basename(w.url) == name), None)


def resolve_weights(arch: str, weights: str) -> tuple[str, object | None]:
    """``(file path, weights enum or None)``, as torchvision resolves them.

    A weights name is looked up in the torch hub cache (``$TORCH_HOME/hub/checkpoints/<official
    file name>``) and downloaded there when it is missing and a network is available. A file with an
    official file name (:func:`official_weights`) gets that enum.
    """
    if _looks_like_path(weights):
        if not os.path.isfile(weights):
            raise UserError(f"weights file {weights} does not exist: give an existing .pth file or a torchvision "
                            f"weights name such as {torchvision.models.get_model_weights(arch).DEFAULT}")
        return weights, official_weights(arch, weights)
    enum = _weights_enum(arch, weights)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(enum.url, cached, hash_prefix=None, progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise UserError(f"could not download {enum.url} ({e.__class__.__name__}); without a network, "
                            f"place the official file at {cached}") from None
    return cached, enum


def _names_a_module_class(name: str) -> bool:
    """Whether a pickled global names an ``nn.Module`` class of an already imported module (nothing is imported)."""
    module, _, attr = name.rpartition(".")
    cls = getattr(sys.modules.get(module), attr, None)
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A ``.pth`` file laid out like torchvision's downloads, as float32 NumPy arrays. It is read with
    ``torch.load(weights_only=True)``: a pickled module or other object is refused, not unpickled."""
    try:
        obj = load_weights_only(path)
    except DisallowedGlobal as e:
        what = "a pickled module" if _names_a_module_class(e.name) else "pickled Python objects"
        raise UserError(f"weights file {path} holds {what} ({e.name}), not a state_dict: save one with "
                        f"torch.save(model.state_dict(), path) instead ({what} is not loaded because unpickling "
                        "can run code)") from None
    for nested in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
            obj = obj[nested]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file {path} holds no state_dict of tensors; save one with "
                        "torch.save(model.state_dict(), path)")
    return {k: v.detach().float().numpy() for k, v in obj.items()}


# torchvision's own key upgrades (the modules' ``_load_from_state_dict`` for state_dict version < 2),
# as (pattern, replacement): the official COCO_V1 detection files keep these version-1 keys.
_LEGACY_KEYS = (
    (re.compile(r"^(.*fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
    (re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$"),
     lambda m: f"{m[1]}.{int(m[2]) // 2}.0.{m[3]}"),
)


def upgrade_legacy_keys(state_dict: dict) -> dict:
    """Rename version-1 keys (``rpn.head.conv.weight``, ``backbone.fpn.inner_blocks.0.weight``,
    RetinaNet's ``head.classification_head.conv.2.weight``) to the current module paths, as torchvision
    does when it loads them; current keys pass unchanged."""
    upgraded = {}
    for key, value in state_dict.items():
        for pattern, replacement in _LEGACY_KEYS:
            key = pattern.sub(replacement, key)
        upgraded[key] = value
    return upgraded


def preprocess_config(arch: str, enum=None, spec=None) -> dict:
    """The eval transform of the weights (or of the architecture's default weights). Detection
    weights carry no sizes: their ``GeneralizedRCNNTransform`` settings are the spec's."""
    architecture = models.get_architecture(arch)
    if architecture.task == "detection":
        return dataclasses.asdict((spec or architecture.default_spec()).transform)
    t = (enum or torchvision.models.get_model_weights(arch).DEFAULT).transforms()
    return {"resize": int(t.resize_size[0]), "crop": int(t.crop_size[0]), "mean": list(t.mean), "std": list(t.std),
            "interpolation": t.interpolation.value}


# The classifier layer of each family -> how many of its outputs make one class (RetinaNet: 9 anchors).
_CLASS_LAYERS = {"fc.weight": 1, "classifier.1.weight": 1, "roi_heads.box_predictor.cls_score.weight": 1,
                 "head.classification_head.cls_logits.weight": 9}
CARD_FIELDS = ("categories", "preprocess", "transform", "dataset", "command", "metrics")


def read_model_card(path: str) -> dict:
    """The model card beside a weights file (``X.pth`` -> ``X.json``), or ``{}``.

    Weights trained here (``benchmarks/fixtures/``) carry one: ``categories``, the classifiers'
    eval ``preprocess`` or the detectors' ``transform`` sizes, and how they were made.
    """
    card_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(card_path):
        return {}
    try:
        with open(card_path) as f:
            card = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"model card {card_path} is not valid JSON ({e}); fix or remove it") from None
    unknown = sorted(set(card) - set(CARD_FIELDS))
    if not isinstance(card, dict) or unknown:
        raise UserError(f"model card {card_path} has unknown fields {unknown}; allowed: {', '.join(CARD_FIELDS)}")
    return card


def _num_classes(state_dict: dict, default: int) -> int:
    for key, per_class in _CLASS_LAYERS.items():
        if key in state_dict:
            return state_dict[key].shape[0] // per_class
    return default


def convert(arch: str, weights: str) -> Model:
    """torchvision weights (a file or a weights name) -> a Flax :class:`Model` of ``arch``.

    The number of classes comes from the weights. The eval transform and categories come from a
    model card beside a file (:func:`read_model_card`: weights trained on other data), else from the
    weights enum of the name or of the official file name (:func:`official_weights`), else from the
    architecture's DEFAULT weights, which ``meta['provenance']['preprocess_assumed']`` then records.
    """
    architecture = models.get_architecture(arch)
    path, enum = resolve_weights(arch, weights)
    state_dict = upgrade_legacy_keys(read_state_dict(path))
    by_file = path == weights
    card = read_model_card(path) if by_file else {}
    spec = architecture.default_spec()
    spec = dataclasses.replace(spec, num_classes=_num_classes(state_dict, spec.num_classes))
    if "transform" in card:
        spec = dataclasses.replace(spec, transform=dataclasses.replace(spec.transform, **card["transform"]))
    variables = state_dict_to_variables(state_dict, models.variable_shapes(arch, spec), what=arch)
    default = torchvision.models.get_model_weights(arch).DEFAULT
    default_categories = list((enum or default).meta["categories"])
    if "categories" in card:
        categories = list(card["categories"])
    elif spec.num_classes == len(default_categories):
        categories = default_categories
    else:
        categories = [str(i) for i in range(spec.num_classes)]
    sha256 = file_sha256(path)
    source = {}
    if enum is not None:
        source["weights_enum"] = str(enum)
        if by_file:  # torchvision's file names end in the first hex digits of the file's sha256
            prefix = re.search(r"-([a-f0-9]+)\.", os.path.basename(path))[1]
            source["file_name_matches_sha256"] = sha256.startswith(prefix)
    elif not card.get("preprocess") and "transform" not in card:
        source["preprocess_assumed"] = str(default)
    meta = {
        "preprocess": card.get("preprocess") or preprocess_config(arch, enum, spec),
        "categories": categories,
        "provenance": {
            "source": "torchvision", "weights": weights if by_file else str(enum), "file": os.path.abspath(path),
            "sha256": sha256, **source, "converter": __name__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "xprune_jax": __version__,
            **({"model_card": {k: card[k] for k in ("dataset", "command", "metrics") if k in card}} if card else {}),
        },
    }
    return Model(arch, spec, variables, meta)


_SIZES = ("resize", "crop", "min_size", "max_size")


def assumption_note(model: Model) -> str | None:
    """The line ``xprune convert`` prints when the eval transform was assumed, not known (None when known)."""
    provenance = model.meta["provenance"]
    if "preprocess_assumed" not in provenance:
        return None
    preprocess = model.meta["preprocess"]
    sizes = ", ".join(f"{k} {v}" for k, v in preprocess.items() if k in _SIZES)
    card = os.path.splitext(provenance["weights"])[0] + ".json"
    field = "transform" if "min_size" in preprocess else "preprocess"
    return (f"note: {provenance['weights']} has no model card and no official torchvision file name, so the "
            f"preprocessing of {provenance['preprocess_assumed']} was assumed ({sizes}); if the weights were "
            f"trained otherwise, write a model card {card} with their '{field}' and convert again")


def to_torch_state_dict(variables: dict) -> dict[str, torch.Tensor]:
    """Flax variables -> a torchvision state_dict (loadable with ``load_state_dict(strict=True)``)."""
    return {k: torch.from_numpy(v.copy()) for k, v in variables_to_state_dict(variables).items()}


def torch_model(arch: str, variables: dict) -> torch.nn.Module:
    """The torchvision model of ``arch`` (default spec, any number of classes) holding ``variables``, in eval mode."""
    state_dict = to_torch_state_dict(variables)
    kwargs = {}
    if (num_classes := _num_classes(state_dict, 0)):
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()

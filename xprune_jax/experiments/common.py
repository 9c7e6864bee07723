"""What experiments share: getting a converted model to work on."""

import json
import os

import numpy as np

from xprune_jax import models
from xprune_jax.checkpoint import Model, load_model, save_model
from xprune_jax.data.images import classification_transform, load_rgb
from xprune_jax.errors import UserError
from xprune_jax.runs import RunFolder


def check_weights_arch(arch: str, weights: str, field: str = "config.weights") -> None:
    """A model directory given as ``weights`` must hold ``arch``: checked on its model.json, before any work."""
    path = os.path.join(weights or "", "model.json")
    try:
        with open(path) as f:
            found = json.load(f).get("arch")
    except (OSError, ValueError, AttributeError):
        return  # no model directory, or one load_model will say is corrupt
    if found != arch:
        raise UserError(f"{field} {weights} holds a {found} model, not a {arch}: give {arch} weights there (or run "
                        f"{found} instead)")


def prepare_model(arch: str, weights: str, images: list[str], seed: int, folder: RunFolder,
                  trust_pickle: bool = False) -> tuple[Model, object]:
    """``(model, torch model or None)``, the converted model saved with the run's artefacts. ``weights``
    is a model dir, any ``xprune convert --weights`` value, or ``"random"``: seeded random torch weights
    with BN statistics calibrated on ``images`` and then randomised (what can be checked without
    downloads), written with the run's artefacts. ``trust_pickle`` is ``xprune convert --trust_pickle``
    (YOLOv8 files)."""
    if weights and os.path.isfile(os.path.join(weights, "model.json")):
        return load_model(weights), None
    try:
        import torch

        from converters import reference, torchvision_io, ultralytics_io
    except ImportError as e:
        raise UserError(f"converting weights needs torch and torchvision ({e}); `pip install -e '.[torch]'`") from None
    torch_model = None
    if arch.startswith("yolov8") and weights != "random":
        model = ultralytics_io.convert(arch, weights, trust_pickle=trust_pickle)
        save_model(model, os.path.join(folder.out, "models", arch), overwrite=True)
        return model, None
    if weights == "random":
        if models.get_architecture(arch).task != "classification":
            raise UserError(f"weights='random' is for classifiers; give {arch} a weights file or a model dir")
        preprocess = torchvision_io.preprocess_config(arch)
        batch = np.stack([classification_transform(load_rgb(p), **preprocess) for p in images])
        torch_model = reference.random_torchvision(arch, torch.from_numpy(batch.transpose(0, 3, 1, 2)), seed=seed)
        name = os.path.join("weights", f"{arch}-random-seed{seed}.pth")
        weights = os.path.join(folder.out, name)
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        torch.save(torch_model.state_dict(), weights)
    model = torchvision_io.convert(arch, weights)
    if torch_model is not None and folder.staged:  # where the file will be once the run finishes
        final = os.path.join(folder.path, name)
        model.meta["provenance"].update(weights=final, file=final)
    save_model(model, os.path.join(folder.out, "models", arch), overwrite=True)
    return model, torch_model

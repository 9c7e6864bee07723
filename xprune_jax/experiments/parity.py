"""The ``parity`` experiment: convert torchvision models and check, layer by layer on real images,
that the Flax port computes what torch computes.

With ``weights="random"`` the torch model gets seeded random weights and BN statistics calibrated
on the images and then randomised (what this machine can check without downloads); otherwise any
``--weights`` value of ``xprune convert`` is accepted.
"""

import functools
import os

import jax
import numpy as np

from xprune_jax import models, precision, runs
from xprune_jax.data.images import classification_transform, list_images, load_rgb
from xprune_jax.errors import UserError
from xprune_jax.experiments.common import check_weights_arch, prepare_model
from xprune_jax.experiments.registry import register


def validate(config) -> None:
    """The archs are classifiers this experiment can convert, and the image folder exists."""
    archs = config.get("archs")
    if not isinstance(archs, (tuple, list)) or not archs:
        raise UserError(f"config.archs is {archs!r}; give a tuple of classifier names, e.g. ('resnet50',)")
    for arch in archs:
        if not isinstance(arch, str) or models.get_architecture(arch).task != "classification":
            raise UserError(f"config.archs holds {arch!r}; the parity experiment compares torchvision classifiers")
        check_weights_arch(arch, config.get("weights", {}).get(arch, ""), f"config.weights['{arch}']")
    if not isinstance(config.get("images"), str) or config.images and not os.path.isdir(config.images):
        raise UserError(f"config.images {config.get('images')!r} is not a folder; point it at images ('' = the bundled ones)")
    if not isinstance(config.get("seed"), int) or isinstance(config.seed, bool):
        raise UserError(f"config.seed is {config.get('seed')!r}; it must be an integer")


@register("parity", validate=validate)
def parity(config, folder: runs.RunFolder) -> tuple[dict, str]:
    try:
        import torch

        from converters import reference, torchvision_io
    except ImportError as e:
        raise UserError(f"the parity experiment needs torch and torchvision ({e}); `pip install -e '.[torch]'`") from None
    if config.get("precision", "highest") != "highest":
        raise UserError("the parity experiment compares with torch at full float32: run it with precision 'highest'")
    precision.set_precision("highest")
    images = list_images(config.images or os.path.join(runs.DEMO_COCO, "val2017"))
    results = {}
    for arch in config.archs:
        preprocess = torchvision_io.preprocess_config(arch)
        batch = np.stack([classification_transform(load_rgb(p), **preprocess) for p in images])
        model, torch_model = prepare_model(arch, config.weights.get(arch, "random"), images, config.seed, folder)
        if torch_model is None:
            torch_model = torchvision_io.torch_model(arch, model.variables)
        apply = jax.jit(functools.partial(models.apply_with_intermediates, model.module))
        logits, acts = apply(model.variables, batch)
        torch_logits, torch_acts = reference.outputs_by_name(
            torch_model, list(acts), torch.from_numpy(batch.transpose(0, 3, 1, 2)))
        # torch's hooks fire in execution order, so the errors are listed by depth.
        errors = {name: reference.relative_error(acts[name], torch_acts[name]) for name in torch_acts}
        worst = max(errors, key=errors.get)
        results[arch] = {
            "weights": model.meta["provenance"]["weights"], "images": len(images), "layers_compared": len(errors),
            "worst_layer": worst, "worst_layer_relative_error": errors[worst],
            "logits_relative_error": reference.relative_error(logits, torch_logits.numpy()),
            "top1_agreement": float(np.mean(np.argmax(logits, -1) == torch_logits.numpy().argmax(-1))),
            "layer_relative_errors": errors,
        }
        _plot_layer_errors(arch, errors, os.path.join(folder.out, "plots", f"parity_{arch}.png"))
    return results, _report(results, config)


def _plot_layer_errors(arch: str, errors: dict, path: str) -> None:
    plt = runs.pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.semilogy(range(len(errors)), [max(e, 1e-12) for e in errors.values()], ".", ms=3)
    ax.axhline(1e-4, color="red", lw=0.8, label="tolerance 1e-4")
    ax.set(title=f"{arch}: JAX vs torch, max |diff| / max |torch| per layer (depth order)", xlabel="layer", ylabel="relative error")
    ax.legend(loc="upper left")
    fig.tight_layout()
    runs.save_figure(fig, path)


def _report(results: dict, config) -> str:
    lines = ["# Conversion parity: Flax port vs torchvision", "",
             f"Seed {config.seed}; float32 with highest matmul precision; every conv, linear and block output compared "
             "with the torch module of the same name (forward hooks). Config and environment: `config.json`, "
             "`environment.json`.", "",
             "| arch | weights | images | layers | worst layer | its relative error | logits relative error | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for arch, r in results.items():
        lines.append(f"| {arch} | {r['weights']} | {r['images']} | {r['layers_compared']} | `{r['worst_layer']}` | "
                     f"{r['worst_layer_relative_error']:.1e} | {r['logits_relative_error']:.1e} | {r['top1_agreement']:.0%} |")
    lines += ["", *[f"![{arch}](plots/parity_{arch}.png)" for arch in results], ""]
    return "\n".join(lines)

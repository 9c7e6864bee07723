"""``xprune score``: score every layer of a model with one or more criteria on calibration images."""

import functools
import os

import jax
import numpy as np
import tqdm

from xprune_jax import analysis, models, parallel, runs
from xprune_jax.attribution.compare import compare
from xprune_jax.attribution.criteria import ScoringInputs, get_criterion
from xprune_jax.attribution.objectives import get_objective
from xprune_jax.attribution.statistics import statistics_step
from xprune_jax.checkpoint import Model
from xprune_jax.data.images import classification_transform, list_images, load_rgb, prefetch
from xprune_jax.errors import UserError


def calibration_images(coco_root: str, n: int, seed: int) -> list[str]:
    """``n`` images of ``coco_root/val2017`` drawn with ``seed`` (a different seed, other images)."""
    folder = os.path.join(coco_root, "val2017")
    if not os.path.isdir(folder):
        raise UserError(f"COCO folder {coco_root} has no val2017/: point --coco at a folder laid out like the official download")
    paths = list_images(folder)
    if n > len(paths):
        raise UserError(f"--calib_images={n} but {folder} holds only {len(paths)} images; ask for at most {len(paths)}")
    picks = np.random.default_rng(seed).choice(len(paths), size=n, replace=False)
    return [paths[i] for i in sorted(picks)]


def calibration_loader(model: Model):
    """path -> network input of ``analysis.input_size(model)`` squared, as the model's own preprocessing makes it
    (a detector pipeline that resizes to a size range, like torchvision's, pads to its ``square_side``)."""
    if models.get_architecture(model.arch).task == "classification":
        return functools.partial(_load_classification, preprocess=model.meta["preprocess"])
    from xprune_jax.evaluation.coco import pipeline_for

    pipeline = pipeline_for(model)
    side = getattr(pipeline, "square_side", None) or analysis.input_size(model)
    return lambda path: pipeline.preprocess(np.asarray(load_rgb(path)), (side, side))[0]


def gather_statistics(model: Model, paths: list[str], objective, batch_size: int, progress: bool = True) -> dict:
    """Summed gradient x activation statistics over ``paths`` (one jitted pass per batch)."""
    mesh = parallel.data_mesh()
    batch_size = parallel.round_up_batch(batch_size, mesh)
    step = statistics_step(model.module, objective)
    variables = jax.device_put(model.variables, parallel.replicated(mesh))
    load = calibration_loader(model)
    total = None
    with tqdm.tqdm(total=len(paths), unit="img", desc="score", disable=not progress) as bar:
        for _, images in prefetch(paths, load, batch_size):
            weights = parallel.pad_batch(np.ones(len(images), np.float32), batch_size)
            batch = {"images": parallel.pad_batch(np.stack(images), batch_size), "weights": weights,
                     "labels": np.full(batch_size, -1, np.int32)}
            batch = jax.device_put(batch, parallel.batch_sharding(mesh))
            stats = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), step(variables, batch))
            total = stats if total is None else jax.tree_util.tree_map(np.add, total, stats)
            bar.update(len(images))
    return total


def _load_classification(path, preprocess):
    return classification_transform(load_rgb(path), **preprocess)


def score_model(model: Model, criteria: list[str], objective: str = "", coco_root: str = "", calib_images: int = 32,
                batch_size: int = 8, seed: int = 0, progress: bool = True, all_channel_scores: bool = False) -> dict:
    """Scores of every layer under each criterion, with layer metadata and a comparison.

    ``channel_scores`` are the primary (first) criterion's; ``all_channel_scores`` adds every
    criterion's under ``channel_scores_by``.
    """
    task = models.get_architecture(model.arch).task
    chosen = [get_criterion(name) for name in criteria]
    if not chosen:
        raise UserError("no --criterion given; choose from grad_x_act, grad_x_act:mean, grad_x_act:signed, l1, l1:mean, random")
    objective_name, objective_fn = get_objective(objective, task)
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))
    inputs = ScoringInputs(layers, model.variables["params"], seed=seed)
    paths = []
    if any(c.needs_data for c in chosen):
        if not coco_root:
            raise UserError("data-driven criteria need calibration images: pass --coco=ROOT")
        paths = calibration_images(coco_root, calib_images, seed)
        inputs.statistics = gather_statistics(model, paths, objective_fn, batch_size, progress)
        inputs.n_images = len(paths)
    results = {c.full_name: c(inputs) for c in chosen}
    primary = chosen[0].full_name
    return {
        "criterion": primary, "criteria": list(results), "objective": objective_name, "arch": model.arch,
        "calibration": {"images": [os.path.basename(p) for p in paths], "seed": seed, "batch_size": batch_size},
        "layers": [{
            "name": layer.name, "kind": layer.kind, "shape": list(layer.shape), "params": layer.params,
            "flops": layer.flops, "score": results[primary][layer.name].score,
            "scores": {c: results[c][layer.name].score for c in results},
            "channel_scores": _listed(results[primary][layer.name].channel_scores),
            **({"channel_scores_by": {c: _listed(results[c][layer.name].channel_scores) for c in results}}
               if all_channel_scores else {}),
        } for layer in layers],
        "comparison": compare({c: {n: s.score for n, s in r.items()} for c, r in results.items()}),
        "environment": runs.environment(),
    }


def _listed(values):
    return None if values is None else [float(v) for v in values]

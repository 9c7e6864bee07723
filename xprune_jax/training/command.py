"""``xprune finetune``: recover a pruned model by BN recalibration and fine-tuning, into a new model directory."""

import dataclasses
import os

import jax
import numpy as np

from xprune_jax import models, parallel, predict
from xprune_jax.attribution.score import draw
from xprune_jax.checkpoint import Model, load_model, save_model
from xprune_jax.data.images import image_folder as read_image_folder
from xprune_jax.errors import UserError
from xprune_jax.evaluation.coco import evaluate, evaluation_images
from xprune_jax.training import data as training_data
from xprune_jax.training.loop import FinetuneConfig, finetune, remove_checkpoints
from xprune_jax.training.recalibrate import recalibrate_bn
from xprune_jax.training.teacher import resolve_teacher


def checkpoint_dir(out: str) -> str:
    """Where a run writing ``out`` keeps its checkpoints (beside it; removed once ``out`` is written)."""
    return os.path.abspath(out).rstrip("/") + ".checkpoints"


def run_finetune(model_dir: str, out: str, config: FinetuneConfig, teacher_dir: str | None = None,
                 coco: str | None = None, split: str = "train2017", image_folder: str | None = None,
                 recalibrate_images: int = 0, overwrite: bool = False, progress: bool = True,
                 validation: str | None = None) -> dict:
    """Everything is validated before the first step; BN recalibration (``recalibrate_images`` images of the
    training data drawn with the seed, no augmentation) runs first and is recorded on its own. The fine-tuned
    model's metric on the ``validation`` data (:func:`validation_data`) is recorded as ``final.metric``.
    Returns the fine-tuning record."""
    config.validate()
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
    if bool(coco) == bool(image_folder):
        raise UserError("give the training data as exactly one of --coco=ROOT (with --split) or --image_folder=DIR")
    if recalibrate_images < 0:
        raise UserError(f"--recalibrate_bn must be >= 0 images (got {recalibrate_images})")
    student = load_model(model_dir)
    teacher, teacher_record = (resolve_teacher(student, teacher_dir) if config.objective.needs_teacher
                               else (None, None))
    if image_folder:
        data = training_data.labelled_folder(student, image_folder)
    else:
        data = training_data.coco_split(student, coco, split, labelled=bool(config.objective.task))
    where = validation_data(student, coco, split, validation)
    if recalibrate_images:
        student = recalibrate_bn(student, draw(data.paths, recalibrate_images, config.seed), config.batch_size,
                                 progress=progress)
    directory = checkpoint_dir(out)
    model, record = finetune(student, teacher, data, config, directory, teacher_record, progress=progress)
    if where is not None:
        record = {**record, "final": {**record["final"], "metric": final_metric(model, where, config.batch_size, directory)}}
        model = dataclasses.replace(model, meta={**model.meta, "finetune": [*model.meta["finetune"][:-1], record]})
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xprune finetune: checkpoints closed")
    if parallel.is_main():  # process 0 alone writes the model (and removes the shared checkpoints)
        save_model(model, out, overwrite=overwrite)
        remove_checkpoints(directory)
    return record


def validation_data(student: Model, coco: str | None, split: str, validation: str | None) -> tuple[str, str] | None:
    """Where the final metric is measured, checked before any training: ``("coco", root)`` for a detector (AP on
    the root's val2017; by default --coco's, when it has one with annotations and --split is another split),
    ``("folder", dir)`` for a classifier (top-1 on a labelled ImageFolder), or None (``validation="none"``, or
    no default)."""
    if validation == "none":
        return None
    if models.get_architecture(student.arch).task == "detection":
        root = validation or coco
        if not validation and (split == "val2017" or not os.path.isfile(
                os.path.join(root, "annotations", "instances_val2017.json"))):
            return None
        for part in ("val2017", os.path.join("annotations", "instances_val2017.json")):
            if not os.path.exists(os.path.join(root, part)):
                raise UserError(f"the validation data {root} has no {part}: give --validation a COCO root with "
                                "val2017/ and its annotations, or --validation=none")
        evaluation_images(root)  # its annotated images are there
        return "coco", root
    if not validation:
        return None
    read_image_folder(validation, student.meta.get("categories"))
    return "folder", validation


def final_metric(model: Model, where: tuple[str, str], batch_size: int, directory: str) -> dict:
    """The fine-tuned model's metric on the validation data (None on processes other than 0 for a detector)."""
    kind, source = where
    if kind == "coco":
        metrics = evaluate(model, source, os.path.join(directory, "validation"), batch_size, progress=False,
                           overwrite=True)
        return {"name": "AP", "value": None if metrics is None else metrics["AP"], "data": os.path.abspath(source),
                "images": None if metrics is None else metrics["images"]}
    paths, labels, _ = read_image_folder(source, model.meta.get("categories"))
    predicted = predict.classify(model, paths, batch_size, progress=False).argmax(-1)
    return {"name": "top1", "value": float(np.mean(predicted == labels)), "data": os.path.abspath(source),
            "images": len(paths)}

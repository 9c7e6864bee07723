"""``xprune finetune``: recover a pruned model by BN recalibration and fine-tuning, into a new model directory."""

import os

import jax

from xprune_jax import parallel
from xprune_jax.attribution.score import draw
from xprune_jax.checkpoint import load_model, save_model
from xprune_jax.errors import UserError
from xprune_jax.training import data as training_data
from xprune_jax.training.loop import FinetuneConfig, finetune, remove_checkpoints
from xprune_jax.training.recalibrate import recalibrate_bn
from xprune_jax.training.teacher import resolve_teacher


def checkpoint_dir(out: str) -> str:
    """Where a run writing ``out`` keeps its checkpoints (beside it; removed once ``out`` is written)."""
    return os.path.abspath(out).rstrip("/") + ".checkpoints"


def run_finetune(model_dir: str, out: str, config: FinetuneConfig, teacher_dir: str | None = None,
                 coco: str | None = None, split: str = "train2017", image_folder: str | None = None,
                 recalibrate_images: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Everything is validated before the first step; BN recalibration (``recalibrate_images`` images of the
    training data drawn with the seed, no augmentation) runs first and is recorded on its own. Returns the
    fine-tuning record."""
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
    if recalibrate_images:
        student = recalibrate_bn(student, draw(data.paths, recalibrate_images, config.seed), config.batch_size,
                                 progress=progress)
    directory = checkpoint_dir(out)
    model, record = finetune(student, teacher, data, config, directory, teacher_record, progress=progress)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xprune finetune: checkpoints closed")
    if parallel.is_main():  # process 0 alone writes the model (and removes the shared checkpoints)
        save_model(model, out, overwrite=overwrite)
        remove_checkpoints(directory)
    return record

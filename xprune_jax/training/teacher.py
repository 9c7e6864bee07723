"""The teacher of a pruned model: recorded when pruning (``meta["pruned_from"]``: the source model directory
and its fingerprint), found again and checked when fine-tuning."""

import hashlib
import json
import os

import jax
import numpy as np

from xprune_jax import models
from xprune_jax.checkpoint import Model, load_model
from xprune_jax.errors import UserError
from xprune_jax.spec import spec_to_dict


def fingerprint(model: Model) -> str:
    """sha256 of the architecture, the spec and every variable (path, dtype, shape, bytes)."""
    digest = hashlib.sha256(json.dumps([model.arch, spec_to_dict(model.spec)], sort_keys=True).encode())
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(model.variables)[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def source_record(model_dir: str, model: Model) -> dict:
    """What a pruned model records of the model it was cut from."""
    return {"model": os.path.abspath(model_dir), "fingerprint": fingerprint(model)}


def num_classes(arch: str, spec) -> int:
    if arch.startswith("yolov8"):
        return spec.detect.num_classes
    return spec.num_classes


def check_teacher(student: Model, teacher: Model) -> None:
    """A teacher must be the student's architecture with the same classes."""
    if teacher.arch != student.arch:
        raise UserError(f"the teacher is a {teacher.arch} but the model is a {student.arch}; give a teacher of the "
                        "same architecture (the model before pruning)")
    classes = num_classes(student.arch, student.spec), num_classes(teacher.arch, teacher.spec)
    if classes[0] != classes[1]:
        raise UserError(f"the teacher predicts {classes[1]} classes but the model {classes[0]}; give the teacher "
                        "trained on the model's classes (the model before pruning)")


def resolve_teacher(student: Model, teacher_dir: str | None) -> tuple[Model, dict]:
    """The teacher (``teacher_dir``, else the model the last plan was applied to) and its provenance record."""
    if teacher_dir:
        teacher = load_model(teacher_dir)
        record = source_record(teacher_dir, teacher)
    else:
        source = student.meta.get("pruned_from")
        if not source:
            raise UserError("the model records no model it was pruned from (pruned before this was recorded, or not "
                            "pruned); pass --teacher=DIR, or --objective=task to train without one")
        if not os.path.isfile(os.path.join(source["model"], "model.json")):
            raise UserError(f"the model it was pruned from, {source['model']}, is gone; pass --teacher=DIR")
        teacher = load_model(source["model"])
        record = source_record(source["model"], teacher)
        if record["fingerprint"] != source["fingerprint"]:
            raise UserError(f"{source['model']} has changed since the model was pruned from it (another fingerprint); "
                            "pass --teacher=DIR explicitly")
    models.get_architecture(teacher.arch)
    check_teacher(student, teacher)
    return teacher, record

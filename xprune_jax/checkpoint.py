"""Model directories: an Orbax checkpoint of the variables plus ``model.json`` (arch, spec, meta).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from xprune_jax import models
from xprune_jax.errors import UserError
from xprune_jax.fileio import atomic_path
from xprune_jax.spec import spec_from_dict, spec_to_dict

FORMAT_VERSION = 1


@dataclasses.dataclass
class Model:
    """Everything a model is: its architecture, spec, variables and metadata (provenance,
    preprocessing, categories and, once pruned, the plan)."""

    arch: str
    spec: Any
    variables: dict
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def module(self):
        return models.build(self.arch, self.spec)


def write_json_atomic(path: str, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def save_model(model: Model, out_dir: str, overwrite: bool = False) -> None:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already exists: choose another --out or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        variables = jax.tree_util.tree_map(np.asarray, model.variables)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, "variables"), variables)
        checkpointer.wait_until_finished()
        write_json_atomic(os.path.join(staging, "model.json"), {
            "format_version": FORMAT_VERSION, "arch": model.arch, "spec": spec_to_dict(model.spec), **model.meta})
        if os.path.exists(out_dir):
            old = staging + ".old"
            os.rename(out_dir, old)
            os.rename(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model(model_dir: str) -> Model:
    meta_path = os.path.join(model_dir, "model.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{model_dir} is not a model directory (no model.json): make one with `xprune convert`")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        arch, spec = meta.pop("arch"), spec_from_dict(meta.pop("spec"))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is corrupt ({e}); re-create the model with `xprune convert`") from None
    if meta.pop("format_version", None) != FORMAT_VERSION:
        raise UserError(f"{model_dir} was written by an incompatible xprune_jax version; re-convert it")
    try:
        variables = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(model_dir, "variables")))
    except Exception as e:  # Orbax raises many types for missing or damaged files
        raise UserError(f"cannot read the variables of {model_dir} ({e.__class__.__name__}); "
                        "re-create the model with `xprune convert`") from None
    expected = models.variable_shapes(arch, spec)
    variables = _nested_as(variables, expected)
    _check_shapes(variables, expected, model_dir)
    return Model(arch, spec, variables, meta)


def _nested_as(variables: dict, expected: dict) -> dict:
    """``variables`` nested as ``expected`` where only the nesting of module names differs (files written before
    a block became a submodule: ``branch2.0`` then, ``branch2`` / ``0`` now); else unchanged."""
    def by_name(tree):
        return {jax.tree_util.keystr(p[:1]) + ".".join(str(k.key) for k in p[1:]): x
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    saved = by_name(variables)
    if set(saved) != set(by_name(expected)):
        return variables
    return jax.tree_util.tree_map_with_path(
        lambda p, _: saved[jax.tree_util.keystr(p[:1]) + ".".join(str(k.key) for k in p[1:])], expected)


def _check_shapes(variables: dict, expected: dict, where: str) -> None:
    def shapes(tree):
        return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    got, want = shapes(variables), shapes(expected)
    if got != want:
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        misshaped = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        raise UserError(f"{where}: variables do not match the spec (missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}, mis-shaped {misshaped[:4]}); re-create the model")

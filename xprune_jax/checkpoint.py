"""Model directories: an Orbax checkpoint of the variables plus ``model.json`` (arch, spec, meta).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place.
"""

import dataclasses
import hashlib
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


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer for this process alone: a model directory is written by one process (process 0
    of a multi-process run) and read by each on its own, with no barrier among them."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def save_model(model: Model, out_dir: str, overwrite: bool = False) -> None:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already exists: choose another --out or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        variables = jax.tree_util.tree_map(np.asarray, model.variables)
        checkpointer = _local_checkpointer()
        checkpointer.save(os.path.join(staging, "variables"), variables)
        checkpointer.wait_until_finished()
        write_json_atomic(os.path.join(staging, "model.json"), {
            "format_version": FORMAT_VERSION, "arch": model.arch, "spec": spec_to_dict(model.spec), **model.meta,
            "variables_sha256": variables_sha256(model)})
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
        if not isinstance(meta, dict):
            raise TypeError(f"it holds a {type(meta).__name__}, not an object")
        arch, spec = meta.pop("arch"), spec_from_dict(meta.pop("spec"))
        if not isinstance(meta.get("preprocess", {}), dict) or not isinstance(meta.get("categories", []), list):
            raise TypeError("preprocess must be an object and categories a list")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{meta_path} is corrupt ({e.__class__.__name__}: {e}); re-create the model with `xprune convert`") from None
    if meta.pop("format_version", None) != FORMAT_VERSION:
        raise UserError(f"{model_dir} was written by an incompatible xprune_jax version; re-convert it")
    if not isinstance(arch, str) or arch not in models.ARCHITECTURES:
        raise UserError(f"{meta_path} is corrupt (unknown arch {arch!r}); re-create the model with `xprune convert`")
    problem = preprocess_problem(arch, meta.get("preprocess", {}))
    if problem:
        raise UserError(f"{meta_path} is corrupt ({problem}); re-create the model with `xprune convert`")
    try:
        expected = models.variable_shapes(arch, spec)
    except Exception as e:  # a hand-edited spec can break the module in many ways
        raise UserError(f"{meta_path} is corrupt: its spec does not build a {arch} ({e.__class__.__name__}); "
                        "re-create the model with `xprune convert`") from None
    variables_dir = os.path.abspath(os.path.join(model_dir, "variables"))
    _check_checkpoint_files(variables_dir, model_dir)
    try:
        variables = _local_checkpointer().restore(variables_dir)
    except Exception as e:  # Orbax raises many types for missing or damaged files
        raise UserError(f"cannot read the variables of {model_dir} ({e.__class__.__name__}): the checkpoint is "
                        "damaged; re-create the model with `xprune convert`") from None
    recorded = meta.pop("variables_sha256", None)
    model = Model(arch, spec, variables, meta)
    if recorded is not None and recorded != variables_sha256(model):  # of the variables as stored
        raise UserError(f"the variables of {model_dir} differ from the checksum in its model.json: the checkpoint is "
                        "damaged; re-create the model with `xprune convert`")
    nested = _nested_as(variables, expected)
    _check_shapes(nested, expected, model_dir)
    return model if nested is variables else Model(arch, spec, nested, meta)


def preprocess_problem(arch: str, preprocess: dict, complete: bool = False) -> str | None:
    """What is wrong with ``preprocess``, the input transform that ``arch``'s code reads, or None.
    Given keys must have the right type; with ``complete``, every key the transform needs must be
    given (classifiers: resize, crop, mean, std; YOLOv8: imgsz)."""
    checks = {"resize": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "crop": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "mean": lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v),
              "std": lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and x for x in v),
              "interpolation": lambda v: v in ("bilinear", "bicubic", "nearest"),
              "imgsz": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 32 == 0}
    wrong = [k for k, ok in checks.items() if k in preprocess and not ok(preprocess[k])]
    if wrong:
        return f"preprocess {wrong[0]} is {preprocess[wrong[0]]!r}"
    needed = (("resize", "crop", "mean", "std") if models.get_architecture(arch).task == "classification"
              else ("imgsz",) if arch.startswith("yolov8") else ())
    missing = [k for k in needed if k not in preprocess] if complete else []
    return f"preprocess lacks {', '.join(missing)}" if missing else None


def check_preprocess(model: Model, where: str) -> None:
    """A :class:`UserError` unless ``model`` has the whole input transform its architecture reads."""
    problem = preprocess_problem(model.arch, model.meta.get("preprocess", {}), complete=True)
    if problem:
        raise UserError(f"{where}: the model's {problem}; re-create the model with `xprune convert`")


def _check_checkpoint_files(variables_dir: str, model_dir: str) -> None:
    """Read and decode every array of the Orbax (OCDBT) checkpoint with tensorstore before Orbax
    restores it.

    Orbax restores in an event loop that it closes on the first failed read while other reads are
    still in flight; their completions then print "Event loop is closed" tracebacks after the
    error. Here every read is awaited, so a damaged checkpoint fails cleanly.
    """
    import tensorstore as ts

    problem = None
    try:
        context, base = ts.Context(), {"driver": "ocdbt", "base": f"file://{variables_dir}/"}
        keys = ts.KvStore.open(base, context=context).result().list().result()
        arrays = [(k.decode().rsplit("/", 1)[0], DRIVERS[k.decode().rsplit("/", 1)[1]]) for k in keys
                  if k.decode().rsplit("/", 1)[-1] in DRIVERS]
        if not arrays:
            problem = "no stored arrays"
        reads = [ts.open({"driver": driver, "kvstore": {**base, "path": name + "/"}}, context=context, open=True).result().read()
                 for name, driver in arrays]
        for read in reads:  # wait for every read, failed or not
            try:
                read.result()
            except Exception as e:  # tensorstore reports damage as ValueError with a status text
                problem = problem or str(e).split(":")[0]
    except Exception as e:
        problem = str(e).split(":")[0] or e.__class__.__name__
    if problem:
        raise UserError(f"cannot read the variables of {model_dir} ({problem}): the checkpoint is damaged; "
                        "re-create the model with `xprune convert`")


DRIVERS = {".zarray": "zarr", "zarr.json": "zarr3"}  # Orbax's array formats, by metadata file


def variables_sha256(model: Model) -> str:
    """sha256 of every variable's path, dtype, shape and bytes, in path order (once per :class:`Model`:
    models are not mutated; pruning makes new ones). ``model.json`` records it; loading checks it."""
    cached = vars(model).get("_variables_sha256")
    if cached is None:
        digest = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_flatten_with_path(model.variables)[0]:
            array = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{jax.tree_util.keystr(path)} {array.dtype.str} {array.shape}\n".encode())
            digest.update(memoryview(array.reshape(-1).view(np.uint8)))
        cached = vars(model)["_variables_sha256"] = digest.hexdigest()
    return cached


def model_fingerprint(model: Model) -> str:
    """sha256 of what a model computes: arch, spec, preprocessing, categories and its variables
    (:func:`variables_sha256`). Results record it (scores, evaluations); what reuses them checks it."""
    return hashlib.sha256(json.dumps([model.arch, spec_to_dict(model.spec), model.meta.get("preprocess"),
                                      model.meta.get("categories"), variables_sha256(model)], sort_keys=True).encode()
                          ).hexdigest()


def _nested_as(variables: dict, expected: dict) -> dict:
    """``variables`` nested as ``expected`` where only the nesting of module names differs (files written before
    a block became a submodule: ``branch2.0`` then, ``branch2`` / ``0`` now); else unchanged."""
    def by_name(tree):
        return {jax.tree_util.keystr(p[:1]) + ".".join(str(k.key) for k in p[1:]): x
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    if jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected):
        return variables
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

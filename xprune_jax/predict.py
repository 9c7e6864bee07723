"""Batched, jitted, data-parallel inference over image files."""

import functools

import jax
import numpy as np
import tqdm

from xprune_jax import parallel, precision
from xprune_jax.checkpoint import Model
from xprune_jax.data.images import classification_transform, load_rgb, prefetch


@functools.lru_cache(maxsize=16)
def _jitted_apply(module, mesh):
    return jax.jit(module.apply, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.batch_sharding(mesh))


def classify(model: Model, paths: list[str], batch_size: int = 8, mesh=None, progress: bool = True) -> np.ndarray:
    """Logits ``[len(paths), classes]`` (float32) after the model's eval transform, at the current precision."""
    mesh = mesh or parallel.data_mesh()
    batch_size = parallel.round_up_batch(batch_size, mesh)
    apply = _jitted_apply(model.module, mesh)
    variables = jax.device_put(precision.cast(model.variables), parallel.replicated(mesh))
    load = functools.partial(_load_classification, preprocess=model.meta["preprocess"])
    logits = []
    with tqdm.tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar:
        for _, images in prefetch(paths, load, batch_size):
            out = apply(variables, precision.cast(parallel.pad_batch(np.stack(images), batch_size)))
            logits.append(np.asarray(out, np.float32)[: len(images)])
            bar.update(len(images))
    return np.concatenate(logits)


def _load_classification(path: str, preprocess: dict) -> np.ndarray:
    return classification_transform(load_rgb(path), **preprocess)

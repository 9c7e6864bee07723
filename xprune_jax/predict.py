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
    """Logits ``[len(paths), classes]`` (float32) after the model's eval transform, at the current precision.
    In a multi-process run each process decodes only its rows of each batch, and every process gets
    every image's logits."""
    mesh = mesh or parallel.data_mesh()
    parallel.check_batch_size(batch_size, mesh)
    rows = parallel.local_rows(batch_size, mesh)
    apply = _jitted_apply(model.module, mesh)
    variables = parallel.replicate(precision.cast(model.variables), mesh)
    load = functools.partial(_load_classification, preprocess=model.meta["preprocess"])
    shares = parallel.local_items(list(range(len(paths))), batch_size, mesh)
    mine = [i for share in shares for i in share]
    chunks = prefetch([paths[i] for i in mine], load, len(rows))
    blank, logits = None, []
    with tqdm.tqdm(total=len(paths), unit="img", desc="predict", disable=not (progress and parallel.is_main())) as bar:
        for start, share in zip(range(0, len(paths), batch_size), shares):
            images = next(chunks)[1] if share else []
            if blank is None:  # padding rows (a process without images in a short last batch sends only these)
                blank = np.zeros_like(images[0] if images else load(paths[0]))
            batch = np.stack(images + [blank] * (len(rows) - len(images)))
            out = apply(variables, parallel.global_batch(precision.cast(batch), batch_size, mesh))
            logits.append(np.asarray(parallel.host_rows(out, rows), np.float32)[: len(share)])
            bar.update(min(batch_size, len(paths) - start))
    order, every = parallel.gather(np.asarray(mine, np.int64)), parallel.gather(np.concatenate(logits))
    result = np.empty_like(every)
    result[order] = every
    return result


def _load_classification(path: str, preprocess: dict) -> np.ndarray:
    return classification_transform(load_rgb(path), **preprocess)

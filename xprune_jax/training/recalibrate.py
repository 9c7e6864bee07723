"""BatchNorm recalibration: re-estimate every (non-frozen) BatchNorm's running statistics on N images with
every weight frozen, as torch does with ``model.train()``, ``momentum=None`` and no gradient: each batch
is normalised with its own statistics, and the running mean and (unbiased) variance become the average
of the batches' (torch's cumulative moving average; batches weighted by their images, the same when
they are equal).
"""

import concurrent.futures
import functools
import time
from typing import Sequence

import jax
import numpy as np
import tqdm

from xprune_jax import parallel
from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.models.layers import BATCH_MOMENTS, BATCH_STATS


@functools.lru_cache(maxsize=8)
def _moments_step(module):
    def step(variables, images):
        _, state = module.apply(variables, images, mutable=[BATCH_STATS, BATCH_MOMENTS])
        return state.get(BATCH_MOMENTS, {})

    return jax.jit(step)


def _image_batches(model: Model, images, batch_size: int, mesh):
    """``(images in the batch, the batch on the mesh)``: sharded where it splits over the mesh (each process
    loading only its rows), else (a short last batch) replicated, loaded whole by every process."""
    if isinstance(images, np.ndarray):
        load = images.__getitem__
    else:
        from xprune_jax.attribution.score import calibration_loader

        loader = calibration_loader(model)
        load = lambda i: loader(images[i])  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for start in range(0, len(images), batch_size):
            size = min(batch_size, len(images) - start)
            if size % mesh.size == 0:
                rows = parallel.local_rows(size, mesh)
                local = np.stack(list(pool.map(load, range(start + rows.start, start + rows.stop))))
                yield size, parallel.global_batch(local, size, mesh)
            else:
                whole = np.stack(list(pool.map(load, range(start, start + size))))
                yield size, parallel.replicate(whole, mesh)


def recalibrate_bn(model: Model, images: "Sequence[str] | np.ndarray", batch_size: int = 16, mesh=None,
                   progress: bool = True) -> Model:
    """``model`` with every non-frozen BatchNorm's running statistics re-estimated on ``images`` (paths,
    preprocessed by the model's own eval transform at its square input size, or an array ``[N, H, W, 3]`` of
    network inputs). The new model's ``meta["recalibrate_bn"]`` records the images, batch size, number of
    BatchNorms and seconds. Models without trainable BatchNorm (FrozenBN only, fused YOLOv8) come back
    unchanged, with 0 BatchNorms recorded."""
    if len(images) == 0:
        raise UserError("BN recalibration needs at least one image; pass --recalibrate_bn=N with N > 0")
    mesh = mesh or parallel.data_mesh()
    parallel.check_batch_size(batch_size, mesh)
    step = _moments_step(model.module)
    variables = parallel.replicate(model.variables, mesh)
    start = time.perf_counter()
    sums, total = None, 0
    with tqdm.tqdm(total=len(images), unit="img", desc="recalibrate BN", disable=not (progress and parallel.is_main())) as bar:
        for size, batch in _image_batches(model, images, batch_size, mesh):
            if size < 2:
                continue  # one image has no batch variance (torch refuses it in train mode)
            moments = step(variables, batch)
            weighted = jax.tree_util.tree_map(lambda m, n=size: np.asarray(m, np.float64) * n, moments)
            sums = weighted if sums is None else jax.tree_util.tree_map(np.add, sums, weighted)
            total += size
            bar.update(size)
    if total == 0:
        raise UserError("BN recalibration needs batches of at least 2 images; pass more images or a larger batch size")
    stats = jax.tree_util.tree_map(np.asarray, model.variables.get(BATCH_STATS, {}))
    layers = 0
    for path, leaf in (jax.tree_util.tree_flatten_with_path(sums)[0] if sums else []):
        keys = [p.key for p in path]
        node = stats
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = (leaf / total).astype(np.float32)
        layers += keys[-1] == "mean"
    record = {"images": int(total), "batch_size": batch_size, "bn_layers": layers,
              "seconds": round(time.perf_counter() - start, 3)}
    variables = {**model.variables, **({BATCH_STATS: stats} if stats else {})}
    return Model(model.arch, model.spec, variables, {**model.meta, "recalibrate_bn": record})

"""BatchNorm recalibration: re-estimate every (non-frozen) BatchNorm's running statistics on N images with
every weight frozen, as torch does with ``model.train()``, ``momentum=None`` and no gradient: each batch
is normalised with its own statistics, and the running mean and (unbiased) variance become the average
of the batches' (torch's cumulative moving average; batches weighted by their images, the same when
they are equal).
"""

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


def _image_batches(model: Model, images, batch_size: int):
    if isinstance(images, np.ndarray):
        for start in range(0, len(images), batch_size):
            yield images[start: start + batch_size]
        return
    from xprune_jax.attribution.score import calibration_loader
    from xprune_jax.data.images import prefetch

    for _, arrays in prefetch(list(images), calibration_loader(model), batch_size):
        yield np.stack(arrays)


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
    batch_size = parallel.round_up_batch(batch_size, mesh)
    step = _moments_step(model.module)
    variables = jax.device_put(model.variables, parallel.replicated(mesh))
    start = time.perf_counter()
    sums, total = None, 0
    with tqdm.tqdm(total=len(images), unit="img", desc="recalibrate BN", disable=not progress) as bar:
        for batch in _image_batches(model, images, batch_size):
            if len(batch) < 2:
                continue  # one image has no batch variance (torch refuses it in train mode)
            sharding = parallel.batch_sharding(mesh) if len(batch) % mesh.size == 0 else parallel.replicated(mesh)
            moments = step(variables, jax.device_put(batch, sharding))
            weighted = jax.tree_util.tree_map(lambda m, n=len(batch): np.asarray(m, np.float64) * n, moments)
            sums = weighted if sums is None else jax.tree_util.tree_map(np.add, sums, weighted)
            total += len(batch)
            bar.update(len(batch))
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

"""Gradient x activation statistics of every layer from ONE jitted forward + backward per batch.

The gradient with respect to each layer's output comes from the ``perturbations`` collection that
``capture`` sets up (no hooks, no second model). Each layer's a * dL/da is reduced inside the same
jitted function, so only a few numbers per layer leave it, and batches accumulate by addition.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax import models, parallel
from xprune_jax.models.layers import INTERMEDIATES, PERTURBATIONS, at_least_float32


def _reduce(a, g, per_image: bool = False) -> dict:
    """Sums over the images of a batch, or with ``per_image`` each image's values (in float32 at least,
    also for a bfloat16 network); per-channel values keep the channel (last) axis."""
    ag = (at_least_float32(a) * at_least_float32(g)).reshape(a.shape[0], -1, a.shape[-1])  # [images, positions, channels]
    images = () if per_image else (0,)
    return {
        "abs": jnp.sum(jnp.abs(ag), axis=(*images, 1, 2)),  # sum over images of sum_i |a_i g_i|
        "signed": jnp.sum(jnp.abs(jnp.sum(ag, axis=(1, 2))), axis=images),  # sum over images of |sum_i a_i g_i|
        "channel_abs": jnp.sum(jnp.abs(ag), axis=(*images, 1)),
        "channel_signed": jnp.sum(jnp.abs(jnp.sum(ag, axis=1)), axis=images),
    }


def _sum_over_images(per_image: dict) -> dict:
    """Every leaf ``[images, ...]`` summed over its images as ONE reduction of one ``[images, D]`` array.
    XLA combines per-leaf sums of a sharded batch into one all-reduce too, but of one buffer per leaf
    (hundreds), and between processes each buffer is a gloo exchange of its own on CPU."""
    leaves, treedef = jax.tree_util.tree_flatten(per_image)
    images = leaves[0].shape[0]
    totals = jnp.sum(jnp.concatenate([leaf.reshape(images, -1) for leaf in leaves], axis=1), axis=0)
    bounds = np.cumsum([0] + [leaf[0].size for leaf in leaves])
    return jax.tree_util.tree_unflatten(treedef, [totals[lo:hi].reshape(leaf.shape[1:])
                                                  for lo, hi, leaf in zip(bounds[:-1], bounds[1:], leaves)])


@functools.lru_cache(maxsize=8)
def statistics_step(module, objective, weight_gradients: bool = False, mesh=None):
    """A jitted ``(variables, batch) -> {layer: {abs, signed, channel_abs, channel_signed}}``; with
    ``weight_gradients``, ``(that, dL/dparams)`` from the same backward pass (for Taylor criteria).
    With a ``mesh`` (the batch sharded over it), the sums over the batch are all-reduced over its
    devices inside the step, and the results come back replicated on every device of every process.

    ``batch`` holds ``images`` plus whatever the objective reads (``weights`` masks padded images), and
    ``model_targets`` where the model itself computes the loss (Faster R-CNN's training forward).
    """

    def step(variables, batch):
        inputs = _model_inputs(batch)
        shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)[PERTURBATIONS]
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def loss(perturbations, params):
            out, state = module.apply({**variables, "params": params, PERTURBATIONS: perturbations}, *inputs,
                                      mutable=[INTERMEDIATES])
            return objective(out, batch, state[INTERMEDIATES]), state[INTERMEDIATES]

        wrt = (0, 1) if weight_gradients else 0
        grads, acts = jax.grad(loss, argnums=wrt, has_aux=True)(zeros, variables["params"])
        grads, params_grads = grads if weight_gradients else (grads, None)
        acts, grads = models.flatten_names(acts), models.flatten_names(grads)
        if mesh is None or mesh.size == 1:  # each statistic on its own: scores bit for bit as in earlier versions
            statistics = {name: _reduce(acts[name], grads[name]) for name in acts}
        else:
            statistics = _sum_over_images({name: _reduce(acts[name], grads[name], per_image=True) for name in acts})
        return (statistics, params_grads) if weight_gradients else statistics

    if mesh is None:
        return jax.jit(step)
    return jax.jit(step, out_shardings=parallel.replicated(mesh))


def _model_inputs(batch: dict) -> tuple:
    """What the model is called with: the images, and ``model_targets`` where the model computes the loss."""
    return (batch["images"], batch["model_targets"]) if "model_targets" in batch else (batch["images"],)


def loss_step(module, objective, mesh=None):
    """A jitted ``(variables, batch) -> objective`` of a forward pass (the batch as for :func:`statistics_step`),
    summed over the batch's valid images and, with a ``mesh``, over its devices."""

    def step(variables, batch):
        out, state = module.apply(variables, *_model_inputs(batch), mutable=[INTERMEDIATES])
        return objective(out, batch, state[INTERMEDIATES])

    if mesh is None:
        return jax.jit(step)
    return jax.jit(step, out_shardings=parallel.replicated(mesh))

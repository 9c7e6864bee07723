"""Objectives: the scalar L whose gradient attribution explains, summed over the valid images of a
batch (so each image's gradient is its own dL/da, whatever the batch size)."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from xprune_jax.errors import UserError

OBJECTIVES: dict[str, Callable] = {}
DEFAULT_OBJECTIVE = {"classification": "cross_entropy"}


def register(name: str):
    def decorator(fn):
        OBJECTIVES[name] = fn
        return fn

    return decorator


@register("cross_entropy")
def cross_entropy(logits, batch: dict):
    """Cross-entropy against ``batch["labels"]`` where given (>= 0), else against the model's own
    top-1 prediction."""
    own = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    labels = jnp.where(batch["labels"] >= 0, batch["labels"], own)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * batch["weights"])


def get_objective(name: str, task: str) -> tuple[str, Callable]:
    name = name or DEFAULT_OBJECTIVE.get(task, "")
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r} for a {task} model; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return name, OBJECTIVES[name]

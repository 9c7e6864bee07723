"""Numerical precision of the models' forward (and backward) passes, as a choice every command shares.

- ``highest``: float32 parameters and inputs, convolutions and matmuls at full float32
  (``jax_default_matmul_precision="highest"``). What the parity tests and evaluation use, and the
  command-line default.
- ``default``: float32 parameters and inputs, the backend's default matmul precision: TF32 for
  float32 convolutions and matmuls on Ampere and later NVIDIA GPUs, bfloat16 passes on TPUs, plain
  float32 on CPU (where it is ``highest``, bit for bit).
- ``bfloat16``: the floating parameters (BatchNorm statistics included) and the network's input cast
  to bfloat16, so every layer runs in bfloat16; what follows the network (box decoding, top-k, NMS,
  and the attribution's reductions) runs in float32 (:func:`~xprune_jax.models.layers.at_least_float32`).

:func:`set_precision` sets it for the process (the command line does, from ``--precision``);
:func:`current` says which is in effect, and results record it. The places that run a model pass
their parameters and input batch through :func:`cast`.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax.errors import UserError

PRECISIONS = ("highest", "default", "bfloat16")
_bfloat16 = False


def check(name: str) -> str:
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")
    return name


def set_precision(name: str) -> None:
    """Make ``name`` the precision of every model run from now on in this process."""
    global _bfloat16
    check(name)
    jax.config.update("jax_default_matmul_precision", "highest" if name == "highest" else None)
    _bfloat16 = name == "bfloat16"


def current() -> str:
    """The precision in effect (without :func:`set_precision`: JAX's own, ``default`` unless the
    process asked JAX for full float32 matmuls)."""
    if _bfloat16:
        return "bfloat16"
    return "highest" if jax.config.jax_default_matmul_precision in ("highest", "float32") else "default"


@contextlib.contextmanager
def use(name: str):
    """``set_precision(name)`` inside the block, the previous precision after it."""
    previous_bfloat16, previous_matmul = _bfloat16, jax.config.jax_default_matmul_precision
    set_precision(name)
    try:
        yield
    finally:
        globals()["_bfloat16"] = previous_bfloat16
        jax.config.update("jax_default_matmul_precision", previous_matmul)


def cast(tree):
    """``tree`` (parameters, or an input batch) with its floating arrays in bfloat16 under ``bfloat16``;
    unchanged otherwise."""
    if not _bfloat16:
        return tree

    def to_bfloat16(x):
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            return x.astype(jnp.bfloat16)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(jnp.bfloat16)
        return x

    return jax.tree_util.tree_map(to_bfloat16, tree)

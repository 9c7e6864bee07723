"""xprune_jax: explainability-inspired layer-wise pruning of detectors in JAX/Flax."""

from xprune_jax.errors import UserError

__all__ = ["UserError", "prune"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "prune":  # imported on first use: the package's import stays light
        from xprune_jax.api import prune
        return prune
    raise AttributeError(f"module 'xprune_jax' has no attribute {name!r}")

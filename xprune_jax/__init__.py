"""xprune_jax: explainability-inspired layer-wise pruning of detectors in JAX/Flax."""

from xprune_jax.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"

"""Training losses in JAX (static shapes), matched to the reference implementations."""

from xprune_jax.losses.yolov8 import (
    LossConfig,
    assign_targets,
    detection_loss,
    flatten_head_maps,
    head_maps_from_intermediates,
    model_loss,
)

__all__ = ["LossConfig", "assign_targets", "detection_loss", "flatten_head_maps", "head_maps_from_intermediates",
           "model_loss"]

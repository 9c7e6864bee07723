"""Layers shared by every architecture, with torch semantics in NHWC.

Module names mirror the torch module paths (``layer1.0.conv1``), so a parameter's path is its
torch state_dict key and one converter serves every architecture. Every conv and linear layer
records its output with :func:`capture`, under its own path: no hooks are needed to read or
differentiate with respect to any layer's activation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

INTERMEDIATES = "intermediates"
PERTURBATIONS = "perturbations"


def capture(module: nn.Module, x: jax.Array) -> jax.Array:
    """Record ``x`` as ``module``'s output.

    It is sown into the ``intermediates`` collection and can be perturbed through the
    ``perturbations`` collection (whose gradient is dL/d output). Both are no-ops unless the
    caller applies the model with those collections.
    """
    x = module.perturb("output", x, collection=PERTURBATIONS)
    module.sow(INTERMEDIATES, "output", x, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    return x


class Conv2d(nn.Module):
    """``torch.nn.Conv2d``: explicit symmetric padding (never 'SAME'), groups, optional bias."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None  # None: torch's usual ``dilation * (k // 2)``
    groups: int = 1
    dilation: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        k, in_features = self.kernel_size, x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels do not split into {self.groups} groups")
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (k, k, in_features // self.groups, self.features),
        )
        pad = self.dilation * (k // 2) if self.padding is None else self.padding
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            rhs_dilation=(self.dilation, self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return capture(self, y)


class Linear(nn.Module):
    """``torch.nn.Linear`` (kernel stored as (in, out))."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return capture(self, x @ kernel.astype(x.dtype) + bias.astype(x.dtype))


def batch_norm(name: str, eps: float = 1e-5) -> nn.BatchNorm:
    """Inference-mode ``BatchNorm2d`` (running statistics); eps 0 gives torchvision's FrozenBN."""
    return nn.BatchNorm(use_running_average=True, epsilon=eps, name=name)


def max_pool(x, kernel: int, stride: int, padding: int):
    """``torch.nn.MaxPool2d`` (padding counts as -inf, floor mode)."""
    return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=((padding, padding), (padding, padding)))


def relu6(x):
    return jnp.clip(x, 0.0, 6.0)


def channel_shuffle(x, groups: int):
    """torchvision's channel shuffle in NHWC: (g, C/g) -> (C/g, g)."""
    *lead, c = x.shape
    x = x.reshape(*lead, groups, c // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*lead, c)

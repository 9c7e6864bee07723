"""Layers shared by every architecture, with torch semantics in NHWC.

Module names mirror the torch module paths (``layer1.0.conv1``), so a parameter's path is its
torch state_dict key and one converter serves every architecture. Every conv and linear layer
records its output with :func:`capture`, under its own path: no hooks are needed to read or
differentiate with respect to any layer's activation.

Pruning edits a model as data (:class:`Edits`, applied by :func:`edited`): layer widths, named
channel selections (:func:`select`) and removed units, by module path. A conv or linear layer whose
kernel exists takes its width from it.
"""

import contextlib
import contextvars
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax.spec import register_spec

INTERMEDIATES = "intermediates"
IM2COL_MAX_PIXELS = 4  # CPU: dense convs with at most this many output pixels run as im2col + matmul (see _conv)
PERTURBATIONS = "perturbations"
_ONE_PRIMITIVE_PER_CONV = contextvars.ContextVar("one_primitive_per_conv", default=False)
_CHANNELS = contextvars.ContextVar("channels", default={})
WIDTH_FIELDS = ("features", "groups", "feature_group_count")  # module fields that follow a layer's width


@register_spec
@dataclasses.dataclass(frozen=True)
class Edits:
    """What pruning changed in a model, by module path: a layer's output width (a depthwise conv's too),
    the indices of a named channel selection (:func:`select`), and the units removed: made the identity
    (``"identity"``: the module returns its input) or dropped (``"drop"``: it returns no channels, so its
    concat slot goes)."""

    widths: tuple[tuple[str, int], ...] = ()
    channels: tuple[tuple[str, tuple[int, ...]], ...] = ()
    removed: tuple[tuple[str, str], ...] = ()


@contextlib.contextmanager
def edited(edits: Edits):
    """Build and run modules as ``edits`` say, any Flax module included: a module's width fields
    (``features``, and ``groups``/``feature_group_count`` where they equal it: depthwise) are set while
    it runs; a removed module returns its input or none of its channels."""
    widths, removed = dict(edits.widths), dict(edits.removed)

    def interceptor(next_fun, args, kwargs, context):
        path = ".".join(context.module.path)
        if context.method_name != "__call__" or path not in widths and path not in removed:
            return next_fun(*args, **kwargs)
        if path in removed:
            return args[0] if removed[path] == "identity" else args[0][..., :0]
        module = context.module
        old = {f: getattr(module, f) for f in WIDTH_FIELDS if hasattr(module, f)}
        for field, value in old.items():
            if field == "features" or value == old["features"]:
                object.__setattr__(module, field, widths[path])
        try:
            return next_fun(*args, **kwargs)
        finally:
            for field, value in old.items():
                object.__setattr__(module, field, value)

    token = _CHANNELS.set(dict(edits.channels))
    try:
        with nn.intercept_methods(interceptor):
            yield
    finally:
        _CHANNELS.reset(token)


class Edited(nn.Module):
    """``module`` as ``edits`` say (:func:`xprune_jax.prune` gives one), with the same variables' layout."""

    module: nn.Module
    edits: Edits

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        with edited(self.edits):
            return self.module(*args, **kwargs)


def select(module: nn.Module, name: str, x: jax.Array, index) -> jax.Array:
    """``x``'s channels at ``index`` (a slice, indices, or a function of ``x``), unless pruning edited this
    selection (``{module path}.{name}``): channel splits and shuffles that pruning may move go through here.
    A slice is always an equation of its own (the tracer finds the selection even when it takes everything)."""
    with jax.named_scope(f"select:{name}"):
        edited_index = _CHANNELS.get().get(".".join((*module.path, name)))
        if edited_index is None:
            if callable(index):
                return index(x)
            if isinstance(index, slice):
                return jax.lax.slice_in_dim(x, *index.indices(x.shape[-1])[:2], axis=-1)
            return jnp.take(x, np.asarray(index, int), axis=-1, mode="clip")
        index = np.asarray(edited_index, int)
        start = int(index[0]) if len(index) else 0
        if np.array_equal(index, np.arange(start, start + len(index))):  # contiguous: a slice
            return jax.lax.slice_in_dim(x, start, start + len(index), axis=-1)
        return jnp.take(x, index, axis=-1, mode="clip")  # by a constant: the tracer follows it


@contextlib.contextmanager
def one_primitive_per_conv():
    """Within this context every conv lowers to one ``conv_general_dilated``, whatever the backend:
    what the channel tracer reads (the CPU lowering below spreads a depthwise conv over slices)."""
    token = _ONE_PRIMITIVE_PER_CONV.set(True)
    try:
        yield
    finally:
        _ONE_PRIMITIVE_PER_CONV.reset(token)


def capture(module: nn.Module, x: jax.Array) -> jax.Array:
    """Record ``x`` as ``module``'s output.

    It is sown into the ``intermediates`` collection and can be perturbed through the
    ``perturbations`` collection (whose gradient is dL/d output). Both are no-ops unless the
    caller applies the model with those collections.
    """
    x = module.perturb("output", x, collection=PERTURBATIONS)
    module.sow(INTERMEDIATES, "output", x, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    return x


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` in float32 if its dtype is narrower (a bfloat16 network's outputs, before boxes are decoded),
    else unchanged (float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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
        features, groups = self.features, self.groups
        if self.has_variable("params", "kernel"):  # its width is its kernel's
            shape = self.get_variable("params", "kernel").shape
            features, groups = shape[-1], in_features // shape[2]
        if in_features % groups:
            raise ValueError(f"{self.name}: {in_features} input channels do not split into {groups} groups")
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (k, k, in_features // groups, features),
        )
        pad = self.dilation * (k // 2) if self.padding is None else self.padding
        y = _conv(x, kernel.astype(x.dtype), self.stride, pad, self.dilation, groups)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (features,)).astype(x.dtype)
        return capture(self, y)


def _conv(x, kernel, stride: int, pad: int, dilation: int, groups: int):
    """The convolution, lowered for speed on CPU where XLA's own conv is slow (see benchmarks/):

    - depthwise (``groups == channels``) as ``kh * kw`` strided slices times per-channel weights,
      summed: one fused elementwise loop, 25-55x faster than XLA CPU's grouped conv;
    - 1x1 without padding as a matmul;
    - dense ``k x k`` convs with at most ``IM2COL_MAX_PIXELS`` output pixels (ResNet-50's last stage at
      64 px is 2x2, where XLA CPU's conv takes up to 27x this) as those slices concatenated over
      channels (im2col) times the kernel as one matrix.

    The same sums (im2col's in another order); parameters, gradients and captures are unchanged. Other
    backends keep ``lax.conv_general_dilated`` (cuDNN and the TPU compiler handle every case well), and
    so does :func:`one_primitive_per_conv`.
    """
    kh, kw, per_group_in, out = kernel.shape
    if jax.default_backend() == "cpu" and not _ONE_PRIMITIVE_PER_CONV.get():
        if kh == kw == 1 and groups == 1 and pad == 0:
            return x[:, ::stride, ::stride, :] @ kernel[0, 0]
        depthwise = groups == x.shape[-1] == out and per_group_in == 1 and kh * kw > 1
        n, h, w, c = x.shape
        ho, wo = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1, (w + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
        if depthwise or (groups == 1 and ho * wo <= IM2COL_MAX_PIXELS):
            xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
            taps = [jax.lax.slice(xp, (0, i * dilation, j * dilation, 0),
                                  (n, i * dilation + stride * (ho - 1) + 1, j * dilation + stride * (wo - 1) + 1, c),
                                  (1, stride, stride, 1)) for i in range(kh) for j in range(kw)]
            if depthwise:
                return functools.reduce(jnp.add, (tap * kernel[i // kw, i % kw, 0] for i, tap in enumerate(taps)))
            return jnp.concatenate(taps, axis=-1) @ kernel.reshape(kh * kw * c, out)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


class Linear(nn.Module):
    """``torch.nn.Linear`` (kernel stored as (in, out))."""

    features: int

    @nn.compact
    def __call__(self, x):
        features = self.get_variable("params", "kernel").shape[-1] if self.has_variable("params", "kernel") else self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], features))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        return capture(self, x @ kernel.astype(x.dtype) + bias.astype(x.dtype))


BATCH_STATS = "batch_stats"
BATCH_MOMENTS = "batch_moments"


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` (channels last) with torch's modes, chosen by what the caller makes mutable:

    - inference (the default): the running statistics (``batch_stats``: ``mean``, ``var``), computed
      exactly as ``flax.linen.BatchNorm(use_running_average=True)``;
    - training, when ``batch_stats`` is mutable (``apply(..., mutable=["batch_stats"])``, not at init):
      the batch's mean and biased variance normalise, and the running statistics move as torch's
      ``momentum`` rule moves them (``(1 - m) * running + m * batch``, with the *unbiased* variance
      ``n / (n - 1)``); when ``batch_moments`` is mutable too, the batch's mean and unbiased variance
      are also sown there (what BN recalibration averages);
    - ``frozen`` (torchvision's FrozenBatchNorm2d, whose weight and bias are buffers): always the
      running statistics, with no gradient into ``scale`` and ``bias`` while training.
    """

    epsilon: float = 1e-5
    momentum: float = 0.1  # torch's convention (flax's momentum is 1 - this)
    frozen: bool = False

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        ra_mean = self.variable(BATCH_STATS, "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable(BATCH_STATS, "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        training = self.is_mutable_collection(BATCH_STATS) and not self.is_initializing()
        if not training or self.frozen:
            if training:
                scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
            # flax.linen.BatchNorm's inference arithmetic, op for op (outputs stay bit-identical)
            y = x - ra_mean.value
            mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
            return jnp.asarray((y * mul) + bias, jnp.result_type(x, scale, bias))
        axes = tuple(range(x.ndim - 1))
        count = math.prod(x.shape[:-1])
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=axes)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # biased: what normalises
        unbiased = var * (count / max(count - 1, 1))
        moments = jax.lax.stop_gradient((mean, unbiased))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * moments[0]
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * moments[1]
        self.sow(BATCH_MOMENTS, "mean", moments[0], init_fn=lambda: None, reduce_fn=lambda _, new: new)
        self.sow(BATCH_MOMENTS, "var", moments[1], init_fn=lambda: None, reduce_fn=lambda _, new: new)
        y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(jnp.result_type(x, scale, bias))


def batch_norm(name: str, eps: float = 1e-5, momentum: float = 0.1) -> BatchNorm:
    """``BatchNorm2d`` of torch's ``eps`` and ``momentum``; eps 0 marks torchvision's FrozenBN (frozen in
    training too)."""
    return BatchNorm(epsilon=eps, momentum=momentum, frozen=eps == 0.0, name=name)


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

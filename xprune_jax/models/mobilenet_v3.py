"""torchvision's MobileNetV3-Large features, NHWC, built from a spec: the body of
``fasterrcnn_mobilenet_v3_large_fpn`` (``backbone.body.{0..16}``). Inverted residuals with hardswish or ReLU,
squeeze-excitation (hardsigmoid gates) in some, and a skip where stride 1 keeps the width."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from xprune_jax.models.layers import Conv2d, batch_norm, capture
from xprune_jax.models.mobilenet_v2 import _make_divisible
from xprune_jax.spec import register_spec


@register_spec
@dataclasses.dataclass(frozen=True)
class MobileNetV3BlockSpec:
    name: str  # its index in torchvision's ``features``, e.g. "4"
    kernel: int
    expanded: int  # the depthwise conv's width
    out: int
    stride: int
    expand: bool  # has the 1x1 expansion conv (torchvision: expanded != input width)
    squeeze: int  # the squeeze-excitation's width; 0: none
    hardswish: bool  # else ReLU
    residual: bool  # adds its input (torchvision: stride 1 and input width == out)


@register_spec
@dataclasses.dataclass(frozen=True)
class MobileNetV3Spec:
    stem: int
    blocks: tuple[MobileNetV3BlockSpec, ...]
    last: int  # the last 1x1 conv, ``features.16``
    returned: tuple[str, ...] = ("13", "16")  # the features whose outputs the detector's FPN reads
    bn_eps: float = 1e-5


# torchvision's mobilenet_v3_large configuration: (kernel, expanded, out, squeeze-excitation, hardswish, stride)
_LARGE = ((3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
          (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
          (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
          (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
          (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1))


def mobilenet_v3_large_spec() -> MobileNetV3Spec:
    blocks, width = [], 16
    for i, (kernel, expanded, out, se, hardswish, stride) in enumerate(_LARGE):
        blocks.append(MobileNetV3BlockSpec(str(i + 1), kernel, expanded, out, stride, expanded != width,
                                           _make_divisible(expanded // 4, 8) if se else 0, hardswish,
                                           stride == 1 and width == out))
        width = out
    return MobileNetV3Spec(16, tuple(blocks), 6 * width)


class InvertedResidual(nn.Module):
    spec: MobileNetV3BlockSpec
    bn_eps: float

    @nn.compact
    def __call__(self, x):
        s, eps = self.spec, self.bn_eps
        act = jax.nn.hard_swish if s.hardswish else nn.relu
        y, i = x, 0
        if s.expand:
            y, i = act(batch_norm(f"block.{i}.1", eps)(Conv2d(s.expanded, 1, name=f"block.{i}.0")(y))), i + 1
        y = act(batch_norm(f"block.{i}.1", eps)(Conv2d(s.expanded, s.kernel, s.stride, groups=s.expanded,
                                                       name=f"block.{i}.0")(y)))
        i += 1
        if s.squeeze:  # SqueezeExcitation: a gate per channel from the pooled map
            gate = nn.relu(Conv2d(s.squeeze, 1, use_bias=True, name=f"block.{i}.fc1")(jnp.mean(y, axis=(1, 2), keepdims=True)))
            y, i = jax.nn.hard_sigmoid(Conv2d(s.expanded, 1, use_bias=True, name=f"block.{i}.fc2")(gate)) * y, i + 1
        y = batch_norm(f"block.{i}.1", eps)(Conv2d(s.out, 1, name=f"block.{i}.0")(y))
        return capture(self, y + x if s.residual else y)


class MobileNetV3Backbone(nn.Module):
    """The features as a detector's ``backbone.body``: the outputs of ``spec.returned`` by name."""

    spec: MobileNetV3Spec

    @nn.compact
    def __call__(self, x) -> dict:
        s = self.spec
        outputs = {"0": jax.nn.hard_swish(batch_norm("0.1", s.bn_eps)(Conv2d(s.stem, 3, 2, name="0.0")(x)))}
        x = outputs["0"]
        for block in s.blocks:
            x = outputs[block.name] = InvertedResidual(block, s.bn_eps, name=block.name)(x)
        outputs["16"] = jax.nn.hard_swish(batch_norm("16.1", s.bn_eps)(Conv2d(s.last, 1, name="16.0")(x)))
        return {name: outputs[name] for name in s.returned}

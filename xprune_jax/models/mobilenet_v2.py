"""torchvision MobileNetV2, NHWC, built from a spec."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from xprune_jax.models.layers import Conv2d, Edits, Linear, batch_norm, capture, edited, relu6
from xprune_jax.spec import register_spec


@register_spec
@dataclasses.dataclass(frozen=True)
class InvertedResidualSpec:
    name: str  # torch module path, e.g. "features.3"
    hidden: int  # width of the depthwise conv (equals the input width when there is no expansion)
    out: int
    stride: int
    expand: bool  # has the 1x1 expansion conv (torchvision: expand_ratio != 1)
    # adds its input; None: torchvision's rule (stride 1 and in == out), filled in by MobileNetV2Spec. Stored
    # because pruned widths may make in == out where torchvision has no skip
    residual: bool | None = None


@register_spec
@dataclasses.dataclass(frozen=True)
class MobileNetV2Spec:
    stem: int
    blocks: tuple[InvertedResidualSpec, ...]
    last: int
    num_classes: int = 1000
    edits: Edits = Edits()

    def __post_init__(self):
        width, blocks = self.stem, []
        for b in self.blocks:
            blocks.append(b if b.residual is not None else
                          dataclasses.replace(b, residual=b.stride == 1 and width == b.out))
            width = b.out
        object.__setattr__(self, "blocks", tuple(blocks))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def mobilenet_v2_spec(width_mult: float = 1.0, num_classes: int = 1000) -> MobileNetV2Spec:
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]
    in_ch = _make_divisible(32 * width_mult)
    stem, blocks, index = in_ch, [], 1
    for t, c, n, s in settings:
        out = _make_divisible(c * width_mult)
        for i in range(n):
            blocks.append(InvertedResidualSpec(f"features.{index}", in_ch * t, out, s if i == 0 else 1, t != 1))
            in_ch, index = out, index + 1
    return MobileNetV2Spec(stem, tuple(blocks), _make_divisible(1280 * max(1.0, width_mult)), num_classes)


class InvertedResidual(nn.Module):
    spec: InvertedResidualSpec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        y, i = x, 0
        if s.expand:
            y = relu6(batch_norm("conv.0.1")(Conv2d(s.hidden, 1, name="conv.0.0")(y)))
            i = 1
        y = relu6(batch_norm(f"conv.{i}.1")(Conv2d(s.hidden, 3, s.stride, groups=s.hidden, name=f"conv.{i}.0")(y)))
        y = batch_norm(f"conv.{i + 2}")(Conv2d(s.out, 1, name=f"conv.{i + 1}")(y))
        if s.residual:
            y = x + y
        return capture(self, y)


class MobileNetV2(nn.Module):
    spec: MobileNetV2Spec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        with edited(s.edits):
            x = relu6(batch_norm("features.0.1")(Conv2d(s.stem, 3, 2, name="features.0.0")(x)))
            for block in s.blocks:
                x = InvertedResidual(block, name=block.name)(x)
            last = "features.18"  # torchvision's index of the last 1x1 conv, kept when blocks are removed
            x = relu6(batch_norm(f"{last}.1")(Conv2d(s.last, 1, name=f"{last}.0")(x)))
            return Linear(s.num_classes, name="classifier.1")(jnp.mean(x, axis=(1, 2)))

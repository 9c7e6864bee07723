"""torchvision ResNet (18/34/50/101), NHWC, built from a spec."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from xprune_jax.models.layers import Conv2d, Edits, Linear, batch_norm, capture, edited, max_pool
from xprune_jax.spec import register_spec


@register_spec
@dataclasses.dataclass(frozen=True)
class ResidualBlockSpec:
    name: str  # torch module path, e.g. "layer2.0"; stable when other blocks are removed
    widths: tuple[int, ...]  # output channels of the inner convs: (conv1,) basic, (conv1, conv2) bottleneck
    out: int  # block output channels, coupled across the residual adds of a stage
    stride: int
    downsample: bool


@register_spec
@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    block: str  # "basic" | "bottleneck"
    stem: int
    blocks: tuple[ResidualBlockSpec, ...]
    num_classes: int = 1000
    bn_eps: float = 1e-5
    edits: Edits = Edits()  # what pruning changed (a detector's body: the detector's edits apply)


_DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


def resnet_spec(arch: str, num_classes: int = 1000) -> ResNetSpec:
    """The spec of torchvision's ``arch`` (V1.5: the stride sits on the 3x3 conv)."""
    kind, depths = _DEPTHS[arch]
    expansion = 4 if kind == "bottleneck" else 1
    blocks, in_ch = [], 64
    for stage, depth in enumerate(depths):
        width = 64 * 2**stage
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            out = width * expansion
            widths = (width, width) if kind == "bottleneck" else (width,)
            blocks.append(ResidualBlockSpec(f"layer{stage + 1}.{i}", widths, out, stride,
                                            downsample=i == 0 and (stride != 1 or in_ch != out)))
            in_ch = out
    return ResNetSpec(kind, 64, tuple(blocks), num_classes)


class ResidualBlock(nn.Module):
    spec: ResidualBlockSpec
    kind: str
    bn_eps: float

    @nn.compact
    def __call__(self, x):
        s, eps = self.spec, self.bn_eps
        if self.kind == "bottleneck":
            y = nn.relu(batch_norm("bn1", eps)(Conv2d(s.widths[0], 1, name="conv1")(x)))
            y = nn.relu(batch_norm("bn2", eps)(Conv2d(s.widths[1], 3, s.stride, name="conv2")(y)))
            y = batch_norm("bn3", eps)(Conv2d(s.out, 1, name="conv3")(y))
        else:
            y = nn.relu(batch_norm("bn1", eps)(Conv2d(s.widths[0], 3, s.stride, name="conv1")(x)))
            y = batch_norm("bn2", eps)(Conv2d(s.out, 3, name="conv2")(y))
        identity = x
        if s.downsample:
            identity = batch_norm("downsample.1", eps)(Conv2d(s.out, 1, s.stride, name="downsample.0")(x))
        return capture(self, nn.relu(y + identity))


def resnet_stages(spec: ResNetSpec, x) -> dict:
    """Stem and residual stages, created in the calling module's scope (so parameter paths stay
    torch's keys whether the caller is the classifier or a detector's ``backbone.body``).

    Returns each stage's output (C2..C5) by stage name, e.g. ``{"layer1": ..., "layer4": ...}``.
    """
    x = nn.relu(batch_norm("bn1", spec.bn_eps)(Conv2d(spec.stem, 7, 2, name="conv1")(x)))
    x = max_pool(x, 3, 2, 1)
    stages = {}
    for block in spec.blocks:
        x = ResidualBlock(block, spec.block, spec.bn_eps, name=block.name)(x)
        stages[block.name.split(".")[0]] = x
    return stages


class ResNetBackbone(nn.Module):
    """The feature extractor alone, e.g. as a detector's ``backbone.body``."""

    spec: ResNetSpec

    @nn.compact
    def __call__(self, x) -> dict:
        return resnet_stages(self.spec, x)


class ResNet(nn.Module):
    spec: ResNetSpec

    @nn.compact
    def __call__(self, x):
        with edited(self.spec.edits):
            stages = resnet_stages(self.spec, x)
            x = jnp.mean(stages[max(stages)], axis=(1, 2))
            return Linear(self.spec.num_classes, name="fc")(x)

"""torchvision ShuffleNetV2, NHWC, built from a spec."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from xprune_jax.models.layers import Conv2d, Edits, Linear, batch_norm, capture, channel_shuffle, edited, max_pool, select
from xprune_jax.spec import register_spec


@register_spec
@dataclasses.dataclass(frozen=True)
class ShuffleUnitSpec:
    name: str  # torch module path, e.g. "stage2.1"
    stride: int
    branch1: int | None  # output width of branch1 (stride-2 units only)
    branch2: tuple[int, int] | None  # (mid, out) widths of branch2's 1x1 convs; None: identity
    # Channel routing of model files pruned before Edits (None: torchvision's). ``split``: how many leading
    # input channels of a stride-1 unit pass by the branch (None: half). ``order``: the output's
    # channels as indices into concat(left, right) (None: the channel shuffle of 2 groups).
    split: int | None = None
    order: tuple[int, ...] | None = None


@register_spec
@dataclasses.dataclass(frozen=True)
class ShuffleNetV2Spec:
    stem: int
    units: tuple[ShuffleUnitSpec, ...]
    last: int
    num_classes: int = 1000
    edits: Edits = Edits()


_STAGE_WIDTHS = {"shufflenet_v2_x0_5": (24, 48, 96, 192, 1024), "shufflenet_v2_x1_0": (24, 116, 232, 464, 1024),
                 "shufflenet_v2_x1_5": (24, 176, 352, 704, 1024), "shufflenet_v2_x2_0": (24, 244, 488, 976, 2048)}


def shufflenet_v2_spec(arch: str, num_classes: int = 1000) -> ShuffleNetV2Spec:
    widths = _STAGE_WIDTHS[arch]
    units = []
    for stage, (repeats, out) in enumerate(zip((4, 8, 4), widths[1:4])):
        half = out // 2
        for i in range(repeats):
            stride = 2 if i == 0 else 1
            units.append(ShuffleUnitSpec(f"stage{stage + 2}.{i}", stride, half if stride == 2 else None, (half, half)))
    return ShuffleNetV2Spec(widths[0], tuple(units), widths[4], num_classes)


class Branch(nn.Module):
    """A unit's ``branch2``: 1x1 conv, BN, ReLU, 3x3 depthwise conv (the unit's stride), BN, 1x1 conv, BN, ReLU."""

    mid: int
    out: int
    stride: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(batch_norm("1")(Conv2d(self.mid, 1, name="0")(x)))
        x = batch_norm("4")(Conv2d(self.mid, 3, self.stride, groups=self.mid, name="3")(x))
        return nn.relu(batch_norm("6")(Conv2d(self.out, 1, name="5")(x)))


class ShuffleUnit(nn.Module):
    """torchvision's InvertedResidual of ShuffleNetV2. The split and the shuffle are channel selections,
    which pruning may edit."""

    spec: ShuffleUnitSpec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        if s.stride == 1:
            split = x.shape[-1] // 2 if s.split is None else s.split
            left, right = select(self, "left", x, np.s_[:split]), select(self, "right", x, np.s_[split:])
        else:
            c = x.shape[-1]
            left = batch_norm("branch1.1")(Conv2d(c, 3, s.stride, groups=c, name="branch1.0")(x))
            left = nn.relu(batch_norm("branch1.3")(Conv2d(s.branch1, 1, name="branch1.2")(left)))
            right = x
        if s.branch2 is not None:
            right = Branch(*s.branch2, s.stride, name="branch2")(right)
        y = jnp.concatenate([left, right], axis=-1)
        return capture(self, select(self, "order", y, (lambda y: channel_shuffle(y, 2)) if s.order is None else s.order))


class ShuffleNetV2(nn.Module):
    spec: ShuffleNetV2Spec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        with edited(s.edits):
            x = nn.relu(batch_norm("conv1.1")(Conv2d(s.stem, 3, 2, name="conv1.0")(x)))
            x = max_pool(x, 3, 2, 1)
            for unit in s.units:
                x = ShuffleUnit(unit, name=unit.name)(x)
            x = nn.relu(batch_norm("conv5.1")(Conv2d(s.last, 1, name="conv5.0")(x)))
            return Linear(s.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))

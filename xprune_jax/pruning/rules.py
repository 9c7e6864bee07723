"""What each architecture allows pruning to do, stated over its spec.

- ``removable(spec)``: units whose removal keeps every tensor shape (depth pruning).
- ``remove(spec, names)``: the spec without them.
- ``groups(spec)``: channel groups that can shrink together (width pruning): the convs that produce
  the channels, the BNs and depthwise convs that carry them, and the convs that consume them.
- ``resize(spec, group, keep)``: the spec with a group narrowed to ``keep`` channels.

Everything else (which variables to delete or slice, FLOPs, exactness) is generic.
"""

import dataclasses

from xprune_jax.errors import UserError
from xprune_jax.models.mobilenet_v2 import MobileNetV2Spec
from xprune_jax.models.resnet import ResNetSpec
from xprune_jax.models.shufflenet_v2 import ShuffleNetV2Spec


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    name: str  # the producing conv: its per-channel scores rank the group's channels
    width: int
    producers: tuple[str, ...]  # output channels (kernel axis -1)
    norms: tuple[str, ...] = ()  # BN layers on the channels
    depthwise: tuple[str, ...] = ()  # depthwise convs on the channels
    consumers: tuple[str, ...] = ()  # input channels (kernel axis -2)


class ResNetRules:
    """Bottlenecks / basic blocks after the first of a stage can go; inner widths can shrink."""

    @staticmethod
    def removable(spec: ResNetSpec) -> list[str]:
        return [b.name for b in spec.blocks if not b.downsample and b.stride == 1]

    @staticmethod
    def remove(spec: ResNetSpec, names) -> ResNetSpec:
        return dataclasses.replace(spec, blocks=tuple(b for b in spec.blocks if b.name not in names))

    @staticmethod
    def groups(spec: ResNetSpec) -> list[ChannelGroup]:
        groups = []
        for b in spec.blocks:
            for i, width in enumerate(b.widths):
                groups.append(ChannelGroup(f"{b.name}.conv{i + 1}", width, (f"{b.name}.conv{i + 1}",),
                                           (f"{b.name}.bn{i + 1}",), (), (f"{b.name}.conv{i + 2}",)))
        return groups

    @staticmethod
    def resize(spec: ResNetSpec, group: str, keep: int) -> ResNetSpec:
        block_name, conv = group.rsplit(".", 1)
        index = int(conv[len("conv"):]) - 1
        return dataclasses.replace(spec, blocks=tuple(
            dataclasses.replace(b, widths=tuple(keep if i == index else w for i, w in enumerate(b.widths)))
            if b.name == block_name else b for b in spec.blocks))


class MobileNetV2Rules:
    """Inverted residuals with a skip can go; the expanded (hidden) width can shrink."""

    @staticmethod
    def removable(spec: MobileNetV2Spec) -> list[str]:
        names, width = [], spec.stem
        for b in spec.blocks:
            if b.stride == 1 and width == b.out:
                names.append(b.name)
            width = b.out
        return names

    @staticmethod
    def remove(spec: MobileNetV2Spec, names) -> MobileNetV2Spec:
        return dataclasses.replace(spec, blocks=tuple(b for b in spec.blocks if b.name not in names))

    @staticmethod
    def groups(spec: MobileNetV2Spec) -> list[ChannelGroup]:
        return [ChannelGroup(f"{b.name}.conv.0.0", b.hidden, (f"{b.name}.conv.0.0",),
                             (f"{b.name}.conv.0.1", f"{b.name}.conv.1.1"), (f"{b.name}.conv.1.0",), (f"{b.name}.conv.2",))
                for b in spec.blocks if b.expand]

    @staticmethod
    def resize(spec: MobileNetV2Spec, group: str, keep: int) -> MobileNetV2Spec:
        block_name = group.removesuffix(".conv.0.0")
        return dataclasses.replace(spec, blocks=tuple(
            dataclasses.replace(b, hidden=keep) if b.name == block_name else b for b in spec.blocks))


class ShuffleNetV2Rules:
    """A stride-1 unit's branch can become the identity (the channel shuffle stays); the branch's
    middle width can shrink."""

    @staticmethod
    def removable(spec: ShuffleNetV2Spec) -> list[str]:
        return [u.name for u in spec.units if u.stride == 1 and u.branch2 is not None]

    @staticmethod
    def remove(spec: ShuffleNetV2Spec, names) -> ShuffleNetV2Spec:
        return dataclasses.replace(spec, units=tuple(
            dataclasses.replace(u, branch2=None) if u.name in names else u for u in spec.units))

    @staticmethod
    def groups(spec: ShuffleNetV2Spec) -> list[ChannelGroup]:
        return [ChannelGroup(f"{u.name}.branch2.0", u.branch2[0], (f"{u.name}.branch2.0",),
                             (f"{u.name}.branch2.1", f"{u.name}.branch2.4"), (f"{u.name}.branch2.3",),
                             (f"{u.name}.branch2.5",))
                for u in spec.units if u.branch2 is not None]

    @staticmethod
    def resize(spec: ShuffleNetV2Spec, group: str, keep: int) -> ShuffleNetV2Spec:
        unit_name = group.removesuffix(".branch2.0")
        return dataclasses.replace(spec, units=tuple(
            dataclasses.replace(u, branch2=(keep, u.branch2[1])) if u.name == unit_name else u for u in spec.units))


RULES = {ResNetSpec: ResNetRules, MobileNetV2Spec: MobileNetV2Rules, ShuffleNetV2Spec: ShuffleNetV2Rules}


def rules_for(spec):
    if type(spec) not in RULES:
        raise UserError(f"structural pruning of {type(spec).__name__} models is not available yet; use --mode=zero")
    return RULES[type(spec)]

"""What each architecture allows pruning to do, stated over its spec.

- ``removable(spec)``: units whose removal keeps every tensor shape (depth pruning).
- ``remove(spec, names)``: the spec without them.
- ``groups(spec)``: channel groups that can shrink together (width pruning): the convs that produce
  the channels, the BNs and depthwise convs that carry them, and the convs that consume them.
- ``resize(spec, group, keep)``: the spec with a group narrowed to ``keep`` channels.
- ``protected(spec)``: units never pruned by default beyond the stem and classifier heads.
- ``remove_variables(arch, spec, variables, names)``: the variables without the removed units
  (by default: delete their subtrees; YOLOv8 also folds a C2f's concat slot).

Everything else (slicing channels, FLOPs, plans) is generic.
"""

import dataclasses

from xprune_jax.errors import UserError
from xprune_jax.models.mobilenet_v2 import MobileNetV2Spec
from xprune_jax.models.rcnn import FasterRCNNSpec, RetinaNetSpec
from xprune_jax.models.yolov8 import YOLOv8Spec
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


class Rules:
    @staticmethod
    def protected(spec) -> list[str]:
        return []

    @classmethod
    def remove_variables(cls, arch: str, spec, variables: dict, names) -> dict:
        from xprune_jax.pruning.surgery import restrict_to_spec

        return restrict_to_spec(variables, arch, cls.remove(spec, names))


class ResNetRules(Rules):
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


class MobileNetV2Rules(Rules):
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


class ShuffleNetV2Rules(Rules):
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


class YOLOv8Rules(Rules):
    """Bottlenecks of the backbone's C2f blocks (those with a shortcut) can go: masked, such a
    bottleneck is the identity, so its slot in the C2f's concat is folded into the previous slot.
    Each bottleneck's inner width can shrink. The Detect head is protected."""

    @staticmethod
    def protected(spec: YOLOv8Spec) -> list[str]:
        return [spec.detect.name]

    @staticmethod
    def removable(spec: YOLOv8Spec) -> list[str]:
        return [f"{c.name}.{b.name}" for c in spec.c2fs if c.shortcut for b in c.bottlenecks]

    @staticmethod
    def remove(spec: YOLOv8Spec, names) -> YOLOv8Spec:
        return dataclasses.replace(spec, c2fs=tuple(
            dataclasses.replace(c, bottlenecks=tuple(b for b in c.bottlenecks if f"{c.name}.{b.name}" not in names))
            for c in spec.c2fs))

    @classmethod
    def remove_variables(cls, arch: str, spec: YOLOv8Spec, variables: dict, names) -> dict:
        import numpy as np

        from xprune_jax import tree_paths

        variables = super().remove_variables(arch, spec, variables, names)
        for c2f in spec.c2fs:
            gone = [i for i, b in enumerate(c2f.bottlenecks) if f"{c2f.name}.{b.name}" in names]
            if not gone:
                continue
            kernel = np.array(tree_paths.get(variables["params"], f"{c2f.name}.cv2.conv")["kernel"])
            h = c2f.hidden
            for i in sorted(gone, reverse=True):  # bottleneck i's output is slot i + 2; its input slot i + 1
                kernel[:, :, (i + 1) * h:(i + 2) * h] += kernel[:, :, (i + 2) * h:(i + 3) * h]
                kernel = np.delete(kernel, np.s_[(i + 2) * h:(i + 3) * h], axis=2)
            tree_paths.get(variables["params"], f"{c2f.name}.cv2.conv")["kernel"] = kernel
        return variables

    @staticmethod
    def groups(spec: YOLOv8Spec) -> list[ChannelGroup]:
        norms = (lambda p: ()) if spec.fused else (lambda p: (f"{p}.cv1.bn",))
        return [ChannelGroup(f"{c.name}.{b.name}.cv1.conv", b.hidden, (f"{c.name}.{b.name}.cv1.conv",),
                             norms(f"{c.name}.{b.name}"), (), (f"{c.name}.{b.name}.cv2.conv",))
                for c in spec.c2fs for b in c.bottlenecks]

    @staticmethod
    def resize(spec: YOLOv8Spec, group: str, keep: int) -> YOLOv8Spec:
        path = group.removesuffix(".cv1.conv")
        return dataclasses.replace(spec, c2fs=tuple(
            dataclasses.replace(c, bottlenecks=tuple(dataclasses.replace(b, hidden=keep) if f"{c.name}.{b.name}" == path else b
                                                     for b in c.bottlenecks)) for c in spec.c2fs))


class DetectorBackboneRules(Rules):
    """Faster R-CNN and RetinaNet: the ResNet rules applied to ``backbone.body``. The FPN, the RPN
    and the heads are protected (their widths are shared across pyramid levels)."""

    prefix = "backbone.body."

    @staticmethod
    def protected(spec) -> list[str]:
        return ["backbone.fpn", "rpn", "roi_heads", "head"]

    @classmethod
    def removable(cls, spec) -> list[str]:
        return [cls.prefix + name for name in ResNetRules.removable(spec.body)]

    @classmethod
    def remove(cls, spec, names):
        return dataclasses.replace(spec, body=ResNetRules.remove(spec.body, [n.removeprefix(cls.prefix) for n in names]))

    @classmethod
    def groups(cls, spec) -> list[ChannelGroup]:
        def prefixed(names):
            return tuple(cls.prefix + n for n in names)

        return [ChannelGroup(cls.prefix + g.name, g.width, prefixed(g.producers), prefixed(g.norms),
                             prefixed(g.depthwise), prefixed(g.consumers)) for g in ResNetRules.groups(spec.body)]

    @classmethod
    def resize(cls, spec, group: str, keep: int):
        return dataclasses.replace(spec, body=ResNetRules.resize(spec.body, group.removeprefix(cls.prefix), keep))


RULES = {ResNetSpec: ResNetRules, FasterRCNNSpec: DetectorBackboneRules, RetinaNetSpec: DetectorBackboneRules, MobileNetV2Spec: MobileNetV2Rules, ShuffleNetV2Spec: ShuffleNetV2Rules,
         YOLOv8Spec: YOLOv8Rules}


def protected_units(spec) -> list[str]:
    return RULES[type(spec)].protected(spec) if type(spec) in RULES else []


def rules_for(spec):
    if type(spec) not in RULES:
        raise UserError(f"structural pruning of {type(spec).__name__} models is not available yet; use --mode=zero")
    return RULES[type(spec)]

"""What each architecture allows pruning to do, stated over its spec.

- ``removable(spec)``: units whose removal keeps every tensor shape (depth pruning).
- ``remove(spec, names)``: the spec without them.
- ``groups(spec)``: channel groups that can shrink together (width pruning): the convs that produce
  the channels, the BNs and depthwise convs that carry them, and the convs that consume them, each
  with the offset of the group's channels in it (concat slots, split halves).
- ``resize(spec, group, kept)``: the spec with a group narrowed to the channels ``kept`` (their
  number, except where a shuffle routes channels one by one).
- ``protected(spec)``: units never pruned by default beyond the stem and the heads.
- ``heads(spec)``: the layers that make the network's outputs (protected, but they may read fewer
  inputs); by default those the layer analysis calls heads (a classifier's fc).
- ``remove_variables(arch, spec, variables, names)``: the variables without the removed units
  (by default: delete their subtrees; YOLOv8 also folds a C2f's concat slot).

Everything else (slicing channels, FLOPs, plans) is generic.
"""

import dataclasses
import re
import typing

import numpy as np

from xprune_jax.errors import UserError
from xprune_jax.models.mobilenet_v2 import MobileNetV2Spec
from xprune_jax.models.rcnn import FasterRCNNSpec, RetinaNetSpec, widths
from xprune_jax.models.yolov8 import LAYERS, YOLOv8Spec, layer_sources, output_widths
from xprune_jax.models.resnet import ResNetSpec
from xprune_jax.models.shufflenet_v2 import ShuffleNetV2Spec


class Slot(typing.NamedTuple):
    """The group's ``width`` channels inside one layer: its channels ``offset ... offset + width - 1``
    (of the output for producers, norms and depthwise convs; of the input for consumers). A consumer
    whose input is a flattened ``(C, H, W)`` map (Faster R-CNN's fc6 after RoIAlign) reads ``span =
    H * W`` consecutive inputs per channel: channel c is inputs ``offset + c * span ...``. Channels
    scattered by a shuffle have an ``index`` instead: channel c sits at ``index[c]``, or is not in
    the layer if that is -1."""

    layer: str
    offset: int = 0
    span: int = 1
    index: tuple[int, ...] | None = None

    def positions(self, channels) -> np.ndarray:
        """Where the group's ``channels`` sit along the layer's channel axis (those it has)."""
        channels = np.asarray(channels, int)
        if self.index is not None:
            found = np.asarray(self.index, int)[channels]
            return found[found >= 0]
        return (self.offset + channels[:, None] * self.span + np.arange(self.span)).ravel()


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must shrink together: every layer that produces, carries or reads them.

    Each entry is a ``Slot`` (a plain layer name means offset 0). A layer can appear in several
    groups at different offsets (a C2f's cv1 produces both halves of its split) and a consumer can
    read one group at several offsets (the concat slots of SPPF's and C2f's cv2); offsets are those
    of the spec the group was made from. Several producers mean coupled channels (e.g. across
    residual adds): they keep the same channels.
    """

    name: str  # unique; plans list groups by it. For a single whole-output group, the producing conv
    width: int
    producers: tuple[Slot, ...]  # output channels (kernel axis -1, and the bias)
    norms: tuple[Slot, ...] = ()  # BN layers on the channels
    depthwise: tuple[Slot, ...] = ()  # depthwise convs on the channels
    consumers: tuple[Slot, ...] = ()  # input channels (kernel axis -2)

    def __post_init__(self):
        for field in ("producers", "norms", "depthwise", "consumers"):
            object.__setattr__(self, field, tuple(Slot(s) if isinstance(s, str) else Slot(*s)
                                                  for s in getattr(self, field)))


class Rules:
    @staticmethod
    def protected(spec) -> list[str]:
        return []

    @staticmethod
    def heads(spec) -> list[str] | None:
        return None

    @classmethod
    def remove_variables(cls, arch: str, spec, variables: dict, names) -> dict:
        from xprune_jax.pruning.surgery import restrict_to_spec

        return restrict_to_spec(variables, arch, cls.remove(spec, names))


class ResNetRules(Rules):
    """Bottlenecks / basic blocks after the first of a stage can go. Channel groups: each block's inner
    widths (``layerK.I.convJ``) and each stage's output width (``layerK``), which the residual adds
    tie together: every block's last conv and BN and the first block's downsample produce it; the
    stage's later blocks, the next stage's first block and ``readers`` (the classifier) read it.
    Blocks before the first downsample (resnet18's layer1) add the stem's output: no group, the stem
    is protected."""

    @staticmethod
    def removable(spec: ResNetSpec) -> list[str]:
        return [b.name for b in spec.blocks if not b.downsample and b.stride == 1]

    @staticmethod
    def remove(spec: ResNetSpec, names) -> ResNetSpec:
        return dataclasses.replace(spec, blocks=tuple(b for b in spec.blocks if b.name not in names))

    @staticmethod
    def _stage(block) -> str:
        return block.name.split(".")[0]

    @classmethod
    def _stages(cls, spec: ResNetSpec) -> dict[str, list]:
        """The blocks that share each stage output group, by group name: a block with a downsample
        conv and the blocks after it that add their input."""
        stages = {}
        for b in spec.blocks:
            if b.downsample:
                stages[cls._stage(b)] = []
            if stages:
                stages[list(stages)[-1]].append(b)
        return stages

    @classmethod
    def groups(cls, spec: ResNetSpec, readers=None) -> list[ChannelGroup]:
        """``readers``: the layers that read a stage's output besides the blocks, by stage (default:
        ``fc`` reads the last one, after the global average pooling)."""
        readers = {cls._stage(spec.blocks[-1]): ("fc",)} if readers is None else readers
        groups = []
        for b in spec.blocks:
            for i, width in enumerate(b.widths):
                groups.append(ChannelGroup(f"{b.name}.conv{i + 1}", width, (f"{b.name}.conv{i + 1}",),
                                           (f"{b.name}.bn{i + 1}",), (), (f"{b.name}.conv{i + 2}",)))
        stages = list(cls._stages(spec).items())
        for k, (name, blocks) in enumerate(stages):
            shortcut = f"{blocks[0].name}.downsample"
            after = stages[k + 1][1][:1] if k + 1 < len(stages) else []  # the next stage's first block
            groups.append(ChannelGroup(  # the last conv and BN: conv3/bn3 (bottleneck), conv2/bn2 (basic)
                name, blocks[0].out, (f"{shortcut}.0", *(f"{b.name}.conv{len(b.widths) + 1}" for b in blocks)),
                (f"{shortcut}.1", *(f"{b.name}.bn{len(b.widths) + 1}" for b in blocks)), (),
                (*(f"{b.name}.conv1" for b in blocks[1:] + after), *(f"{b.name}.downsample.0" for b in after),
                 *(r for stage in dict.fromkeys(map(cls._stage, blocks)) for r in readers.get(stage, ())))))
        return groups

    @classmethod
    def resize(cls, spec: ResNetSpec, group: str, kept) -> ResNetSpec:
        keep = len(kept)
        stage = [b.name for b in cls._stages(spec).get(group, ())]
        if stage:
            return dataclasses.replace(spec, blocks=tuple(
                dataclasses.replace(b, out=keep) if b.name in stage else b for b in spec.blocks))
        block_name, conv = group.rsplit(".", 1)
        index = int(conv[len("conv"):]) - 1
        return dataclasses.replace(spec, blocks=tuple(
            dataclasses.replace(b, widths=tuple(keep if i == index else w for i, w in enumerate(b.widths)))
            if b.name == block_name else b for b in spec.blocks))


class MobileNetV2Rules(Rules):
    """Inverted residuals with a skip can go. Channel groups: a block's expanded (hidden) width
    (``features.N.conv.0.0``) and the output width of each chain of blocks joined by skip adds, named
    by the projection conv of its first block, which has no skip (``features.4.conv.2``): the chain's
    projection convs and their BNs produce it, the next blocks' expansion convs and ``features.18.0``
    read it. Every block but the first (which reads the protected stem) expands. And the last 1x1 conv's
    output (``features.18.0``), which the classifier reads."""

    @staticmethod
    def removable(spec: MobileNetV2Spec) -> list[str]:
        return [b.name for b in spec.blocks if b.residual]

    @staticmethod
    def remove(spec: MobileNetV2Spec, names) -> MobileNetV2Spec:
        return dataclasses.replace(spec, blocks=tuple(b for b in spec.blocks if b.name not in names))

    @staticmethod
    def _projection(block) -> tuple[str, str]:
        """The block's 1x1 projection conv and its BN."""
        i = 2 if block.expand else 1
        return f"{block.name}.conv.{i}", f"{block.name}.conv.{i + 1}"

    @classmethod
    def _chains(cls, spec: MobileNetV2Spec) -> dict[str, list]:
        """The blocks of each chain, by group name: a block without a skip and the blocks after it with one."""
        chains = {}
        for b in spec.blocks:
            if not b.residual:
                chains[cls._projection(b)[0]] = []
            if chains:
                chains[list(chains)[-1]].append(b)
        return chains

    @classmethod
    def groups(cls, spec: MobileNetV2Spec) -> list[ChannelGroup]:
        groups = [ChannelGroup(f"{b.name}.conv.0.0", b.hidden, (f"{b.name}.conv.0.0",),
                               (f"{b.name}.conv.0.1", f"{b.name}.conv.1.1"), (f"{b.name}.conv.1.0",),
                               (f"{b.name}.conv.2",)) for b in spec.blocks if b.expand]
        chains = list(cls._chains(spec).values())
        for k, blocks in enumerate(chains):
            projections = [cls._projection(b) for b in blocks]
            after = chains[k + 1][:1] if k + 1 < len(chains) else []  # the next chain's first block
            readers = [f"{b.name}.conv.0.0" for b in blocks[1:] + after] + ([] if after else ["features.18.0"])
            groups.append(ChannelGroup(projections[0][0], blocks[0].out, tuple(conv for conv, _ in projections),
                                       tuple(bn for _, bn in projections), (), tuple(readers)))
        return groups + [ChannelGroup("features.18.0", spec.last, ("features.18.0",), ("features.18.1",), (),
                                      ("classifier.1",))]

    @classmethod
    def resize(cls, spec: MobileNetV2Spec, group: str, kept) -> MobileNetV2Spec:
        keep = len(kept)
        if group == "features.18.0":
            return dataclasses.replace(spec, last=keep)
        chain = [b.name for b in cls._chains(spec).get(group, ())]
        return dataclasses.replace(spec, blocks=tuple(
            dataclasses.replace(b, out=keep) if b.name in chain else
            dataclasses.replace(b, hidden=keep) if group == f"{b.name}.conv.0.0" else b for b in spec.blocks))


class _UnitTrace(typing.NamedTuple):
    """One ShuffleNetV2 unit's channels, each named by a tag ``(producing layer, channel)``."""

    inputs: list
    left: list  # concat's first part: the passed-by inputs (stride 1) or branch1's outputs (stride 2)
    right: list  # the inputs branch2 reads (stride 1: those after the split; stride 2: all)
    concat: list  # left + branch2's outputs (or ``right`` when the branch is the identity)
    outputs: list


def _shuffle(width: int) -> list[int]:
    """torchvision's channel shuffle of 2 groups as an index list: output j*2+g is input g*width/2+j."""
    return [g * (width // 2) + j for j in range(width // 2) for g in range(2)]


class ShuffleNetV2Rules(Rules):
    """A stride-1 unit's branch can become the identity (the channel shuffle stays) while it keeps the
    width of its input. Channel groups:

    - ``{unit}.branch2.0``: a branch's middle width;
    - ``{unit}.branch1.2``, ``{unit}.branch2.5``: a branch's output width. The channel shuffle scatters
      these channels: at each later unit of the stage a channel either passes by the branch or is
      read by it (and ends there); what leaves the stage is read by the next stage's first unit (both
      branches, through branch1's depthwise conv and BN) or by ``conv5.0``. So their slots in later
      layers are index lists (:func:`_trace` follows every channel), and narrowing one rewrites the
      units' ``split`` and ``order`` (the shuffle as an explicit gather);
    - ``conv5.0``: the last conv's output, which the classifier reads.

    The stem's channels (read by ``stage2.0``) form no group: the stem is protected.
    """

    @staticmethod
    def _trace(spec: ShuffleNetV2Spec) -> tuple[list[_UnitTrace], list]:
        """Every channel followed through the units; returns each unit's trace and conv5's inputs."""
        x, traces = [("conv1.0", c) for c in range(spec.stem)], []
        for u in spec.units:
            if u.stride == 1:
                split = len(x) // 2 if u.split is None else u.split
                left, right = x[:split], x[split:]
            else:
                left, right = [(f"{u.name}.branch1.2", c) for c in range(u.branch1)], x
            made = right if u.branch2 is None else [(f"{u.name}.branch2.5", c) for c in range(u.branch2[1])]
            concat = left + made
            outputs = [concat[i] for i in (_shuffle(len(concat)) if u.order is None else u.order)]
            traces.append(_UnitTrace(x, left, right, concat, outputs))
            x = outputs
        return traces, x

    @classmethod
    def removable(cls, spec: ShuffleNetV2Spec) -> list[str]:
        traces, _ = cls._trace(spec)
        return [u.name for u, t in zip(spec.units, traces)
                if u.stride == 1 and u.branch2 is not None and len(t.right) == u.branch2[1]]

    @staticmethod
    def remove(spec: ShuffleNetV2Spec, names) -> ShuffleNetV2Spec:
        return dataclasses.replace(spec, units=tuple(
            dataclasses.replace(u, branch2=None) if u.name in names else u for u in spec.units))

    @classmethod
    def groups(cls, spec: ShuffleNetV2Spec) -> list[ChannelGroup]:
        traces, last_inputs = cls._trace(spec)
        widths = {f"{u.name}.branch{b}": w for u in spec.units
                  for b, w in ((1, u.branch1), (2, u.branch2 and u.branch2[1])) if w}
        slots = {name: {"norms": {}, "depthwise": {}, "consumers": {}} for name in widths}  # group -> kind -> layer -> index

        def read(tags, kind, layer):
            for position, (producer, channel) in enumerate(tags):
                branch = producer.rsplit(".", 1)[0]  # the tag's group: {unit}.branch1 / .branch2
                if branch in slots:
                    slots[branch][kind].setdefault(layer, [-1] * widths[branch])[channel] = position

        for u, t in zip(spec.units, traces):
            if u.stride == 2:
                read(t.right, "depthwise", f"{u.name}.branch1.0")
                read(t.right, "norms", f"{u.name}.branch1.1")
                read(t.right, "consumers", f"{u.name}.branch1.2")
            if u.branch2 is not None:
                read(t.right, "consumers", f"{u.name}.branch2.0")
        read(last_inputs, "consumers", "conv5.0")
        groups = []
        for branch, width in widths.items():
            conv, bn = (f"{branch}.2", f"{branch}.3") if branch.endswith("1") else (f"{branch}.5", f"{branch}.6")
            indexed = {kind: tuple(Slot(layer, index=tuple(index)) for layer, index in by_layer.items())
                       for kind, by_layer in slots[branch].items()}
            groups.append(ChannelGroup(conv, width, (conv,), (bn, *indexed["norms"]), indexed["depthwise"],
                                       indexed["consumers"]))
        groups += [ChannelGroup(f"{u.name}.branch2.0", u.branch2[0], (f"{u.name}.branch2.0",),
                                (f"{u.name}.branch2.1", f"{u.name}.branch2.4"), (f"{u.name}.branch2.3",),
                                (f"{u.name}.branch2.5",))
                   for u in spec.units if u.branch2 is not None]
        return groups + [ChannelGroup("conv5.0", spec.last, ("conv5.0",), ("conv5.1",), (), ("fc",))]

    @classmethod
    def resize(cls, spec: ShuffleNetV2Spec, group: str, kept) -> ShuffleNetV2Spec:
        keep = len(kept)
        if group == "conv5.0":
            return dataclasses.replace(spec, last=keep)
        unit_name, branch = group.rsplit(".", 2)[0], group.split(".")[-2]
        if group.endswith(".branch2.0"):
            return dataclasses.replace(spec, units=tuple(
                dataclasses.replace(u, branch2=(keep, u.branch2[1])) if u.name == unit_name else u for u in spec.units))
        producer, kept = f"{unit_name}.{branch}", set(int(c) for c in kept)

        def stays(tags):
            return [t for t in tags if t[0].rsplit(".", 1)[0] != producer or t[1] in kept]

        units = []
        for u, t in zip(spec.units, cls._trace(spec)[0]):
            if u.name == unit_name:
                u = dataclasses.replace(u, **({"branch1": keep} if branch == "branch1" else
                                              {"branch2": (u.branch2[0], keep)}))
            concat, inputs = stays(t.concat), stays(t.inputs)
            position = {tag: i for i, tag in enumerate(concat)}
            order = [position[tag] for tag in stays(t.outputs)]
            split = len(stays(t.left)) if u.stride == 1 else None
            default = len(concat) % 2 == 0 and order == _shuffle(len(concat)) and \
                (split is None or 2 * split == len(inputs))
            units.append(dataclasses.replace(u, split=None if default else split,
                                             order=None if default else tuple(order)))
        return dataclasses.replace(spec, units=tuple(units))


class YOLOv8Rules(Rules):
    """Bottlenecks of the backbone's C2f blocks (those with a shortcut) can go: masked, such a
    bottleneck is the identity, so its slot in the C2f's concat is folded into the previous slot. So
    can the last bottleneck of a neck C2f (no shortcut): masked, it outputs 0 and nothing else reads
    it, so its concat slot is dropped (then the one before it is the last).

    Channel groups (their names):

    - ``model.K.conv`` / ``model.K.cv2.conv``: the output of a Conv / of a C2f or SPPF, read by the
      next layers, through upsampling and the neck's concats (then at the concat slot's offset);
    - ``model.9.cv1.conv``: SPPF's hidden width (the max pools carry it; cv2 reads it 4 times);
    - ``model.K.cv1.conv[0]``: a C2f's first split half (cv2's concat slot 0);
    - ``model.K.cv1.conv[1]``: the second half coupled with the bottleneck chain: cv1's slice, every
      bottleneck's output (tied by the residual adds; also coupled where there are none) and
      input, and cv2's concat slots 1 ... n + 1;
    - ``model.K.m.I.cv1.conv``: a bottleneck's inner width.

    - ``model.22.cv{2,3}.K.{0,1}.conv``: the Detect head's hidden widths, per level and branch.

    The heads are the Detect head's last 1x1 convs (``model.22.cv{2,3}.K.2``): they keep their outputs
    and may read fewer inputs. Groups that touch the stem are protected; ``--protect=model.22`` keeps
    the whole Detect head and its inputs (the outputs of 15, 18, 21), as the paper-protocol tables do.
    """

    @staticmethod
    def heads(spec: YOLOv8Spec) -> list[str]:
        levels = range(len(spec.detect.strides))
        return [f"{spec.detect.name}.{branch}.{k}.2" for k in levels for branch in ("cv2", "cv3")]

    @staticmethod
    def removable(spec: YOLOv8Spec) -> list[str]:
        return [f"{c.name}.{b.name}" for c in spec.c2fs for b in (c.bottlenecks if c.shortcut else c.bottlenecks[-1:])]

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
            a, h = c2f.first, c2f.hidden
            for i in sorted(gone, reverse=True):  # bottleneck i's input is concat slot i + 1, its output slot i + 2
                inputs, outputs = a + i * h, a + (i + 1) * h
                if c2f.shortcut:  # the identity: its output equals its input
                    kernel[:, :, inputs:inputs + h] += kernel[:, :, outputs:outputs + h]
                kernel = np.delete(kernel, np.s_[outputs:outputs + h], axis=2)
            tree_paths.get(variables["params"], f"{c2f.name}.cv2.conv")["kernel"] = kernel
        return variables

    @staticmethod
    def _readers(spec: YOLOv8Spec, index: int, widths) -> list[Slot]:
        """The convs that read ``model.{index}``'s output, at the offset where they read it."""
        readers = []
        for i, (_, kind, _) in enumerate(LAYERS):
            sources = layer_sources(i)
            if index not in sources or i == index:
                continue
            if kind in ("upsample", "concat"):
                offset = sum(widths[s] for s in sources[:sources.index(index)])
                readers += [Slot(r.layer, r.offset + offset) for r in YOLOv8Rules._readers(spec, i, widths)]
            elif kind == "conv":
                readers.append(Slot(f"model.{i}.conv"))
            elif kind in ("c2f", "sppf"):
                readers.append(Slot(f"model.{i}.cv1.conv"))
            else:  # Detect: level k's two branches (so these groups are protected with the head)
                k = sources.index(index)
                readers += [Slot(f"model.{i}.cv2.{k}.0.conv"), Slot(f"model.{i}.cv3.{k}.0.conv")]
        return readers

    @classmethod
    def groups(cls, spec: YOLOv8Spec) -> list[ChannelGroup]:
        def norms(*slots):
            return () if spec.fused else tuple(Slot(s.layer.removesuffix(".conv") + ".bn", s.offset) for s in slots)

        def group(name, width, producers, consumers):
            return ChannelGroup(name, width, producers, norms(*producers), (), consumers)

        widths, groups = output_widths(spec), []
        for index, (_, kind, _) in enumerate(LAYERS):  # whole outputs
            if kind in ("conv", "c2f", "sppf"):
                producer = Slot(f"model.{index}.conv" if kind == "conv" else f"model.{index}.cv2.conv")
                groups.append(group(producer.layer, widths[index], (producer,), tuple(cls._readers(spec, index, widths))))
        p = spec.sppf.name
        groups.append(group(f"{p}.cv1.conv", spec.sppf.hidden, (Slot(f"{p}.cv1.conv"),),
                            tuple(Slot(f"{p}.cv2.conv", i * spec.sppf.hidden) for i in range(4))))
        for c in spec.c2fs:
            a, h, n = c.first, c.hidden, len(c.bottlenecks)
            groups.append(group(f"{c.name}.cv1.conv[0]", a, (Slot(f"{c.name}.cv1.conv"),), (Slot(f"{c.name}.cv2.conv"),)))
            groups.append(group(
                f"{c.name}.cv1.conv[1]", h,
                (Slot(f"{c.name}.cv1.conv", a), *(Slot(f"{c.name}.{b.name}.cv2.conv") for b in c.bottlenecks)),
                (*(Slot(f"{c.name}.{b.name}.cv1.conv") for b in c.bottlenecks),
                 *(Slot(f"{c.name}.cv2.conv", a + j * h) for j in range(n + 1)))))
            groups += [group(f"{c.name}.{b.name}.cv1.conv", b.hidden, (Slot(f"{c.name}.{b.name}.cv1.conv"),),
                             (Slot(f"{c.name}.{b.name}.cv2.conv"),)) for b in c.bottlenecks]
        d = spec.detect
        for branch, widths in (("cv2", d.box_widths), ("cv3", d.class_widths)):
            for k, level in enumerate(widths):
                convs = [f"{d.name}.{branch}.{k}.{j}" for j in range(3)]
                groups += [group(f"{convs[j]}.conv", width, (Slot(f"{convs[j]}.conv"),),
                                 (Slot(f"{convs[j + 1]}.conv" if j == 0 else convs[2]),)) for j, width in enumerate(level)]
        return groups

    @staticmethod
    def resize(spec: YOLOv8Spec, group: str, kept) -> YOLOv8Spec:
        keep = len(kept)
        head = re.fullmatch(rf"{re.escape(spec.detect.name)}\.(cv[23])\.(\d+)\.([01])\.conv", group)
        if head:
            field = "box_widths" if head[1] == "cv2" else "class_widths"
            level, j = int(head[2]), int(head[3])
            widths = tuple(tuple(keep if (k, i) == (level, j) else w for i, w in enumerate(pair))
                           for k, pair in enumerate(getattr(spec.detect, field)))
            return dataclasses.replace(spec, detect=dataclasses.replace(spec.detect, **{field: widths}))
        match = re.fullmatch(r"(model\.\d+)\.(conv|cv[12]\.conv|cv1\.conv\[[01]\]|(m\.\d+)\.cv1\.conv)", group)
        if not match:
            raise KeyError(group)
        block, what, bottleneck = match.groups()

        def c2f(c):
            if c.name != block:
                return c
            if what == "cv2.conv":
                return dataclasses.replace(c, out=keep)
            if what == "cv1.conv[0]":
                return dataclasses.replace(c, first=keep)
            if what == "cv1.conv[1]":
                return dataclasses.replace(c, hidden=keep)
            return dataclasses.replace(c, bottlenecks=tuple(dataclasses.replace(b, hidden=keep) if b.name == bottleneck
                                                            else b for b in c.bottlenecks))

        sppf = spec.sppf
        if sppf.name == block:
            sppf = dataclasses.replace(sppf, **{"out" if what == "cv2.conv" else "hidden": keep})
        return dataclasses.replace(
            spec, convs=tuple(dataclasses.replace(c, out=keep) if c.name == block else c for c in spec.convs),
            c2fs=tuple(c2f(c) for c in spec.c2fs), sppf=sppf)


class DetectorRules(Rules):
    """Faster R-CNN and RetinaNet. The ResNet-50 body's bottlenecks can go (the ResNet rules). Channel
    groups: the body's (the FPN's lateral convs read the stage outputs), and

    - ``backbone.fpn.inner_blocks``: the lateral convs' outputs, coupled by the top-down adds, read by
      the 3x3 ``layer_blocks``;
    - ``backbone.fpn.layer_blocks``: the FPN's outputs, coupled because the heads are shared over the
      levels: every layer block (and RetinaNet's P6 and P7) makes them; P6 and P7, the RPN's conv,
      fc6 (after RoIAlign: ``roi_size ** 2`` inputs a channel) and both subnets' first convs read them;
    - ``rpn.head.conv.0.0``, ``roi_heads.box_head.fc6`` and ``fc7``,
      ``head.{classification,regression}_head.conv.I.0``: one layer's output each.

    The heads are the predictors (the RPN's ``cls_logits`` and ``bbox_pred``, ``box_predictor``, the
    subnets' ``cls_logits`` and ``bbox_reg``): they keep their outputs and may read fewer inputs.
    """

    prefix = "backbone.body."
    fpn = "backbone.fpn."
    subnets = {"classification_head": "cls_logits", "regression_head": "bbox_reg"}
    fields = {"backbone.fpn.inner_blocks": "fpn_inner_width", "backbone.fpn.layer_blocks": "fpn_width",
              "rpn.head.conv.0.0": "rpn_width", "roi_heads.box_head.fc6": "representation_size",
              "roi_heads.box_head.fc7": "fc7_width"}

    @classmethod
    def heads(cls, spec) -> list[str]:
        if isinstance(spec, FasterRCNNSpec):
            return ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
                    "roi_heads.box_predictor.bbox_pred"]
        return [f"head.{subnet}.{last}" for subnet, last in cls.subnets.items()]

    @classmethod
    def removable(cls, spec) -> list[str]:
        return [cls.prefix + name for name in ResNetRules.removable(spec.body)]

    @classmethod
    def remove(cls, spec, names):
        return dataclasses.replace(spec, body=ResNetRules.remove(spec.body, [n.removeprefix(cls.prefix) for n in names]))

    @classmethod
    def groups(cls, spec) -> list[ChannelGroup]:
        fpn, stages, w = cls.fpn, range(len(spec.fpn_stages)), widths(spec)
        readers = {stage: (f"{fpn}inner_blocks.{i}.0",) for i, stage in zip(stages, spec.fpn_stages)}

        def prefixed(slots):  # the body's layers; the FPN's are named in full already
            return tuple(s if s.layer.startswith(fpn) else Slot(cls.prefix + s.layer, s.offset) for s in slots)

        groups = [ChannelGroup(cls.prefix + g.name, g.width, prefixed(g.producers), prefixed(g.norms),
                               prefixed(g.depthwise), prefixed(g.consumers))
                  for g in ResNetRules.groups(spec.body, readers=readers)]
        groups.append(ChannelGroup(f"{fpn}inner_blocks", w["fpn_inner_width"], tuple(f"{fpn}inner_blocks.{i}.0" for i in stages),
                                   consumers=tuple(f"{fpn}layer_blocks.{i}.0" for i in stages)))
        levels = tuple(f"{fpn}layer_blocks.{i}.0" for i in stages)
        if isinstance(spec, FasterRCNNSpec):
            fc6, fc7 = "roi_heads.box_head.fc6", "roi_heads.box_head.fc7"
            return groups + [
                ChannelGroup(f"{fpn}layer_blocks", w["fpn_width"], levels,
                             consumers=("rpn.head.conv.0.0", Slot(fc6, 0, spec.roi_size ** 2))),
                ChannelGroup("rpn.head.conv.0.0", w["rpn_width"], ("rpn.head.conv.0.0",),
                             consumers=("rpn.head.cls_logits", "rpn.head.bbox_pred")),
                ChannelGroup(fc6, w["representation_size"], (fc6,), consumers=(fc7,)),
                ChannelGroup(fc7, w["fc7_width"], (fc7,),
                             consumers=("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"))]
        extra = (f"{fpn}extra_blocks.p6", f"{fpn}extra_blocks.p7")
        groups.append(ChannelGroup(f"{fpn}layer_blocks", w["fpn_width"], levels + extra,
                                   consumers=(*extra, *(f"head.{subnet}.conv.0.0" for subnet in cls.subnets))))
        for subnet, last in cls.subnets.items():
            subnet_widths = w[subnet.replace("_head", "_widths")]
            convs = [f"head.{subnet}.conv.{i}.0" for i in range(len(subnet_widths))]
            groups += [ChannelGroup(conv, width, (conv,), consumers=(reader,))
                       for conv, width, reader in zip(convs, subnet_widths, convs[1:] + [f"head.{subnet}.{last}"])]
        return groups

    @classmethod
    def resize(cls, spec, group: str, kept):
        keep = len(kept)
        if group.startswith(cls.prefix):
            return dataclasses.replace(spec, body=ResNetRules.resize(spec.body, group.removeprefix(cls.prefix), kept))
        spec = dataclasses.replace(spec, **widths(spec))  # every width explicit: one left None follows another
        if group in cls.fields:
            return dataclasses.replace(spec, **{cls.fields[group]: keep})
        match = re.fullmatch(r"head\.(classification|regression)_head\.conv\.(\d+)\.0", group)
        if not match:
            raise KeyError(group)
        field = f"{match[1]}_widths"
        return dataclasses.replace(spec, **{field: tuple(keep if i == int(match[2]) else x
                                                         for i, x in enumerate(getattr(spec, field)))})


RULES = {ResNetSpec: ResNetRules, FasterRCNNSpec: DetectorRules, RetinaNetSpec: DetectorRules,
         MobileNetV2Spec: MobileNetV2Rules, ShuffleNetV2Spec: ShuffleNetV2Rules, YOLOv8Spec: YOLOv8Rules}


def protected_units(spec) -> list[str]:
    return RULES[type(spec)].protected(spec) if type(spec) in RULES else []


def prediction_heads(spec, layers) -> list[str]:
    """The architecture's heads, else the layers the analysis calls heads."""
    heads = RULES[type(spec)].heads(spec) if type(spec) in RULES else None
    return [l.name for l in layers if l.kind == "head"] if heads is None else heads


def rules_for(spec):
    if type(spec) not in RULES:
        raise UserError(f"structural pruning of {type(spec).__name__} models is not available yet; use --mode=zero")
    return RULES[type(spec)]

"""Channel groups: the channels that must shrink together, and where they sit in each layer."""

import dataclasses
import typing

import numpy as np


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

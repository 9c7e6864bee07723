"""Ultralytics YOLOv8 (n/s/m/l/x) detection, NHWC, built from a spec.

Module names are Ultralytics' module paths (``model.4.m.1.cv2``), so parameter paths are the keys of
a ``DetectionModel`` state_dict. The graph is ``yolov8.yaml``'s: layers 0-9 are the backbone (Conv,
C2f, SPPF), 10-21 the upsample/concat neck, 22 the Detect head (box branch ``cv2``, class branch
``cv3``, DFL decoding on anchor points at cell centres with strides 8/16/32).

The model maps ``[B, H, W, 3]`` RGB images in [0, 1] (H and W multiples of 32) to Ultralytics'
inference output ``[B, 4 + num_classes, A]``: per anchor, the box (centre x, centre y, width,
height) in input pixels and the sigmoid class scores, with A = sum over levels of h * w in
level-major, row-major order, i.e. ``DetectionModel.eval()(x)[0]``. Captured outputs (every conv,
every Conv/Bottleneck/C2f/SPPF block and the head) are channels-last.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xprune_jax.models.layers import Conv2d, Edits, at_least_float32, batch_norm, capture, edited, max_pool, select
from xprune_jax.ops import dist2bbox, make_anchor_points
from xprune_jax.spec import register_spec

SCALES = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768),
          "l": (1.00, 1.00, 512), "x": (1.00, 1.25, 512)}  # yolov8.yaml: (depth, width, max_channels)
REG_MAX = 16  # DFL bins per box side: the box branch outputs 4 * REG_MAX channels
MAX_STRIDE = 32
BN_MOMENTUM = 0.03  # Ultralytics' initialize_weights sets every BatchNorm2d's momentum (and eps 1e-3)


@register_spec
@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Ultralytics ``Conv``: Conv2d without bias -> BatchNorm2d -> SiLU."""

    name: str  # module path, e.g. "model.3" or "cv1"
    out: int
    kernel: int = 1
    stride: int = 1


@register_spec
@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
    name: str  # "m.0"; stays when other bottlenecks of its C2f are removed
    hidden: int  # output channels of cv1 (cv2 maps back to the C2f's hidden width)


@register_spec
@dataclasses.dataclass(frozen=True)
class C2fSpec:
    """cv1 outputs ``first + hidden`` channels, split in two: the first ``first`` go straight to cv2's
    concat (slot 0), the other ``hidden`` feed the bottleneck chain (each bottleneck maps hidden ->
    hidden). cv2 reads the concat ``[first | hidden | m.0 out | m.1 out | ...]``. Ultralytics' halves
    are equal (``first`` is None or ``hidden``); pruning may narrow them apart."""

    name: str
    hidden: int
    bottlenecks: tuple[BottleneckSpec, ...]
    out: int
    shortcut: bool  # residual adds in the bottlenecks (backbone C2f only)
    first: int | None = None  # width of cv1's first half; None (older model files) means ``hidden``

    def __post_init__(self):
        if self.first is None:
            object.__setattr__(self, "first", self.hidden)


@register_spec
@dataclasses.dataclass(frozen=True)
class SPPFSpec:
    name: str
    hidden: int  # cv1's output; cv2 reads 4 * hidden channels (cv1 and three chained max pools)
    out: int
    pool: int = 5


@register_spec
@dataclasses.dataclass(frozen=True)
class DetectSpec:
    name: str
    box_widths: tuple[tuple[int, int], ...]  # per level, the widths of cv2.i.0 and cv2.i.1
    class_widths: tuple[tuple[int, int], ...]  # per level, the widths of cv3.i.0 and cv3.i.1
    num_classes: int = 80
    reg_max: int = REG_MAX
    strides: tuple[int, ...] = (8, 16, 32)


@register_spec
@dataclasses.dataclass(frozen=True)
class YOLOv8Spec:
    scale: str  # "n" | "s" | "m" | "l" | "x": the scale the reference weights were built at
    convs: tuple[ConvSpec, ...]  # the stride-2 Conv layers: model.0, 1, 3, 5, 7 and 16, 19
    c2fs: tuple[C2fSpec, ...]  # model.2, 4, 6, 8 (backbone) and 12, 15, 18, 21 (neck)
    sppf: SPPFSpec  # model.9
    detect: DetectSpec  # model.22
    bn_eps: float = 1e-3
    fused: bool = False  # BatchNorms folded into the convs (which then have a bias), as Ultralytics' fuse()
    edits: Edits = Edits()


# yolov8.yaml as (inputs, kind, yaml args) for model.0 ... model.22; -1 is the previous layer. The yaml
# args are (channels, kernel, stride) for Conv, (channels, repeats, shortcut) for C2f, (channels,) for SPPF.
LAYERS = (
    (-1, "conv", (64, 3, 2)), (-1, "conv", (128, 3, 2)), (-1, "c2f", (128, 3, True)),
    (-1, "conv", (256, 3, 2)), (-1, "c2f", (256, 6, True)), (-1, "conv", (512, 3, 2)), (-1, "c2f", (512, 6, True)),
    (-1, "conv", (1024, 3, 2)), (-1, "c2f", (1024, 3, True)), (-1, "sppf", (1024,)),
    (-1, "upsample", ()), ((-1, 6), "concat", ()), (-1, "c2f", (512, 3, False)),
    (-1, "upsample", ()), ((-1, 4), "concat", ()), (-1, "c2f", (256, 3, False)),
    (-1, "conv", (256, 3, 2)), ((-1, 12), "concat", ()), (-1, "c2f", (512, 3, False)),
    (-1, "conv", (512, 3, 2)), ((-1, 9), "concat", ()), (-1, "c2f", (1024, 3, False)),
    ((15, 18, 21), "detect", ()),
)


def layer_sources(index: int) -> tuple[int, ...]:
    """The layers whose outputs ``model.{index}`` reads, in order (-1 resolved)."""
    source = LAYERS[index][0]
    return tuple(index - 1 if s == -1 else s for s in (source if isinstance(source, tuple) else (source,)))


def yolov8_spec(scale: str, num_classes: int = 80) -> YOLOv8Spec:
    """The spec Ultralytics' ``parse_model`` builds from ``yolov8{scale}.yaml``."""
    depth, width, max_channels = SCALES[scale]

    def channels(c):  # make_divisible(min(c, max_channels) * width, 8)
        return math.ceil(min(c, max_channels) * width / 8) * 8

    widths, convs, c2fs, sppf, detect = [], [], [], None, None
    for index, (source, kind, args) in enumerate(LAYERS):
        name = f"model.{index}"
        if kind == "conv":
            convs.append(ConvSpec(name, channels(args[0]), args[1], args[2]))
            widths.append(convs[-1].out)
        elif kind == "c2f":
            out, repeats = channels(args[0]), max(round(args[1] * depth), 1)
            hidden = out // 2
            c2fs.append(C2fSpec(name, hidden, tuple(BottleneckSpec(f"m.{i}", hidden) for i in range(repeats)),
                                out, shortcut=args[2]))
            widths.append(out)
        elif kind == "sppf":
            sppf = SPPFSpec(name, widths[-1] // 2, channels(args[0]))
            widths.append(sppf.out)
        elif kind == "upsample":
            widths.append(widths[-1])
        elif kind == "concat":
            widths.append(sum(widths[i] for i in source))
        else:
            first = widths[source[0]]
            box, cls = max(16, first // 4, 4 * REG_MAX), max(first, min(num_classes, 100))
            detect = DetectSpec(name, ((box, box),) * len(source), ((cls, cls),) * len(source), num_classes)
    return YOLOv8Spec(scale, tuple(convs), tuple(c2fs), sppf, detect)


class ConvBlock(nn.Module):
    """Ultralytics ``Conv`` with SiLU; when fused, a conv with bias and no BatchNorm."""

    spec: ConvSpec
    bn_eps: float
    fused: bool

    @nn.compact
    def __call__(self, x):
        s = self.spec
        y = Conv2d(s.out, s.kernel, s.stride, use_bias=self.fused, name="conv")(x)
        if not self.fused:
            y = batch_norm("bn", self.bn_eps, BN_MOMENTUM)(y)
        return capture(self, nn.silu(y))


class Bottleneck(nn.Module):
    spec: BottleneckSpec
    out: int
    shortcut: bool
    bn_eps: float
    fused: bool

    @nn.compact
    def __call__(self, x):
        y = ConvBlock(ConvSpec("cv1", self.spec.hidden, 3), self.bn_eps, self.fused, name="cv1")(x)
        y = ConvBlock(ConvSpec("cv2", self.out, 3), self.bn_eps, self.fused, name="cv2")(y)
        return capture(self, x + y if self.shortcut else y)


class C2f(nn.Module):
    spec: C2fSpec
    bn_eps: float
    fused: bool

    @nn.compact
    def __call__(self, x):
        s, eps, fused = self.spec, self.bn_eps, self.fused
        y = ConvBlock(ConvSpec("cv1", s.first + s.hidden), eps, fused, name="cv1")(x)
        parts = [select(self, "first", y, np.s_[:s.first]), select(self, "second", y, np.s_[s.first:])]
        for b in s.bottlenecks:
            parts.append(Bottleneck(b, s.hidden, s.shortcut, eps, fused, name=b.name)(parts[-1]))
        y = ConvBlock(ConvSpec("cv2", s.out), eps, fused, name="cv2")(jnp.concatenate(parts, axis=-1))
        return capture(self, y)


class SPPF(nn.Module):
    spec: SPPFSpec
    bn_eps: float
    fused: bool

    @nn.compact
    def __call__(self, x):
        s = self.spec
        parts = [ConvBlock(ConvSpec("cv1", s.hidden), self.bn_eps, self.fused, name="cv1")(x)]
        for _ in range(3):
            parts.append(max_pool(parts[-1], s.pool, 1, s.pool // 2))
        y = ConvBlock(ConvSpec("cv2", s.out), self.bn_eps, self.fused, name="cv2")(jnp.concatenate(parts, axis=-1))
        return capture(self, y)


def dfl_decode(box_logits: jax.Array, reg_max: int) -> jax.Array:
    """Ultralytics ``DFL``: ``[..., 4 * reg_max]`` bin logits -> ``[..., 4]`` expected distances.

    The softmax over each side's bins is contracted with the fixed weights 0..reg_max-1 (the DFL
    conv of the checkpoint, a constant here) by a multiply-and-sum, not a matmul, so TF32 never applies.
    """
    probs = jax.nn.softmax(box_logits.reshape(*box_logits.shape[:-1], 4, reg_max), axis=-1)
    return jnp.sum(probs * jnp.arange(reg_max, dtype=probs.dtype), axis=-1)


class Detect(nn.Module):
    """The anchor-free Detect head of YOLOv8 (Ultralytics' "legacy" head: two 3x3 Convs per branch).

    Returns ``[B, 4 + num_classes, A]`` like Ultralytics and captures the same values channels-last,
    ``[B, A, 4 + num_classes]``, like every other captured output.
    """

    spec: DetectSpec
    bn_eps: float
    fused: bool

    @nn.compact
    def __call__(self, features):
        s, eps, fused = self.spec, self.bn_eps, self.fused
        boxes, logits = [], []
        for i, x in enumerate(features):
            for branch, widths, outputs, collected in (("cv2", s.box_widths[i], 4 * s.reg_max, boxes),
                                                       ("cv3", s.class_widths[i], s.num_classes, logits)):
                y = ConvBlock(ConvSpec(f"{branch}.{i}.0", widths[0], 3), eps, fused, name=f"{branch}.{i}.0")(x)
                y = ConvBlock(ConvSpec(f"{branch}.{i}.1", widths[1], 3), eps, fused, name=f"{branch}.{i}.1")(y)
                y = Conv2d(outputs, 1, use_bias=True, name=f"{branch}.{i}.2")(y)
                collected.append(y.reshape(y.shape[0], -1, outputs))
        points, strides = make_anchor_points([x.shape[1:3] for x in features], s.strides)
        # Boxes are decoded in float32 even in a bfloat16 network (its pixel steps would be 4 px at 640).
        distances = dfl_decode(at_least_float32(jnp.concatenate(boxes, axis=1)), s.reg_max)
        xywh = dist2bbox(distances, points) * strides
        out = jnp.concatenate([xywh, jax.nn.sigmoid(at_least_float32(jnp.concatenate(logits, axis=1)))], axis=-1)
        return jnp.swapaxes(capture(self, out), 1, 2)


class YOLOv8(nn.Module):
    spec: YOLOv8Spec

    @nn.compact
    def __call__(self, images):
        """``[B, H, W, 3]`` RGB in [0, 1] -> ``[B, 4 + num_classes, A]`` (xywh in input pixels, class scores)."""
        s = self.spec
        if images.shape[1] % MAX_STRIDE or images.shape[2] % MAX_STRIDE:
            raise ValueError(f"YOLOv8 input sides must be multiples of {MAX_STRIDE}, got {images.shape[1:3]}")
        with edited(s.edits):
            return self._forward(images)

    def _forward(self, images):
        s = self.spec
        blocks = {b.name: b for b in (*s.convs, *s.c2fs, s.sppf, s.detect)}
        outputs, x = [], images
        for index, (source, kind, _) in enumerate(LAYERS):
            name = f"model.{index}"
            if kind == "conv":
                x = ConvBlock(blocks[name], s.bn_eps, s.fused, name=name)(x)
            elif kind == "c2f":
                x = C2f(blocks[name], s.bn_eps, s.fused, name=name)(x)
            elif kind == "sppf":
                x = SPPF(blocks[name], s.bn_eps, s.fused, name=name)(x)
            elif kind == "upsample":  # nn.Upsample(scale_factor=2, mode="nearest")
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            elif kind == "concat":
                x = jnp.concatenate([x if i == -1 else outputs[i] for i in source], axis=-1)
            else:
                x = Detect(blocks[name], s.bn_eps, s.fused, name=name)([outputs[i] for i in source])
            outputs.append(x)
        return x


def fuse_batch_norms(spec: YOLOv8Spec, variables: dict) -> tuple[YOLOv8Spec, dict]:
    """Fold every BatchNorm into its conv, as Ultralytics' ``DetectionModel.fuse()``.

    ``kernel * g``, ``bias = beta - mean * g`` with ``g = scale / sqrt(var + eps)`` per output
    channel, computed in float64. Returns the fused spec and its variables (``params`` only).
    """
    if spec.fused:
        return spec, variables

    def fold(params: dict, stats: dict) -> dict:
        out = {}
        for name, child in params.items():
            if not isinstance(child, dict):
                out[name] = child
            elif "bn" in child:
                bn, moments = child["bn"], stats[name]["bn"]
                scale, shift, mean, var = (np.asarray(a, np.float64) for a in
                                           (bn["scale"], bn["bias"], moments["mean"], moments["var"]))
                gain = scale / np.sqrt(var + spec.bn_eps)
                bias = shift - mean * gain
                kernel = np.asarray(child["conv"]["kernel"], np.float64) * gain
                out[name] = {"conv": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}
            else:
                out[name] = fold(child, stats.get(name, {}))
        return out

    return dataclasses.replace(spec, fused=True), {"params": fold(variables["params"], variables["batch_stats"])}

"""The channel tracer on toy graphs, one feature each (as Torch-Pruning tests its DepGraph), written with
Flax's own layers: what a user's model is made of. Abstract traces only: no compilation."""

import dataclasses
import functools
import gzip
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xprune_jax import models
from xprune_jax.models.layers import select
from xprune_jax.pruning.trace import ChannelGroup, Slot
from xprune_jax.pruning.trace import Unit, trace

X = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)


def _trace(module, x=X):
    return trace(module, jax.eval_shape(module.init, jax.random.key(0), x), x)


def _groups(graph) -> dict:
    return {g.name: g for g in graph.groups}


def _conv(features, name, kernel=1, **kwargs):
    return nn.Conv(features, (kernel, kernel), name=name, **kwargs)


class Concat(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _conv(4, "stem", 3)(x)
        a, b = _conv(5, "a")(x), _conv(6, "b")(x)
        y = _conv(7, "c")(jnp.concatenate([a, b], axis=-1))
        return nn.Dense(2, name="head")(y.mean((1, 2)))


def test_concat_slots_and_heads():
    graph = _trace(Concat())
    groups = _groups(graph)
    assert groups["a"].consumers == (Slot("c", 0),) and groups["b"].consumers == (Slot("c", 5),)
    assert (groups["a"].width, groups["b"].width) == (5, 6)
    assert groups["c"].consumers == (Slot("head", 0),)  # after the global pooling
    assert groups["stem"].consumers == (Slot("a"), Slot("b"))
    assert graph.heads == ["head"] and graph.untraceable == {"head": "the model's outputs"}


class Split(nn.Module):
    """A C2f: cv1's output split unequally, the second part through a conv, all three parts concatenated.
    ``static``: split by plain code instead of layers.select (which pruning may move)."""

    static: bool = False

    @nn.compact
    def __call__(self, x):
        y = _conv(8, "cv1")(x)
        if self.static:
            first, second = jnp.split(y, [3], axis=-1)
        else:
            first, second = select(self, "first", y, np.s_[:3]), select(self, "second", y, np.s_[3:])
        third = _conv(5, "m", 3)(second)
        return _conv(4, "cv2")(jnp.concatenate([first, second, third], axis=-1))


def test_split_cuts_the_producer_into_segments():
    graph = _trace(Split())
    groups = _groups(graph)
    assert (groups["cv1[0]"].width, groups["cv1[0]"].producers, groups["cv1[0]"].consumers) == \
        (3, (Slot("cv1", 0),), (Slot("cv2", 0),))
    assert (groups["cv1[1]"].width, groups["cv1[1]"].producers) == (5, (Slot("cv1", 3),))
    assert set(groups["cv1[1]"].consumers) == {Slot("m", 0), Slot("cv2", 3)}
    assert groups["m"].consumers == (Slot("cv2", 8),)
    inputs, index = graph.selections["second"]
    assert len(inputs) == 8 and list(index) == [3, 4, 5, 6, 7]


def test_a_static_split_keeps_the_width_before_its_bound():
    """Code that slices at a fixed channel would break if the channels before it shrank: they are protected,
    those after it are not."""
    graph = _trace(Split(static=True))
    assert graph.untraceable == {"cv1[0]": "a channel slice outside layers.select", "cv2": "the model's outputs"}
    assert _groups(graph)["cv1[1]"].width == 5


class Shuffle(nn.Module):
    """ShuffleNetV2's channel shuffle of two branches; the next conv reads the first half."""

    @nn.compact
    def __call__(self, x):
        y = jnp.concatenate([_conv(4, "a")(x), _conv(4, "b")(x)], axis=-1)
        y = jnp.swapaxes(y.reshape(*y.shape[:-1], 2, 4), -1, -2).reshape(y.shape)
        return _conv(2, "e")(_conv(3, "c")(y) + _conv(3, "d")(y[..., :4]))


def test_shuffle_gives_index_slots():
    groups = _groups(_trace(Shuffle()))
    assert groups["a"].consumers == (Slot("c", index=(0, 2, 4, 6)), Slot("d", index=(0, 2, -1, -1)))
    assert groups["b"].consumers == (Slot("c", index=(1, 3, 5, 7)), Slot("d", index=(1, 3, -1, -1)))
    assert set(groups["c"].producers) == {Slot("c"), Slot("d")}  # added: coupled


class SqueezeExcite(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _conv(6, "conv")(x)
        s = nn.relu(nn.Dense(3, name="fc1")(x.mean((1, 2))))
        s = nn.sigmoid(nn.Dense(6, name="fc2")(s))
        return _conv(5, "next")(x * s[:, None, None, :])


def test_squeeze_excite_gate_is_coupled_with_the_channels_it_gates():
    groups = _groups(_trace(SqueezeExcite()))
    assert set(groups["conv"].producers) == {Slot("conv"), Slot("fc2")}
    assert set(groups["conv"].consumers) == {Slot("fc1"), Slot("next")}
    assert groups["fc1"].consumers == (Slot("fc2"),) and "fc2" not in groups


class SharedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = _conv(5, "shared", 3)
        return shared(_conv(4, "a")(x)).sum() + shared(_conv(4, "b", 3)(x)).sum()


def test_a_shared_conv_couples_its_inputs():
    groups = _groups(_trace(SharedConv()))
    assert set(groups["a"].producers) == {Slot("a"), Slot("b")} and groups["a"].consumers == (Slot("shared"),)


class Flatten(nn.Module):
    """torch's NCHW flatten before a linear layer (Faster R-CNN's fc6 after RoIAlign)."""

    @nn.compact
    def __call__(self, x):
        y = _conv(4, "conv", 3, strides=2)(x)
        y = y.transpose(0, 3, 1, 2).reshape(y.shape[0], -1)
        return nn.Dense(2, name="fc")(y)


def test_flatten_reads_a_span_per_channel():
    assert _groups(_trace(Flatten()))["conv"].consumers == (Slot("fc", 0, 16),)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + _conv(x.shape[-1], "conv2", 3)(nn.relu(_conv(3, "conv1")(x)))


class Residual(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(_conv(4, "stem", 3)(x))
        x = Block(name="block")(x)
        x = Block(name="other")(x)
        return _conv(2, "out")(x)


def test_residual_adds_couple_and_blocks_are_removable():
    graph = _trace(Residual())
    groups = _groups(graph)
    assert set(groups["stem"].producers) == {Slot("stem"), Slot("block.conv2"), Slot("other.conv2")}
    assert set(groups["stem"].consumers) == {Slot("block.conv1"), Slot("other.conv1"), Slot("out")}
    assert groups["block.conv1"].consumers == (Slot("block.conv2"),)
    assert graph.units == [Unit("block", "identity"), Unit("other", "identity")]


class Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.BatchNorm(use_running_average=True, name="bn")(_conv(6, "pw")(x))
        y = nn.Conv(6, (3, 3), feature_group_count=6, name="dw")(y)
        return _conv(2, "out")(y)


def test_depthwise_conv_and_norm_carry_the_channels():
    group = _groups(_trace(Depthwise()))["pw"]
    assert (group.norms, group.depthwise, group.consumers) == ((Slot("bn"),), (Slot("dw"),), (Slot("out"),))
    assert "dw" not in _groups(_trace(Depthwise()))


class PassThrough(nn.Module):
    """Resize, pooling, a gather over rows, and padding of the channels: the channels follow."""

    @nn.compact
    def __call__(self, x):
        y = _conv(4, "a")(x)
        y = jax.image.resize(y, (1, 16, 16, 4), "nearest")
        y = nn.avg_pool(nn.max_pool(y, (2, 2), (2, 2)), (3, 3), padding="SAME")
        y = y[:, jnp.array([0, 2, 4])]
        y = jnp.pad(y, ((0, 0), (0, 0), (0, 0), (2, 1)))
        return _conv(3, "c")(y)


def test_resize_pooling_gather_and_pad_keep_the_channels():
    assert _groups(_trace(PassThrough()))["a"].consumers == (Slot("c", 2),)


class ConcatUnit(nn.Module):
    """A ShuffleNetV2 unit: half the input passes by, the other half goes through a branch."""

    @nn.compact
    def __call__(self, x):
        x = _conv(8, "stem")(x)
        return jnp.concatenate([x[..., :4], Branch(name="branch")(x[..., 4:])], axis=-1)


class Branch(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(_conv(4, "conv")(x))


def test_a_branch_into_a_concat_is_removable():
    assert _trace(ConcatUnit()).units == [Unit("branch", "identity")]


class Removals(nn.Module):
    """A residual add outside the branch's module, and a branch concatenated next to its own input."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(_conv(4, "stem")(x))
        x = x + Branch(name="outside")(x)
        return _conv(2, "out")(jnp.concatenate([x, Branch(name="next_to_input")(x)], axis=-1))


def test_how_each_unit_goes():
    """Added outside its module: it becomes 0; concatenated next to its input: it is dropped (its slot goes)."""
    assert _trace(Removals()).units == [Unit("outside", "zero"), Unit("next_to_input", "drop")]


class Reduce(nn.Module):
    """Channels reduced over (max over the channel axis), and channels through an FFT the tracer doesn't know."""

    @nn.compact
    def __call__(self, x):
        a, b, c = _conv(4, "a")(x), _conv(4, "b")(x), _conv(4, "c")(x)
        return a.max(-1).sum() + jnp.real(jnp.fft.fft(b, axis=-1)).sum() + _conv(2, "d")(c).sum()


def test_untraceable_channels_are_protected():
    graph = _trace(Reduce())
    assert [g.name for g in graph.groups] == ["c"]
    assert graph.untraceable["a"] == "reduce_max" and graph.untraceable["b"] == "fft"
    assert {"a", "b"} <= set(graph.heads)


# --- the six architectures: traced == hand-written -------------------------------------------------------------

HANDWRITTEN = pathlib.Path(__file__).parent / "data" / "handwritten_groups.json.gz"  # rules.py's groups at 9c18243
STEMS = {"resnet50": "conv1", "mobilenet_v2": "features.0.0", "shufflenet_v2_x1_0": "conv1.0", "yolov8n": "model.0.conv",
         "fasterrcnn_resnet50_fpn": "backbone.body.conv1", "retinanet_resnet50_fpn": "backbone.body.conv1"}
# multi-producer groups are named by their first producer, the rules named them by stage or FPN part
_STAGES = {f"layer{i}": f"layer{i}.0.conv3" for i in range(1, 5)}
_BODY = {f"backbone.body.{k}": f"backbone.body.{v}" for k, v in _STAGES.items()}
RENAMED = {"resnet50": _STAGES,
           "fasterrcnn_resnet50_fpn": {**_BODY, "backbone.fpn.inner_blocks": "backbone.fpn.inner_blocks.0.0",
                                       "backbone.fpn.layer_blocks": "backbone.fpn.layer_blocks.3.0"},
           "retinanet_resnet50_fpn": {**_BODY, "backbone.fpn.inner_blocks": "backbone.fpn.inner_blocks.0.0",
                                      "backbone.fpn.layer_blocks": "backbone.fpn.layer_blocks.2.0"}}
YOLO_NECK = ("model.12", "model.15", "model.18", "model.21")


@functools.lru_cache(maxsize=None)
def _timed_trace(arch: str):
    """The architecture traced (Faster R-CNN at its reference size, the others at 64 px) and the seconds it took."""
    size = 800 if arch == "fasterrcnn_resnet50_fpn" else 64
    spec = models.get_architecture(arch).default_spec()
    variables = models.variable_shapes(arch, spec, size)
    start = time.perf_counter()
    graph = trace(models.build(arch, spec), variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return graph, time.perf_counter() - start


def _traced(arch: str):
    return _timed_trace(arch)[0]


def _content(group: dict | ChannelGroup):
    kinds = ("producers", "norms", "depthwise", "consumers")
    if isinstance(group, dict):
        return group["width"], *(frozenset(Slot(layer, offset, span, index and tuple(index))
                                           for layer, offset, span, index in group[k]) for k in kinds)
    return group.width, *(frozenset(getattr(group, k)) for k in kinds)


@pytest.mark.parametrize("arch", list(STEMS))
def test_traced_groups_and_units_equal_the_handwritten_rules(arch):
    """Every hand-written group is traced with the same producers, norms, depthwise convs and consumers at the
    same slots (offsets, fc6's span of 49, ShuffleNetV2's index lists through the shuffles), under its name
    (multi-producer groups: its first producer's); the traced groups beyond them make the stem's output (or a
    head's), which the plans protect; the removable units and the heads are the same. YOLOv8's neck C2fs differ
    by design, see below."""
    want = json.loads(gzip.decompress(HANDWRITTEN.read_bytes()))[arch]
    graph = _traced(arch)
    traced = {g.name: g for g in graph.groups}
    renamed = RENAMED.get(arch, {})
    neck = {f"{c}.cv1.conv[1]" for c in YOLO_NECK} if arch == "yolov8n" else set()
    for group in want["groups"]:
        if group["name"] not in neck:
            assert _content(traced[renamed.get(group["name"], group["name"])]) == _content(group), group["name"]
    matched = {renamed.get(g["name"], g["name"]) for g in want["groups"]} | {f"{c}.m.0.cv2.conv" for c in YOLO_NECK if neck}
    extra = [g for name, g in traced.items() if name not in matched]
    protected = {STEMS[arch], *want["heads"]} if want["heads"] else {STEMS[arch]}
    assert all(any(s.layer in protected for s in g.producers) for g in extra), [g.name for g in extra]
    units = [f"{n}.branch2" if arch.startswith("shufflenet") else n for n in want["removable"]]  # the branch is a module now
    assert sorted(u.name for u in graph.units) == sorted(units)
    assert {u.removal for u in graph.units} == {"yolov8n": {"identity", "drop"}}.get(arch, {"identity"})
    assert set(want["heads"] or graph.heads) == set(graph.heads) and graph.untraceable


def test_yolov8_neck_c2f_is_finer_traced():
    """The rules coupled a neck C2f's bottleneck output with cv1's second half, although no residual add joins
    them (an artefact of C2fSpec's single `hidden` width). Traced, they are two groups whose slots together are the
    hand-written group's."""
    want = {g["name"]: g for g in json.loads(gzip.decompress(HANDWRITTEN.read_bytes()))["yolov8n"]["groups"]}
    traced = {g.name: g for g in _traced("yolov8n").groups}
    for c2f in YOLO_NECK:
        half, bottleneck = traced[f"{c2f}.cv1.conv[1]"], traced[f"{c2f}.m.0.cv2.conv"]
        assert half.producers == (Slot(f"{c2f}.cv1.conv", half.width),)  # the second half only
        assert bottleneck.producers == (Slot(f"{c2f}.m.0.cv2.conv"),)
        assert bottleneck.consumers == (Slot(f"{c2f}.cv2.conv", 2 * half.width),)  # its concat slot
        merged = (half.width, *(half_slots | set(getattr(bottleneck, k)) for k, half_slots in
                                zip(("producers", "norms", "depthwise", "consumers"), _content(half)[1:])))
        assert merged == _content(want[f"{c2f}.cv1.conv[1]"])


def test_a_shufflenet_spec_with_explicit_channel_routing_traces_the_same():
    """Model files pruned before Edits route ShuffleNetV2's channels by explicit ``split`` and ``order`` spec
    fields (a gather by a constant index): with torchvision's routing made explicit, the trace follows the
    gathers to the same groups as through the reshape-and-transpose shuffle."""
    arch = "shufflenet_v2_x1_0"
    spec = models.get_architecture(arch).default_spec()
    units, width = [], spec.stem
    for u in spec.units:
        width = (u.branch1 or width // 2) + u.branch2[1]
        shuffle = tuple(g * (width // 2) + j for j in range(width // 2) for g in range(2))
        units.append(dataclasses.replace(u, split=None if u.stride == 2 else width // 2, order=shuffle))
    explicit = dataclasses.replace(spec, units=tuple(units))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    graph = trace(models.build(arch, explicit), models.variable_shapes(arch, explicit, 64), x)
    assert [_content(g) for g in graph.groups] == [_content(g) for g in _traced(arch).groups]
    assert graph.units == _traced(arch).units


def test_tracing_faster_rcnn_takes_under_10_seconds():
    """At its reference input size (800 px), abstractly: no compilation (about 2 s here)."""
    graph, seconds = _timed_trace("fasterrcnn_resnet50_fpn")
    assert graph.groups and seconds < 10, seconds

"""Channel groups and removable units traced from the jaxpr of ``module.apply`` (DepGraph over a jaxpr).

Every axis of every variable gets one node per index. The jaxpr is walked once (its ``jit`` and
``custom_jvp``/``custom_vjp`` sub-jaxprs inlined); each value carries *fields*: arrays of node ids
laid out as its own axes (size 1 on the axes they don't vary along), i.e. which channel sits at each
position. A conv or dense layer gives its output the nodes of its kernel's output axis and joins its
input's ids to its kernel's input axis; elementwise ops (BN, bias, activations, residual adds,
squeeze-excite gates) and concatenations along another axis join the ids at each position;
concatenate, slice, split, pad, reshape and transpose move them (shuffles and flattens included).
Joined nodes form components (union-find): one component is one channel of the network, with every
kernel, BN and depthwise conv that holds it. A primitive that mixes a channel axis in a way not
followed here (a reduction over channels, a data-dependent gather, a loop) marks the channels it
reads *untraceable*, as do the model's outputs: they are never pruned.

Channels made by the same producers (and the same segment of a producer that a slice cuts, like a
C2f's two halves) form one :class:`ChannelGroup`; where a layer holds them becomes its
:class:`Slot` (an offset, a span, or an index list where a shuffle scatters them).

Removable units are modules whose computation is a branch between two values of the same shape:
one whose output joins a residual add with its input (the branch can become 0), or one whose output
is only a concatenation's operand (the branch can become the identity).
"""

import collections
import dataclasses
import math
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from xprune_jax.errors import UserError
from xprune_jax.models.layers import one_primitive_per_conv
from xprune_jax.pruning.groups import ChannelGroup, Slot

ELEMENTWISE = frozenset("""
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type copy copy_p
    cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma log log1p
    logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem round rsqrt select_n sign sin sinh
    sqrt square stop_gradient sub tan tanh xor shift_left shift_right_arithmetic shift_right_logical
    """.split())
REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split())
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
WINDOWS = frozenset("reduce_window_max reduce_window_min reduce_window_sum reduce_window".split())
VIEWS = frozenset("convert_element_type copy copy_p reduce_precision reshape broadcast_in_dim transpose squeeze".split())
SCOPES = ("xprune-module:", "select:")  # name scopes: a module call (index into the traced modules), a selection
CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # the params holding an inlined primitive's sub-jaxpr
OUTPUT = "the model's outputs"


class Field(typing.NamedTuple):
    """Node ids over some axes of a value: ``ids`` has the value's rank, full size on ``axes`` and
    size 1 elsewhere; -1 where a position holds no channel."""

    ids: np.ndarray
    axes: tuple[int, ...]


def _relocate(field: Field, new_axes, ndim: int) -> Field:
    """``field``'s axes moved to ``new_axes`` (one per axis, same order) in a value of rank ``ndim``."""
    core_ids = field.ids.reshape([field.ids.shape[a] for a in field.axes])
    order = np.argsort(new_axes)
    core_ids = core_ids.transpose(order)
    shape = [1] * ndim
    for a, n in zip(sorted(new_axes), core_ids.shape):
        shape[a] = n
    return Field(core_ids.reshape(shape), tuple(sorted(new_axes)))


@dataclasses.dataclass(frozen=True)
class Unit:
    """A removable unit: the module ``name`` whose computation is a branch between two values of the
    same shape, and how it goes (:class:`~xprune_jax.models.layers.Edits`): ``"identity"`` (its output
    joins a residual add inside it, or only a concatenation without its input), ``"zero"`` (its output is
    added outside it), or ``"drop"`` (it is only concatenated, next to its own input: its slot goes)."""

    name: str
    removal: str


@dataclasses.dataclass
class Graph:
    """What the tracer found: channel groups (in execution order of their first producer), untraceable
    groups with the reason, removable units, the layers whose outputs are untraceable (heads), each
    channel selection's input channels and index, and each group's channels (channels as component roots)."""

    groups: list[ChannelGroup]
    untraceable: dict[str, str]  # group name -> what its channels reach that the tracer does not follow
    units: list[Unit]
    heads: list[str]
    selections: dict[str, tuple[np.ndarray, np.ndarray]]  # "{module}.{name}" -> (channels in, index taken)
    channels: dict[str, np.ndarray]  # group name -> its channels

    def group(self, name: str) -> ChannelGroup:
        found = next((g for g in self.groups if g.name == name), None)
        if found is None:
            if name in self.untraceable:
                raise UserError(f"cannot prune {name}: its channels reach {self.untraceable[name]}, which the channel "
                                "tracer does not follow; protect it or change the model")
            raise UserError(f"{name} is not a channel group of this model")
        return found


class _Nodes:
    """Union-find over the nodes of every variable axis."""

    def __init__(self, leaves: list[tuple[str, str, str, tuple[int, ...]]]):
        self.leaves = leaves  # (collection, layer, leaf name, shape) per variable
        self.start = {}
        total = 0
        for i, (*_, shape) in enumerate(leaves):
            for axis, n in enumerate(shape):
                self.start[i, axis] = total
                total += n
        self.parent = list(range(total))
        self.leaf = np.zeros(total, int)
        self.axis = np.zeros(total, int)
        self.index = np.zeros(total, int)
        for (i, axis), start in self.start.items():
            n = leaves[i][3][axis]
            self.leaf[start:start + n], self.axis[start:start + n], self.index[start:start + n] = i, axis, np.arange(n)

    def fields(self, i: int) -> list[Field]:
        shape = self.leaves[i][3]
        return [Field(np.arange(self.start[i, a], self.start[i, a] + n).reshape([n if b == a else 1 for b in range(len(shape))]), (a,))
                for a, n in enumerate(shape)]

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        pairs = (a >= 0) & (b >= 0) & (a != b)
        for x, y in zip(a[pairs].tolist(), b[pairs].tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(x)) for x in ids.ravel()], int).reshape(ids.shape)


class _Eqn(typing.NamedTuple):
    primitive: object
    params: dict
    ins: list[int]
    outs: list[int]
    scope: tuple[str, ...]  # the modules (their index in the trace's module list) and selections it runs in


class _Flat:
    """The jaxpr with its call primitives inlined: equations over integer value keys."""

    def __init__(self):
        self.eqns, self.shape, self.const, self.producer, self.unknown = [], [], {}, {}, set()

    def new(self, aval) -> int:
        self.shape.append(tuple(getattr(aval, "shape", ())))
        return len(self.shape) - 1

    def inline(self, jaxpr, consts, ins: list[int], scope: tuple[str, ...] = ()) -> list[int]:
        env = dict(zip(jaxpr.invars, ins))
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = self.new(var.aval)
            self.const[env[var]] = value

        def read(atom):
            if isinstance(atom, core.Literal):
                key = self.new(atom.aval)
                self.const[key] = np.asarray(atom.val)
                return key
            return env[atom]

        for eqn in jaxpr.eqns:
            ins_ = [read(a) for a in eqn.invars]
            sub = _call_jaxpr(eqn)
            here = scope + tuple(c for c in str(eqn.source_info.name_stack).split("/") if c.startswith(SCOPES))
            if sub is not None:
                outs = self.inline(sub.jaxpr, sub.consts, ins_, here)
            else:
                outs = [self.new(v.aval) for v in eqn.outvars]
                self.eqns.append(_Eqn(eqn.primitive, eqn.params, ins_, outs, here))
                for key in outs:
                    self.producer[key] = len(self.eqns) - 1
            env.update(zip(eqn.outvars, outs))
        return [read(a) for a in jaxpr.outvars]

    def value(self, key: int):
        """The value of ``key`` if it depends on constants only (evaluated on demand), else None."""
        if key in self.const:
            return self.const[key]
        if key not in self.producer or key in self.unknown:
            return None
        eqn = self.eqns[self.producer[key]]
        values = []
        for k in eqn.ins:
            values.append(self.value(k))
            if values[-1] is None or math.prod(self.shape[key]) > 1 << 20:
                self.unknown.add(key)
                return None
        numpy = _NUMPY.get(eqn.primitive.name)
        if numpy is not None:
            out = numpy(*values, **eqn.params)
        else:
            with jax.ensure_compile_time_eval():
                out = eqn.primitive.bind(*values, **eqn.params)
        for k, v in zip(eqn.outs, out if eqn.primitive.multiple_results else [out]):
            self.const[k] = np.asarray(v)
        return self.const[key]


def _broadcast(x, shape, broadcast_dimensions, **_):
    expanded = np.reshape(x, [x.shape[broadcast_dimensions.index(a)] if a in broadcast_dimensions else 1
                              for a in range(len(shape))])
    return np.broadcast_to(expanded, shape)


_NUMPY = {  # constant folding without a compilation for what index arithmetic uses most (jnp.take)
    "convert_element_type": lambda x, new_dtype, **_: np.asarray(x).astype(new_dtype),
    "lt": lambda a, b: np.less(a, b), "ge": lambda a, b: np.greater_equal(a, b), "add": lambda a, b: np.add(a, b),
    "select_n": lambda which, *cases: np.choose(np.asarray(which).astype(int), cases),
    "broadcast_in_dim": _broadcast, "reshape": lambda x, new_sizes, **_: np.reshape(x, new_sizes),
}


def _call_jaxpr(eqn):
    for name in CALLS:
        sub = eqn.params.get(name)
        if isinstance(sub, core.Jaxpr):
            sub = core.ClosedJaxpr(sub, ())
        if isinstance(sub, core.ClosedJaxpr) and len(sub.jaxpr.invars) == len(eqn.invars):
            return sub
    return None


def _reshape_groups(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Contiguous axis groups ``(old axes, new axes)`` of equal size that a row-major reshape maps onto each other."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        a, b = [i], [j]
        size_a = old[i] if i < len(old) else 1
        size_b = new[j] if j < len(new) else 1
        i, j = i + 1, j + 1
        while size_a != size_b:
            if size_a < size_b:
                size_a *= old[i]
                a.append(i)
                i += 1
            else:
                size_b *= new[j]
                b.append(j)
                j += 1
        groups.append(([x for x in a if x < len(old)], [x for x in b if x < len(new)]))
    return groups


class _Tracer:
    def __init__(self, nodes: _Nodes, flat: _Flat):
        self.nodes, self.flat = nodes, flat
        self.fields: dict[int, list[Field]] = {}
        self.role: dict[tuple[int, int], str] = {}  # (leaf, axis) -> producer | consumer | depthwise | vector
        self.order: dict[int, int] = {}  # kernel leaf -> execution order
        self.protected: dict[int, str] = {}  # node -> the primitive that made it untraceable
        self.cuts = collections.defaultdict(set)  # (leaf, axis) -> indices where a slice starts a new segment
        self.variables: set[int] = set()  # values that are variables (or a cast, reshape, broadcast of one)

    # --- helpers ---------------------------------------------------------------------------------------------
    def protect(self, fields, reason: str) -> None:
        for f in fields:
            for node in np.unique(f.ids[f.ids >= 0]).tolist():
                self.protected.setdefault(node, reason)

    def leaf_of(self, field: Field) -> tuple[int, int] | None:
        """``(variable leaf, its axis)`` if ``field`` is exactly that axis of a variable (read directly), else None."""
        ids = field.ids[field.ids >= 0]
        if len(field.axes) != 1 or not len(ids):
            return None
        leaf, axis = self.nodes.leaf[ids[0]], self.nodes.axis[ids[0]]
        start = self.nodes.start[leaf, axis]
        own = np.arange(start, start + self.nodes.leaves[leaf][3][axis])
        return (int(leaf), int(axis)) if np.array_equal(field.ids.ravel(), own) else None

    def merge(self, fields: list[Field]) -> list[Field]:
        """Fields over the same axes meet at every position: their ids are joined, one field stays."""
        by_axes = {}
        for f in fields:
            if f.axes in by_axes:
                first = by_axes[f.axes]
                self.nodes.union(first.ids, f.ids)
                by_axes[f.axes] = Field(np.where(first.ids >= 0, first.ids, f.ids), f.axes)
            else:
                by_axes[f.axes] = f
        return list(by_axes.values())

    def owner(self, key: int, field: Field) -> tuple[int, int] | None:
        """``(variable leaf, axis)`` if the value ``key`` is a variable and ``field`` one of its axes."""
        return self.leaf_of(field) if key in self.variables else None

    # --- the walk --------------------------------------------------------------------------------------------
    def run(self) -> None:
        for eqn in self.flat.eqns:
            ins = [self.fields.get(k, []) for k in eqn.ins]
            if not any(ins):
                continue
            name = eqn.primitive.name
            if name in VIEWS and eqn.ins[0] in self.variables:
                self.variables.update(eqn.outs)
            handler = getattr(self, "_" + name, None)
            if name in ELEMENTWISE:
                outs = self._elementwise(eqn, ins)
            elif name in REDUCTIONS:
                outs = [self._reduce(eqn, ins[0], eqn.params["axes"], name)]
            elif name in CUMULATIVE:
                outs = [self._reduce(eqn, ins[0], (eqn.params["axis"],), name, keep=True)]
            elif name in WINDOWS:
                outs = self._window(eqn, ins)
            elif handler is not None:
                outs = handler(eqn, ins)
            else:
                self.protect([f for fs in ins for f in fs], name)
                outs = []
            for key, fields in zip(eqn.outs, outs):
                if fields:
                    self.fields[key] = fields

    def _elementwise(self, eqn, ins):
        for key, fields in zip(eqn.ins, ins):  # a variable combined with channels: a norm's (or a bias's) vector
            for f in fields:
                owner = self.owner(key, f)
                if owner is not None:
                    self.role.setdefault(owner, "vector")
        return [self.merge([f for fields in ins for f in fields])] * len(eqn.outs)

    def _reduce(self, eqn, fields, axes, name, keep=False):
        axes = set(axes)
        self.protect([f for f in fields if axes & set(f.axes)], name)
        out = []
        for f in fields:
            if axes & set(f.axes):
                continue
            if keep:
                out.append(f)
            else:
                remaining = [a for a in range(f.ids.ndim) if a not in axes]
                ids = f.ids.reshape([f.ids.shape[a] for a in remaining])
                out.append(Field(ids, tuple(remaining.index(a) for a in f.axes)))
        return out

    def _window(self, eqn, ins):
        p = eqn.params
        n = len(ins) // 2 if eqn.primitive.name == "reduce_window" else len(ins)
        ok = []
        for fields in ins[:n]:
            for f in fields:
                if all(p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1 and tuple(p["padding"][a]) == (0, 0)
                       and p["base_dilation"][a] == 1 and p["window_dilation"][a] == 1 for a in f.axes):
                    ok.append(f)  # pooling over other axes
                else:
                    self.protect([f], eqn.primitive.name)
        return [self.merge(ok)] * len(eqn.outs)

    def _stop(self, eqn, ins):
        self.protect([f for fs in ins for f in fs], eqn.primitive.name)
        return []

    _while = _cond = _scan = _scatter = _scatter_add = _dynamic_update_slice = _stop

    def _conv_general_dilated(self, eqn, ins):
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        (x, kernel), ndim = ins, len(self.flat.shape[eqn.outs[0]])
        out_axis, in_axis = rhs_spec[0], rhs_spec[1]
        kernel_out = next((f for f in kernel if f.axes == (out_axis,)), None)
        kernel_in = next((f for f in kernel if f.axes == (in_axis,)), None)
        owner = self.owner(eqn.ins[1], kernel_out) if kernel_out is not None else None
        leaf = None if owner is None else owner[0]
        channels = [f for f in x if f.axes == (lhs_spec[1],)]
        others = [f for f in x if f.axes != (lhs_spec[1],)]
        self.protect(others, "conv_general_dilated (over a labelled spatial axis)")
        if leaf is None or p["batch_group_count"] != 1:
            self.protect(x + kernel, "conv_general_dilated (with a kernel that is not a variable)")
            return [[]]
        self.order.setdefault(leaf, len(self.order))
        groups, x_shape = p["feature_group_count"], self.flat.shape[eqn.ins[0]]
        in_channels, kernel_shape = x_shape[lhs_spec[1]], self.flat.shape[eqn.ins[1]]
        if groups == 1:
            self.role[leaf, out_axis], self.role[leaf, in_axis] = "producer", "consumer"
            for f in channels:
                self.nodes.union(f.ids.ravel(), kernel_in.ids.ravel())
            out = kernel_out
        elif groups == in_channels and kernel_shape[in_axis] == 1 and kernel_shape[out_axis] == in_channels:
            self.role[leaf, out_axis] = "depthwise"
            for f in channels:
                self.nodes.union(f.ids.ravel(), kernel_out.ids.ravel())
            if channels:
                return [[_relocate(Field(channels[0].ids, channels[0].axes), (out_spec[1],), ndim)]]
            out = kernel_out
        else:
            self.protect(channels + [kernel_out], f"conv_general_dilated (feature_group_count={groups})")
            out = kernel_out
        return [[_relocate(Field(out.ids.reshape(-1), (0,)), (out_spec[1],), ndim)]]

    def _dot_general(self, eqn, ins):
        ((lc, rc), (lb, rb)) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        shapes = [self.flat.shape[k] for k in eqn.ins]
        ndim = len(self.flat.shape[eqn.outs[0]])
        free = [[a for a in range(len(s)) if a not in c and a not in b] for s, c, b in zip(shapes, (lc, rc), (lb, rb))]
        # output axes: batch, lhs free, rhs free
        out_axis = [{b: i for i, b in enumerate(batch)} for batch in (lb, rb)]
        for side, axes in enumerate(free):
            for i, a in enumerate(axes):
                out_axis[side][a] = len(lb) + (0 if side == 0 else len(free[0])) + i
        outs = []
        for side, (fields, contracting, other_fields, other_contracting) in enumerate(((lhs, lc, rhs, rc), (rhs, rc, lhs, lc))):
            key = eqn.ins[side]
            kernel = any(self.owner(key, f) is not None and set(f.axes) & set(contracting) for f in fields)
            for f in fields:
                owner = self.owner(key, f)
                if not set(f.axes) & set(contracting):
                    if owner is not None and kernel:  # a kernel's output axis
                        self.role.setdefault(owner, "producer")
                    outs.append(_relocate(f, [out_axis[side][a] for a in f.axes], ndim))
                elif len(f.axes) != 1:
                    self.protect([f], "dot_general (contracting channels spread over several axes)")
                else:
                    if owner is not None:
                        self.role[owner] = "consumer"
                        self.order.setdefault(owner[0], len(self.order))
                    partner = other_contracting[list(contracting).index(f.axes[0])]
                    for g in other_fields if side == 0 else ():  # the channels contracted together meet
                        if g.axes == (partner,):
                            self.nodes.union(f.ids.ravel(), g.ids.ravel())
        return [self.merge(outs)]

    def _broadcast_in_dim(self, eqn, ins):
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        old = self.flat.shape[eqn.ins[0]]
        out = []
        for f in ins[0]:
            if any(old[a] == 1 and shape[dims[a]] != 1 for a in f.axes):
                continue  # a single channel spread over an axis: nothing to follow
            out.append(_relocate(f, [dims[a] for a in f.axes], len(shape)))
        return [out]

    def _reshape(self, eqn, ins):
        old, new = self.flat.shape[eqn.ins[0]], self.flat.shape[eqn.outs[0]]
        groups = _reshape_groups(old, new)
        out = []
        for f in ins[0]:
            touched = [g for g in groups if set(g[0]) & set(f.axes)]
            full = [old[a] if any(a in g[0] for g in touched) else 1 for a in range(len(old))]
            ids = np.broadcast_to(f.ids, full)
            shape, axes = [], []
            for g in groups:
                for b in g[1]:
                    shape.append(new[b] if g in touched else 1)
                    if g in touched and new[b] > 1:
                        axes.append(b)
            if axes:
                out.append(Field(ids.reshape(shape), tuple(axes)))
        return [out]

    def _squeeze(self, eqn, ins):
        dims = set(eqn.params["dimensions"])
        out = []
        for f in ins[0]:
            keep = [a for a in range(f.ids.ndim) if a not in dims]
            axes = tuple(keep.index(a) for a in f.axes if a not in dims)
            if axes:
                out.append(Field(f.ids.reshape([f.ids.shape[a] for a in keep]), axes))
        return [out]

    def _transpose(self, eqn, ins):
        perm = list(eqn.params["permutation"])
        return [[Field(f.ids.transpose(perm), tuple(sorted(perm.index(a) for a in f.axes))) for f in ins[0]]]

    def _rev(self, eqn, ins):
        dims = tuple(eqn.params["dimensions"])
        return [[Field(np.flip(f.ids, dims), f.axes) for f in ins[0]]]

    def _concatenate(self, eqn, ins):
        d = eqn.params["dimension"]
        shapes = [self.flat.shape[k] for k in eqn.ins]
        along = collections.defaultdict(dict)  # axes -> operand -> field
        across = []  # fields over other axes: the operands' channels meet at each position
        for i, fields in enumerate(ins):
            for f in fields:
                if d in f.axes:
                    along[f.axes][i] = f
                else:
                    across.append(f)
        out = self.merge(across)
        for axes, by_operand in along.items():
            parts = []
            for i, s in enumerate(shapes):
                f = by_operand.get(i)
                if f is None:
                    ref = next(iter(by_operand.values())).ids
                    parts.append(np.full([s[a] if a == d else ref.shape[a] for a in range(len(s))], -1))
                else:
                    parts.append(f.ids)
            out.append(Field(np.concatenate(parts, axis=d), axes))
        return [out]

    def _stack(self, eqn, ins):
        axis = eqn.params["axis"]
        ndim = len(self.flat.shape[eqn.outs[0]])
        moved = [_relocate(f, [a + (a >= axis) for a in f.axes], ndim) for fields in ins for f in fields]
        return [self.merge(moved)]

    def _slice(self, eqn, ins):
        start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params["strides"] or (1,) * len(start)
        return [[self._cut(eqn, f, start, limit, strides) for f in ins[0]]]

    def _split(self, eqn, ins):
        axis, outs, offset = eqn.params["axis"], [], 0
        shape = self.flat.shape[eqn.ins[0]]
        for size in eqn.params["sizes"]:
            start = [offset if a == axis else 0 for a in range(len(shape))]
            limit = [offset + size if a == axis else n for a, n in enumerate(shape)]
            outs.append([self._cut(eqn, f, start, limit, (1,) * len(shape)) for f in ins[0]])
            offset += size
        return outs

    def _cut(self, eqn, f: Field, start, limit, strides) -> Field:
        """A slice; slicing one producer's whole output (a split) cuts it into segments. Outside a selection
        (static code), the segments that end at a bound keep their width."""
        index = tuple(slice(start[a], limit[a], strides[a]) if a in f.axes else slice(None) for a in range(f.ids.ndim))
        if len(f.axes) == 1:
            a, ids, n = f.axes[0], f.ids.reshape(-1), self.nodes
            if ids.min() >= 0 and len(set(zip(n.leaf[ids], n.axis[ids]))) == 1 and np.array_equal(n.index[ids], np.arange(len(ids))):
                owner = int(n.leaf[ids[0]]), int(n.axis[ids[0]])
                for boundary in (start[a], limit[a]):
                    if 0 < boundary < len(ids):
                        self.cuts[owner].add(boundary)
                        if not any(c.startswith("select:") for c in eqn.scope):
                            self.protect([Field(ids[:boundary], (0,))], "a channel slice outside layers.select")
        return Field(f.ids[index], f.axes)

    def _pad(self, eqn, ins):
        config = eqn.params["padding_config"]
        out = []
        for f in ins[0]:
            ids = f.ids
            for a in f.axes:
                lo, hi, interior = config[a]
                n = ids.shape[a]
                size = lo + n + max(n - 1, 0) * interior + hi
                source = np.full(size, -1)
                positions = lo + np.arange(n) * (interior + 1)
                inside = (positions >= 0) & (positions < size)
                source[positions[inside]] = np.arange(n)[inside]
                ids = np.take(np.concatenate([ids, np.full_like(ids.take([0], a), -1)], axis=a), source, axis=a)
            out.append(Field(ids, f.axes))
        self.protect(ins[1], "pad (by a labelled value)")
        return [out]

    def _dynamic_slice(self, eqn, ins):
        sizes, shape = eqn.params["slice_sizes"], self.flat.shape[eqn.ins[0]]
        whole = [all(sizes[a] == shape[a] for a in f.axes) for f in ins[0]]
        self.protect([f for f, w in zip(ins[0], whole) if not w] + [f for fs in ins[1:] for f in fs], "dynamic_slice")
        return [[f for f, w in zip(ins[0], whole) if w]]

    def _gather(self, eqn, ins):
        p = eqn.params
        dn, sizes = p["dimension_numbers"], p["slice_sizes"]
        operand, shape = ins[0], self.flat.shape[eqn.ins[0]]
        out_ndim = len(self.flat.shape[eqn.outs[0]])
        self.protect(ins[1], "gather (indices)")
        indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
        offset_axes = [a for a in range(len(shape)) if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims]
        batch_axes = [a for a in range(out_ndim) if a not in dn.offset_dims]
        out = []
        for f in operand:
            if not set(f.axes) & indexed and all(sizes[a] == shape[a] for a in f.axes):
                out.append(_relocate(f, [dn.offset_dims[offset_axes.index(a)] for a in f.axes], out_ndim))
                continue
            index = self.flat.value(eqn.ins[1])
            take = (len(f.axes) == 1 and tuple(dn.start_index_map) == f.axes and tuple(dn.collapsed_slice_dims) == f.axes
                    and not dn.operand_batching_dims and index is not None)
            if not take:
                self.protect([f], "gather (on a channel axis, with indices that are not constants)")
                continue
            index = np.asarray(index)[..., 0].astype(int)
            n = shape[f.axes[0]]
            ids = np.where((index >= 0) & (index < n), f.ids.reshape(-1)[np.clip(index, 0, n - 1)], -1)
            out.append(_relocate(Field(ids, tuple(range(index.ndim))), batch_axes, out_ndim))
        return [out]

    def _top_k(self, eqn, ins):
        last = len(self.flat.shape[eqn.ins[0]]) - 1
        self.protect([f for f in ins[0] if last in f.axes], "top_k")
        return [[f for f in ins[0] if last not in f.axes], []]

    def _sort(self, eqn, ins):
        d = eqn.params["dimension"]
        self.protect([f for fs in ins for f in fs if d in f.axes], "sort")
        return [[f for f in fs if d not in f.axes] for fs in ins]

    def _optimization_barrier(self, eqn, ins):
        return ins


def trace(module, variables: dict, *example_inputs) -> Graph:
    """The channel groups and removable units of ``module.apply(variables, *example_inputs)``.

    ``variables`` and the inputs may be arrays or ``jax.ShapeDtypeStruct``s: the trace is abstract.
    """
    flat_vars, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaves, paths = [], []
    for path, leaf in flat_vars:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        leaves.append((keys[0], ".".join(keys[1:-1]), keys[-1], tuple(np.shape(leaf))))
        paths.append(keys[1:-1])
    abstract = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", jnp.float32)) for _, x in flat_vars]
    inputs = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", jnp.float32)) for x in example_inputs]
    modules = []  # the path of every module call, in order: the name scope "xprune-module:{index}" marks its equations

    def scoped(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        modules.append(tuple(context.module.path))
        with jax.named_scope(f"xprune-module:{len(modules) - 1}"):
            return next_fun(*args, **kwargs)

    def apply(flat_variables, *xs):
        with nn.intercept_methods(scoped):
            return module.apply(jax.tree_util.tree_unflatten(treedef, flat_variables), *xs)

    with one_primitive_per_conv(), nn.override_named_call(False):
        closed = jax.make_jaxpr(apply)(abstract, *inputs)
    flat = _Flat()
    keys = [flat.new(v.aval) for v in closed.jaxpr.invars]
    outputs = flat.inline(closed.jaxpr, closed.consts, keys)
    nodes = _Nodes(leaves)
    tracer = _Tracer(nodes, flat)
    for i, key in enumerate(keys[:len(leaves)]):
        if leaves[i][3]:
            tracer.fields[key] = nodes.fields(i)
            tracer.variables.add(key)
    tracer.run()
    for key in outputs:
        tracer.protect(tracer.fields.get(key, []), OUTPUT)
    groups, untraceable, heads, channels = _groups(tracer)
    context = _Context(flat, tracer, dict(zip(keys[:len(leaves)], range(len(leaves)))), paths, modules, set(outputs))
    return Graph(groups, untraceable, _units(context), heads, _selections(context), channels)


class _Context(typing.NamedTuple):
    flat: _Flat
    tracer: _Tracer
    variable_keys: dict[int, int]  # value key -> variable leaf
    paths: list[tuple[str, ...]]  # variable leaf -> its module's path
    modules: list[tuple[str, ...]]  # module call -> its path
    outputs: set[int]

    def uses(self) -> dict[int, list[int]]:
        uses = collections.defaultdict(list)
        for i, eqn in enumerate(self.flat.eqns):
            for k in eqn.ins:
                uses[k].append(i)
        return uses

    def calls(self, eqn) -> list[int]:
        """The module calls an equation runs in, outermost first."""
        return [int(c.split(":")[1]) for c in eqn.scope if c.startswith("xprune-module:")]


def _groups(t: _Tracer):
    """Channels (components holding a producer's output channel) grouped by their producers' segments."""
    nodes, leaves = t.nodes, t.nodes.leaves
    with_kernel = {layer for _, layer, name, _ in leaves if name == "kernel"}
    reference = {}  # a norm layer's first vector: its slot is read from that one (scale, mean, var: the same positions)
    for leaf, (_, layer, _, shape) in enumerate(leaves):
        if len(shape) == 1 and layer not in with_kernel:
            reference.setdefault(layer, leaf)
    kinds = {owner: {"producer": "producers", "consumer": "consumers", "depthwise": "depthwise", "vector": "norms"}[role]
             for owner, role in t.role.items()
             if role != "vector" or reference.get(leaves[owner[0]][1]) == owner[0]}  # not a bias, not a norm's other vector
    members = collections.defaultdict(list)  # root -> [(leaf, axis, index)]
    for (leaf, axis), role in t.role.items():
        start, n = nodes.start[leaf, axis], leaves[leaf][3][axis]
        for index, root in enumerate(nodes.roots(np.arange(start, start + n)).tolist()):
            members[root].append((leaf, axis, index))
    reasons = {}
    for node, reason in t.protected.items():
        reasons.setdefault(nodes.find(node), reason)

    def segment(leaf, axis, index):
        return sum(c <= index for c in t.cuts.get((leaf, axis), ()))

    keyed = collections.defaultdict(list)  # the producers' segments -> the channels (roots) they make
    for root, entries in members.items():
        producers = {(leaf, axis, segment(leaf, axis, index)) for leaf, axis, index in entries
                     if t.role[leaf, axis] == "producer"}
        if producers:
            keyed[tuple(sorted(producers, key=lambda p: (t.order[p[0]], p[2])))].append(root)
    split = collections.Counter((leaf, axis) for producers in keyed for leaf, axis, _ in producers)
    groups, untraceable, heads, channels = [], {}, [], {}
    for producers, roots in sorted(keyed.items(), key=lambda kv: [(t.order[p[0]], p[2]) for p in kv[0]]):
        first, axis, seg = producers[0]
        name = leaves[first][1] + (f"[{seg}]" if split[first, axis] > 1 else "")
        roots.sort(key=lambda r: next(i for leaf, a, i in members[r] if (leaf, a) == (first, axis)))
        positions = collections.defaultdict(lambda: collections.defaultdict(list))  # (kind, layer) -> channel -> [index]
        for c, root in enumerate(roots):
            for leaf, axis_, index in members[root]:
                kind = kinds.get((leaf, axis_))
                if kind is not None:
                    positions[kind, leaves[leaf][1]][c].append(index)
        slots = {"producers": [], "norms": [], "depthwise": [], "consumers": []}
        reason = next((reasons[r] for r in roots if r in reasons), None)
        for (kind, layer), where in positions.items():
            made = _slots(layer, where, len(roots))
            if made is None:
                reason = reason or f"an irregular layout of its channels in {layer}"
            else:
                slots[kind] += made
        if reason is not None:
            untraceable[name] = reason
            heads += [s.layer for s in slots["producers"] if s.layer not in heads]
        else:
            groups.append(ChannelGroup(name, len(roots), *(tuple(slots[k]) for k in ("producers", "norms", "depthwise", "consumers"))))
            channels[name] = np.array(roots)
    return groups, untraceable, heads, channels


def _slots(layer: str, positions: dict, width: int) -> list[Slot] | None:
    """A layer's slots for a group of ``width`` channels found at ``positions[c]``, or None if irregular."""
    counts = {len(positions.get(c, ())) for c in range(width)}
    if counts <= {0, 1}:
        index = [positions[c][0] if positions.get(c) else -1 for c in range(width)]
        if counts == {1} and index == list(range(index[0], index[0] + width)):
            return [Slot(layer, index[0])]
        return [Slot(layer, index=tuple(index))]
    if len(counts) != 1:
        return None
    k = counts.pop()
    rows = np.array([sorted(positions[c]) for c in range(width)])
    if np.array_equal(rows, rows[0, 0] + np.arange(width)[:, None] * k + np.arange(k)):
        return [Slot(layer, int(rows[0, 0]), k)]  # a flattened (C, H, W) input: k positions a channel
    slots = []
    for column in rows.T.tolist():  # read at several offsets (concat slots of the same channels)
        if column != list(range(column[0], column[0] + width)):
            return None
        slots.append(Slot(layer, column[0]))
    return slots


def _units(c: _Context) -> list[Unit]:
    """Modules whose computation is a branch that joins a residual add with its input, or only a
    concatenation along the channels."""
    flat, uses = c.flat, c.uses()
    static = {k: frozenset() for k in flat.const}  # values that don't depend on the inputs -> variables they read
    static.update((k, frozenset([leaf])) for k, leaf in c.variable_keys.items())
    for eqn in flat.eqns:
        if all(k in static for k in eqn.ins):
            static.update((k, frozenset().union(*(static[i] for i in eqn.ins))) for k in eqn.outs)
    by_module = collections.defaultdict(set)  # module path (and its prefixes) -> its variables
    for leaf, path in enumerate(c.paths):
        for n in range(1, len(path) + 1):
            by_module[path[:n]].add(leaf)
    units = {}
    for i, eqn in enumerate(flat.eqns):
        if eqn.primitive.name in ("add", "add_any") and len(eqn.ins) == 2:
            candidates = [(b, a) for b, a in (eqn.ins, eqn.ins[::-1])]
        elif eqn.primitive.name == "concatenate":  # along the channels: the operand is a slot
            d = eqn.params["dimension"]
            candidates = [(b, None) for b in eqn.ins if uses[b] == [i] and any(d in f.axes for f in c.tracer.fields.get(b, ()))]
        else:
            continue
        for end, start in candidates:
            for entry, inside, leaves in _branches(flat, uses, static, end, i):
                if start not in (None, entry):
                    continue
                chains = [c.calls(flat.eqns[e]) for e in inside]
                common = [m for depth, m in enumerate(chains[0]) if all(len(ch) > depth and ch[depth] == m for ch in chains)]
                module = next((m for m in reversed(common) if by_module[c.modules[m]] == leaves), None)
                if module is None:
                    continue
                name = ".".join(c.modules[module])
                if start is not None:
                    removal = "identity" if module in c.calls(eqn) else "zero"
                else:
                    removal = "drop" if entry in eqn.ins else "identity"
                units.setdefault(name, Unit(name, removal))
                break
    return list(units.values())


def _branches(flat: _Flat, uses, static: dict, end: int, join: int):
    """The branches ending at ``end`` (used by equation ``join`` only), largest first: those that read
    one value that depends on the inputs, of the shape of ``end``, and whose values are used only
    inside them. Yields ``(that value, the branch's equations, the variables it reads)``."""
    inside, frontier, found, layers = set(), {end}, [], 0
    while frontier and len(inside) < 5000:
        key = max(frontier, key=lambda k: flat.producer.get(k, -1))  # expanded latest first: inside stays closed
        if key not in flat.producer:
            break
        frontier.discard(key)
        index = flat.producer[key]
        inside.add(index)
        eqn = flat.eqns[index]
        if any(u not in inside and (out != end or u != join) for out in eqn.outs for u in uses[out]):
            break  # a value used outside: every larger branch has it too
        frontier.update(k for k in eqn.ins if k not in static and flat.producer.get(k) not in inside)
        layers += eqn.primitive.name in ("conv_general_dilated", "dot_general")
        if len(frontier) == 1 and flat.shape[next(iter(frontier))] == flat.shape[end] and layers:
            leaves = frozenset().union(*(static[k] for e in inside for k in flat.eqns[e].ins if k in static))
            found.append((next(iter(frontier)), frozenset(inside), leaves))
    return reversed(found)


def _selections(c: _Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each channel selection (:func:`~xprune_jax.models.layers.select`): its input's channels (component
    roots; -1 where a position holds none) and, for each output position, the input position it takes."""
    eqns = collections.defaultdict(list)  # (module call, name) -> its equations
    for i, eqn in enumerate(c.flat.eqns):
        for j, scope in enumerate(eqn.scope):
            if scope.startswith("select:"):
                calls = c.calls(eqn._replace(scope=eqn.scope[:j]))
                eqns[calls[-1] if calls else None, scope[len("select:"):]].append(i)
    uses, out = c.uses(), {}
    for (call, name), members in eqns.items():
        made = {k for i in members for k in c.flat.eqns[i].outs}
        ins = {k for i in members for k in c.flat.eqns[i].ins if k not in made and k in c.tracer.fields}
        outs = [k for k in made if k in c.outputs or any(u not in members for u in uses[k])]
        if len(ins) != 1 or len(outs) != 1:
            continue
        fields = [next((f.ids.reshape(-1) for f in c.tracer.fields.get(k, ()) if f.axes == (len(c.flat.shape[k]) - 1,)), None)
                  for k in (*ins, *outs)]
        if fields[0] is None or fields[1] is None or len(set(fields[0].tolist())) < len(fields[0]):
            continue
        position = {node: i for i, node in enumerate(fields[0].tolist())}
        path = c.modules[call] if call is not None else ()
        out[".".join((*path, name))] = (_roots(c.tracer.nodes, fields[0]), np.array([position[n] for n in fields[1].tolist()]))
    return out


def _roots(nodes: _Nodes, ids: np.ndarray) -> np.ndarray:
    return np.array([nodes.find(int(x)) if x >= 0 else -1 for x in ids], int)

"""Channel groups and removable units traced from the jaxpr of ``module.apply``: DepGraph over a jaxpr.

Every index of every variable axis is a node. One walk over the jaxpr (calls inlined) gives each value
*fields*: node ids over some of its axes (-1: no channel). A conv or linear layer's output takes its kernel's
output nodes and its input joins the kernel's input nodes; elementwise ops (norms, biases, activations,
residual adds, gates) and concatenations along other axes join the ids they meet; concatenate, slice, pad,
gather, reshape and transpose move them. Joined nodes are one channel. The outputs, and whatever the walk
does not follow (a reduction over channels, top_k, a loop, any other primitive), make the channels they read
*untraceable*. Channels made by the same producers (segments) form a :class:`ChannelGroup`; removable units
are modules whose computation is a branch joining a residual add with its input, or a channel concat.
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

from xprune_jax.models.layers import one_primitive_per_conv

ELEMENTWISE = frozenset("""abs add add_any and atan2 ceil clamp convert_element_type copy copy_p cos div eq erf erf_inv exp
    exp2 expm1 floor ge gt integer_pow is_finite le log log1p logistic lt max min mul ne neg not or pow reduce_precision
    rem round rsqrt select_n sign sin sqrt square stop_gradient sub tan tanh xor""".split())
REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split())
VIEWS = frozenset("convert_element_type copy copy_p reshape broadcast_in_dim transpose squeeze".split())  # of a variable


class Slot(typing.NamedTuple):
    """Where a group's channels sit in a layer's output (producers, norms, depthwise) or input (consumers):
    channel c at ``offset + c``, at ``offset + c * span ...`` for a flattened ``(C, H, W)`` input (fc6), or
    at ``index[c]`` (-1: absent) where a shuffle scatters them."""

    layer: str
    offset: int = 0
    span: int = 1
    index: tuple[int, ...] | None = None

    def positions(self, channels) -> np.ndarray:
        channels = np.asarray(channels, int)
        if self.index is not None:
            found = np.asarray(self.index, int)[channels]
            return found[found >= 0]
        return (self.offset + channels[:, None] * self.span + np.arange(self.span)).ravel()


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that shrink together, named by their first producer (``[k]``: its k-th segment), coupled."""

    name: str
    width: int
    producers: tuple[Slot, ...]  # output channels (kernel axis -1, and the bias)
    norms: tuple[Slot, ...] = ()  # norm layers on the channels (all their vectors)
    depthwise: tuple[Slot, ...] = ()  # depthwise convs on the channels
    consumers: tuple[Slot, ...] = ()  # input channels (kernel axis -2)


class Unit(typing.NamedTuple):
    """A removable module and how it goes: ``"identity"`` (a residual add inside it, or concatenated alone),
    ``"zero"`` (added outside it), ``"drop"`` (concatenated next to its own input: its slot goes)."""

    name: str
    removal: str


@dataclasses.dataclass
class Graph:
    """What the tracer found; heads make untraceable channels; selections and channels are component roots."""

    groups: list[ChannelGroup]
    untraceable: dict[str, str]
    units: list[Unit]
    heads: list[str]
    selections: dict[str, tuple[np.ndarray, np.ndarray]]
    channels: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]  # each conv or linear layer's output shape (without the batch), in execution order


Field = collections.namedtuple("Field", "ids axes")  # ids: the value's rank, full size on the axes, 1 elsewhere


def _move(f: Field, new_axes, ndim: int) -> Field:
    ids = f.ids.reshape([f.ids.shape[a] for a in f.axes]).transpose(np.argsort(new_axes))
    shape = [1] * ndim
    for a, n in zip(sorted(new_axes), ids.shape):
        shape[a] = n
    return Field(ids.reshape(shape), tuple(sorted(new_axes)))


# an equation over value keys; scope: the module calls ("module:{i}") and selections ("select:{name}") it runs in
_Eqn = collections.namedtuple("_Eqn", "primitive params ins outs scope")


def _reshape_groups(old, new) -> list[tuple[list[int], list[int]]]:
    """Contiguous axis groups ``(old axes, new axes)`` of equal size that a row-major reshape maps onto each other."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        a, b = [i], [j]
        size_a, size_b = (old[i] if i < len(old) else 1), (new[j] if j < len(new) else 1)
        i, j = i + 1, j + 1
        while size_a != size_b:
            if size_a < size_b:
                size_a, i = size_a * old[i], i + 1
                a.append(i - 1)
            else:
                size_b, j = size_b * new[j], j + 1
                b.append(j - 1)
        groups.append(([x for x in a if x < len(old)], [x for x in b if x < len(new)]))
    return groups


class _Trace:
    """The jaxpr (calls inlined) over integer value keys, the walk giving values fields, the union-find of nodes."""

    def __init__(self, leaves):
        self.eqns, self.shape, self.const, self.producer, self.uses = [], [], {}, {}, collections.defaultdict(list)
        self.leaves = leaves  # (collection, layer, name, shape): a node per index of each of their axes
        axes = [(i, a, n) for i, (*_, shape) in enumerate(leaves) for a, n in enumerate(shape)]
        starts = np.cumsum([0, *(n for *_, n in axes)]).tolist()
        self.start, self.parent = {(i, a): s for (i, a, _), s in zip(axes, starts)}, list(range(starts[-1]))
        self.leaf, self.axis = (np.repeat([x[k] for x in axes], [n for *_, n in axes]).astype(int) for k in (0, 1))
        self.index = np.concatenate([np.arange(n) for *_, n in axes] + [np.zeros(0, int)])
        self.fields, self.variables = {}, set()  # value key -> its fields; the keys of variables (or a view of one)
        self.role: dict[tuple[int, int], str] = {}  # (leaf, axis) -> producer | consumer | depthwise | vector
        self.order: dict[int, tuple] = {}  # kernel leaf -> its layer's output shape (without the batch), in execution order
        self.protected: dict[int, str] = {}  # node -> what made it untraceable
        self.cuts = collections.defaultdict(set)  # (leaf, axis) -> indices where a selection starts a segment

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        pairs = (a >= 0) & (b >= 0) & (a != b)
        for x, y in zip(a[pairs].tolist(), b[pairs].tolist()):
            rx, ry = self.find(x), self.find(y)
            self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(x) if x >= 0 else -1 for x in ids.ravel().tolist()], int)

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
                self.const[self.new(atom.aval)] = np.asarray(atom.val)
                return len(self.shape) - 1
            return env[atom]

        for eqn in jaxpr.eqns:
            ins_ = [read(a) for a in eqn.invars]
            here = scope + tuple(c for c in str(eqn.source_info.name_stack).split("/") if c.startswith(("module:", "select:")))
            sub = next((eqn.params[p] for p in ("jaxpr", "call_jaxpr") if p in eqn.params), None)
            if isinstance(sub, core.Jaxpr):
                sub = core.ClosedJaxpr(sub, ())
            if isinstance(sub, core.ClosedJaxpr) and len(sub.jaxpr.invars) == len(ins_):
                outs = self.inline(sub.jaxpr, sub.consts, ins_, here)
            else:
                outs = [self.new(v.aval) for v in eqn.outvars]
                self.eqns.append(_Eqn(eqn.primitive, eqn.params, ins_, outs, here))
                self.producer.update((k, len(self.eqns) - 1) for k in outs)
                for k in ins_:
                    self.uses[k].append(len(self.eqns) - 1)
            env.update(zip(eqn.outvars, outs))
        return [read(a) for a in jaxpr.outvars]

    def value(self, key: int):
        """The value of ``key`` if it is a constant, or a reshape of one (``jnp.take``'s indices), else None."""
        eqn = self.eqns[self.producer[key]] if key in self.producer else None
        if eqn is not None and eqn.primitive.name in ("reshape", "broadcast_in_dim", "convert_element_type"):
            source = self.value(eqn.ins[0])
            return None if source is None or source.size != math.prod(self.shape[key]) else source.reshape(self.shape[key])
        return self.const.get(key)

    def protect(self, fields, reason: str) -> None:
        for f in fields:
            for node in np.unique(f.ids[f.ids >= 0]).tolist():
                self.protected.setdefault(node, reason)

    def owner(self, key: int, f: Field) -> tuple[int, int] | None:
        """``(variable leaf, axis)`` if value ``key`` is a variable (or a view of one) and ``f`` one of its axes."""
        ids = f.ids[f.ids >= 0]
        return (int(self.leaf[ids[0]]), int(self.axis[ids[0]])) if key in self.variables and len(ids) else None

    def merge(self, fields: list[Field]) -> list[Field]:
        """Fields over the same axes meet at every position: their ids join, one field stays."""
        by_axes = {}
        for f in fields:
            if f.axes in by_axes:
                self.union(by_axes[f.axes].ids, f.ids)
                f = Field(np.where(by_axes[f.axes].ids >= 0, by_axes[f.axes].ids, f.ids), f.axes)
            by_axes[f.axes] = f
        return list(by_axes.values())

    def run(self) -> None:
        for eqn in self.eqns:
            ins = [self.fields.get(k, []) for k in eqn.ins]
            if not any(ins):
                continue
            name = eqn.primitive.name
            if name in VIEWS and eqn.ins[0] in self.variables:
                self.variables.update(eqn.outs)
            if name in ELEMENTWISE:
                outs = self._elementwise(eqn, ins)
            elif name in REDUCTIONS or name.startswith("reduce_window"):
                outs = self._reduce(eqn, ins)
            elif hasattr(self, "_" + name):
                outs = getattr(self, "_" + name)(eqn, ins)
            else:  # not followed: the channels stop here
                self.protect([f for fs in ins for f in fs], name)
                outs = []
            self.fields.update((k, fs) for k, fs in zip(eqn.outs, outs) if fs)

    def _elementwise(self, eqn, ins):
        for owner in {self.owner(k, f) for k, fields in zip(eqn.ins, ins) for f in fields} - {None}:
            self.role.setdefault(owner, "vector")  # a variable that meets channels: a norm's vector, or a bias
        return [self.merge([f for fields in ins for f in fields])] * len(eqn.outs)

    def _reduce(self, eqn, ins):
        """Reductions and pooling: over other axes the channels follow, over theirs they stop."""
        p, fields = eqn.params, [f for fs in (ins[:len(ins) // 2] if eqn.primitive.name == "reduce_window" else ins) for f in fs]
        over = set(p["axes"]) if "axes" in p else {a for a, w in enumerate(p["window_dimensions"]) if (
            w, p["window_strides"][a], tuple(p["padding"][a]), p["base_dilation"][a], p["window_dilation"][a]) != (1, 1, (0, 0), 1, 1)}
        self.protect([f for f in fields if over & set(f.axes)], eqn.primitive.name)
        kept = [f for f in fields if not over & set(f.axes)]
        if "axes" in p:  # the reduced axes go (the fields have size 1 there)
            kept = [Field(f.ids.reshape([n for a, n in enumerate(f.ids.shape) if a not in over]),
                          tuple(a - sum(o < a for o in over) for a in f.axes)) for f in kept]
        return [self.merge(kept)] * len(eqn.outs)

    def _conv_general_dilated(self, eqn, ins):
        (lhs, rhs, out), groups = eqn.params["dimension_numbers"], eqn.params["feature_group_count"]
        (x, kernel), shape, width = ins, self.shape[eqn.ins[1]], self.shape[eqn.ins[0]][lhs[1]]
        k_out, k_in = (next((f for f in kernel if f.axes == (a,)), None) for a in rhs[:2])
        owner = self.owner(eqn.ins[1], k_out) if k_out is not None else None
        if owner is None or eqn.params["batch_group_count"] != 1 or any(f.axes != (lhs[1],) for f in x):
            self.protect(x + kernel, "conv_general_dilated (by a kernel that is not a variable, or over channels in space)")
            return [[]]
        self.order.setdefault(owner[0], self.shape[eqn.outs[0]][1:])
        made = k_out
        if groups == 1:
            self.role[owner[0], rhs[0]], self.role[owner[0], rhs[1]] = "producer", "consumer"
            for f in x:
                self.union(f.ids.ravel(), k_in.ids.ravel())
        elif groups == width == shape[rhs[0]] and shape[rhs[1]] == 1:  # depthwise: the input's channels go on
            self.role[owner[0], rhs[0]] = "depthwise"
            for f in x:
                self.union(f.ids.ravel(), k_out.ids.ravel())
            made = x[0] if x else k_out
        else:
            self.protect(x + [k_out], f"conv_general_dilated (feature_group_count={groups})")
        return [[_move(Field(made.ids.reshape(-1), (0,)), (out[1],), len(self.shape[eqn.outs[0]]))]]

    def _dot_general(self, eqn, ins):
        ((lc, rc), (lb, rb)) = eqn.params["dimension_numbers"]
        shapes, ndim = [self.shape[k] for k in eqn.ins], len(self.shape[eqn.outs[0]])
        free = [[a for a in range(len(s)) if a not in c + b] for s, c, b in zip(shapes, (lc, rc), (lb, rb))]
        out_axis = [{**{b: i for i, b in enumerate(batch)}, **{a: len(lb) + offset + i for i, a in enumerate(axes)}}
                    for batch, axes, offset in ((lb, free[0], 0), (rb, free[1], len(free[0])))]
        outs = []
        for side, (fields, contracting, others, partners) in enumerate(((ins[0], lc, ins[1], rc), (ins[1], rc, ins[0], lc))):
            key = eqn.ins[side]
            kernel = any(self.owner(key, f) and set(f.axes) & set(contracting) for f in fields)
            for f in fields:
                owner = self.owner(key, f)
                if not set(f.axes) & set(contracting):
                    if owner and kernel:  # a kernel's output axis
                        self.role.setdefault(owner, "producer")
                    outs.append(_move(f, [out_axis[side][a] for a in f.axes], ndim))
                elif len(f.axes) != 1:
                    self.protect([f], "dot_general (contracting channels spread over several axes)")
                else:
                    if owner:
                        self.role[owner] = "consumer"
                        self.order.setdefault(owner[0], self.shape[eqn.outs[0]][1:])
                    partner = partners[list(contracting).index(f.axes[0])]
                    for g in others if side == 0 else ():  # the channels contracted together meet
                        if g.axes == (partner,):
                            self.union(f.ids.ravel(), g.ids.ravel())
        return [self.merge(outs)]

    def _broadcast_in_dim(self, eqn, ins):
        shape, dims, old = eqn.params["shape"], eqn.params["broadcast_dimensions"], self.shape[eqn.ins[0]]
        return [[_move(f, [dims[a] for a in f.axes], len(shape)) for f in ins[0]  # one channel spread over an axis: none
                 if not any(old[a] == 1 and shape[dims[a]] != 1 for a in f.axes)]]

    def _reshape(self, eqn, ins):
        old, new = self.shape[eqn.ins[0]], self.shape[eqn.outs[0]]
        groups, out = _reshape_groups(old, new), []
        for f in ins[0]:
            touched = [set(g[0]) & set(f.axes) != set() for g in groups]
            ids = np.broadcast_to(f.ids, [n if any(t and a in g[0] for t, g in zip(touched, groups)) else 1 for a, n in enumerate(old)])
            shape = [new[b] if t else 1 for t, g in zip(touched, groups) for b in g[1]]
            axes = tuple(b for t, g in zip(touched, groups) for b in g[1] if t and new[b] > 1)
            if axes:
                out.append(Field(ids.reshape(shape), axes))
        return [out]

    _squeeze = _reshape

    def _transpose(self, eqn, ins):
        perm = list(eqn.params["permutation"])
        return [[Field(f.ids.transpose(perm), tuple(sorted(perm.index(a) for a in f.axes))) for f in ins[0]]]

    def _concatenate(self, eqn, ins):
        d, shapes = eqn.params["dimension"], [self.shape[k] for k in eqn.ins]
        out = self.merge([f for fields in ins for f in fields if d not in f.axes])  # along other axes: channels meet
        along = collections.defaultdict(dict)  # axes -> operand -> its field along the concatenated axis
        for i, f in ((i, f) for i, fields in enumerate(ins) for f in fields if d in f.axes):
            along[f.axes][i] = f
        for axes, by_operand in along.items():
            ref = next(iter(by_operand.values())).ids
            parts = [by_operand[i].ids if i in by_operand else np.full([s[d] if a == d else ref.shape[a] for a in range(len(s))], -1)
                     for i, s in enumerate(shapes)]
            out.append(Field(np.concatenate(parts, axis=d), axes))
        return [out]

    def _slice(self, eqn, ins):
        start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
        return [[self._cut(eqn, f, start, limit, eqn.params["strides"] or (1,) * len(start)) for f in ins[0]]]

    def _split(self, eqn, ins):
        axis, shape, bounds = eqn.params["axis"], self.shape[eqn.ins[0]], np.cumsum([0, *eqn.params["sizes"]]).tolist()
        return [[self._cut(eqn, f, [lo if a == axis else 0 for a in range(len(shape))],
                           [hi if a == axis else n for a, n in enumerate(shape)], (1,) * len(shape)) for f in ins[0]]
                for lo, hi in zip(bounds, bounds[1:])]

    def _cut(self, eqn, f: Field, start, limit, strides) -> Field:
        """A slice. Slicing one producer's whole output cuts it into segments; outside a selection (static
        code), the channels before each bound keep their width."""
        if len(f.axes) == 1:
            a, ids = f.axes[0], f.ids.reshape(-1)
            if ids.min() >= 0 and len(set(zip(self.leaf[ids], self.axis[ids]))) == 1 and np.array_equal(self.index[ids], np.arange(len(ids))):
                for bound in (start[a], limit[a]):
                    if 0 < bound < len(ids):
                        self.cuts[int(self.leaf[ids[0]]), int(self.axis[ids[0]])].add(bound)
                        if not any(c.startswith("select:") for c in eqn.scope):
                            self.protect([Field(ids[:bound], (0,))], "a channel slice outside layers.select")
        return Field(f.ids[tuple(slice(start[a], limit[a], strides[a]) if a in f.axes else slice(None) for a in range(f.ids.ndim))], f.axes)

    def _pad(self, eqn, ins):
        out = []
        for f in ins[0]:
            ids = f.ids
            for a in f.axes:  # each output position's source (n: the -1 appended)
                (lo, hi, interior), n = eqn.params["padding_config"][a], ids.shape[a]
                source, positions = np.full(lo + n + max(n - 1, 0) * interior + hi, n), lo + np.arange(n) * (interior + 1)
                inside = (positions >= 0) & (positions < len(source))
                source[positions[inside]] = np.arange(n)[inside]
                ids = np.take(np.concatenate([ids, np.full_like(ids.take([0], a), -1)], axis=a), source, axis=a)
            out.append(Field(ids, f.axes))
        self.protect(ins[1], "pad (by a channel's value)")
        return [out]

    def _gather(self, eqn, ins):
        dn, sizes, shape = eqn.params["dimension_numbers"], eqn.params["slice_sizes"], self.shape[eqn.ins[0]]
        ndim = len(self.shape[eqn.outs[0]])
        indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
        offsets = [a for a in range(len(shape)) if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims]
        self.protect(ins[1], "gather (by channel-valued indices)")
        out = []
        for f in ins[0]:
            if not set(f.axes) & indexed and all(sizes[a] == shape[a] for a in f.axes):  # along other axes
                out.append(_move(f, [dn.offset_dims[offsets.index(a)] for a in f.axes], ndim))
                continue
            index = self.value(eqn.ins[1])
            if index is None or not (len(f.axes) == 1 and tuple(dn.start_index_map) == tuple(dn.collapsed_slice_dims) == f.axes):
                self.protect([f], "gather (on the channels, by computed indices)")
                continue
            index, n = np.asarray(index)[..., 0].astype(int), shape[f.axes[0]]  # jnp.take by constants: follow
            ids = np.where((index >= 0) & (index < n), f.ids.reshape(-1)[np.clip(index, 0, n - 1)], -1)
            out.append(_move(Field(ids, tuple(range(index.ndim))), [a for a in range(ndim) if a not in dn.offset_dims], ndim))
        return [out]


def trace(module, variables: dict, *example_inputs, **apply_kwargs) -> Graph:
    """The channel groups and removable units of ``module.apply(variables, *example_inputs, **apply_kwargs)``, for
    any Flax module; ``variables`` and the inputs may be ``jax.ShapeDtypeStruct``s (the trace is abstract)."""
    flat_vars, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaves = [(str(p[0].key), tuple(str(k.key) for k in p[1:-1]), str(p[-1].key), tuple(np.shape(x))) for p, x in flat_vars]
    abstract = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", jnp.float32)) for x in (*[x for _, x in flat_vars], *example_inputs)]
    modules = []  # each module call's path; "module:{i}" scopes its equations

    def scoped(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        modules.append(tuple(context.module.path))
        with jax.named_scope(f"module:{len(modules) - 1}"):
            return next_fun(*args, **kwargs)

    def apply(flat_variables, *xs):
        with nn.intercept_methods(scoped):
            return module.apply(jax.tree_util.tree_unflatten(treedef, flat_variables), *xs, **apply_kwargs)

    with one_primitive_per_conv(), nn.override_named_call(False):
        closed = jax.make_jaxpr(apply)(abstract[:len(leaves)], *abstract[len(leaves):])
    t = _Trace([(c, ".".join(m), n, s) for c, m, n, s in leaves])
    keys = [t.new(v.aval) for v in closed.jaxpr.invars]
    outputs = t.inline(closed.jaxpr, closed.consts, keys)
    for i, (key, (*_, shape)) in enumerate(zip(keys, leaves)):  # a variable's fields: its own axes
        t.fields[key] = [Field(np.arange(t.start[i, a], t.start[i, a] + n).reshape([n if b == a else 1 for b in range(len(shape))]), (a,))
                         for a, n in enumerate(shape)]
        t.variables.add(key)
    t.run()
    t.protect([f for key in outputs for f in t.fields.get(key, [])], "the model's outputs")
    groups, untraceable, heads, channels = _groups(t)
    units = _units(t, dict(zip(keys, range(len(leaves)))), [m for _, m, _, _ in leaves], modules)
    shapes = {t.leaves[leaf][1]: shape for leaf, shape in t.order.items()}
    return Graph(groups, untraceable, units, heads, _selections(t, modules, set(outputs)), channels, shapes)


def _groups(t: _Trace):
    """Channels (components holding a producer's output channel) grouped by their producers' segments."""
    leaves = t.leaves
    with_kernel = {layer for _, layer, name, _ in leaves if name == "kernel"}
    norm_vector = {layer: leaf for leaf, (_, layer, _, shape) in reversed(list(enumerate(leaves)))  # a norm's first vector:
                   if len(shape) == 1 and layer not in with_kernel}  # its slot (scale, mean, var: the same positions)
    kinds = {owner: {"producer": "producers", "consumer": "consumers", "depthwise": "depthwise", "vector": "norms"}[role]
             for owner, role in t.role.items() if role != "vector" or norm_vector.get(leaves[owner[0]][1]) == owner[0]}
    members = collections.defaultdict(list)  # root -> [(leaf, axis, index)]
    for (leaf, axis) in kinds:
        start = t.start[leaf, axis]
        for index, root in enumerate(t.roots(np.arange(start, start + leaves[leaf][3][axis])).tolist()):
            members[root].append((leaf, axis, index))
    reasons = {t.find(node): reason for node, reason in reversed(list(t.protected.items()))}
    order = {leaf: i for i, leaf in enumerate(t.order)}
    keyed = collections.defaultdict(list)  # the producers' segments -> the channels they make
    for root, entries in members.items():
        producers = {(leaf, axis, sum(c <= i for c in t.cuts.get((leaf, axis), ()))) for leaf, axis, i in entries
                     if t.role[leaf, axis] == "producer"}
        if producers:
            keyed[tuple(sorted(producers, key=lambda p: (order[p[0]], p[2])))].append(root)
    split = collections.Counter((leaf, axis) for producers in keyed for leaf, axis, _ in producers)
    groups, untraceable, heads, channels = [], {}, [], {}
    for producers, roots in sorted(keyed.items(), key=lambda kv: [(order[p[0]], p[2]) for p in kv[0]]):
        first, axis, segment = producers[0]
        name = leaves[first][1] + (f"[{segment}]" if split[first, axis] > 1 else "")
        roots.sort(key=lambda r: next(i for leaf, a, i in members[r] if (leaf, a) == (first, axis)))
        where = collections.defaultdict(lambda: collections.defaultdict(list))  # (kind, layer) -> channel -> positions
        for c, root in enumerate(roots):
            for leaf, axis_, index in members[root]:
                where[kinds[leaf, axis_], leaves[leaf][1]][c].append(index)
        slots = {"producers": [], "norms": [], "depthwise": [], "consumers": []}
        reason = next((reasons[r] for r in roots if r in reasons), None)
        for (kind, layer), positions in where.items():
            made = _slots(layer, positions, len(roots))
            reason = reason or (None if made else f"an irregular layout of its channels in {layer}")
            slots[kind] += made or []
        if reason is not None:
            untraceable[name] = reason
            heads += [leaves[leaf][1] for leaf, _, _ in producers if leaves[leaf][1] not in heads]
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
    rows, k = np.array([sorted(positions[c]) for c in range(width)]), counts.pop()
    if np.array_equal(rows, rows[0, 0] + np.arange(width)[:, None] * k + np.arange(k)):
        return [Slot(layer, int(rows[0, 0]), k)]  # a flattened (C, H, W) input: k positions a channel
    columns = rows.T.tolist()  # read at several offsets (concatenated more than once)
    return [Slot(layer, c[0]) for c in columns] if all(c == list(range(c[0], c[0] + width)) for c in columns) else None


def _calls(eqn: _Eqn) -> list[int]:
    """The module calls an equation runs in, outermost first."""
    return [int(c[len("module:"):]) for c in eqn.scope if c.startswith("module:")]


def _units(t: _Trace, variable_keys: dict, paths: list, modules: list) -> list[Unit]:
    """Modules whose computation is a branch that joins a residual add with its input, or only a channel concatenation."""
    static = {k: frozenset() for k in t.const}  # values that don't depend on the inputs -> the variables they read
    static.update((k, frozenset([leaf])) for k, leaf in variable_keys.items())
    for eqn in t.eqns:
        if all(k in static for k in eqn.ins):
            static.update((k, frozenset().union(*(static[i] for i in eqn.ins))) for k in eqn.outs)
    by_module = collections.defaultdict(set)  # module path (and its prefixes) -> its variables
    for leaf, path in enumerate(paths):
        for n in range(1, len(path) + 1):
            by_module[path[:n]].add(leaf)
    units = {}
    for i, eqn in enumerate(t.eqns):
        if eqn.primitive.name in ("add", "add_any") and len(eqn.ins) == 2:
            candidates = [(eqn.ins[0], eqn.ins[1]), (eqn.ins[1], eqn.ins[0])]
        elif eqn.primitive.name == "concatenate":
            d = eqn.params["dimension"]
            candidates = [(b, None) for b in eqn.ins if t.uses[b] == [i] and any(d in f.axes for f in t.fields.get(b, ()))]
        else:
            continue
        for end, start in candidates:
            for entry, inside, leaves in _branches(t, static, end, i):
                chains = [_calls(t.eqns[e]) for e in inside]
                common = [m for depth, m in enumerate(chains[0]) if all(len(ch) > depth and ch[depth] == m for ch in chains)]
                module = next((m for m in reversed(common) if by_module[modules[m]] == leaves), None)
                if module is None or start not in (None, entry):
                    continue
                if start is not None:
                    removal = "identity" if module in _calls(eqn) else "zero"
                else:
                    removal = "drop" if entry in eqn.ins else "identity"
                units.setdefault(".".join(modules[module]), Unit(".".join(modules[module]), removal))
                break
    return list(units.values())


def _branches(t: _Trace, static: dict, end: int, join: int):
    """The branches ending at ``end`` (used by equation ``join`` only), largest first, that read one value
    of the shape of ``end`` that depends on the inputs, and whose values are used only inside them:
    ``(that value, the branch's equations, the variables it reads)``."""
    inside, frontier, found, layers = set(), {end}, [], 0
    while frontier and len(inside) < 5000:
        key = max(frontier, key=lambda k: t.producer.get(k, -1))  # latest first: every later use is inside
        if key not in t.producer:
            break
        frontier.discard(key)
        inside.add(t.producer[key])
        eqn = t.eqns[t.producer[key]]
        if any(u not in inside and (out != end or u != join) for out in eqn.outs for u in t.uses[out]):
            break  # a value used outside: every larger branch has it too
        frontier.update(k for k in eqn.ins if k not in static and t.producer.get(k) not in inside)
        layers += eqn.primitive.name in ("conv_general_dilated", "dot_general")
        if len(frontier) == 1 and t.shape[next(iter(frontier))] == t.shape[end] and layers:
            leaves = frozenset().union(*(static[k] for e in inside for k in t.eqns[e].ins if k in static))
            found.append((next(iter(frontier)), frozenset(inside), leaves))
    return reversed(found)


def _selections(t: _Trace, modules: list, outputs: set) -> dict:
    """Each channel selection (:func:`~xprune_jax.models.layers.select`): its input's channels and, for each
    output position, the input position it takes."""
    members = collections.defaultdict(list)  # (module call, name) -> its equations
    for i, eqn in enumerate(t.eqns):
        for j, scope in enumerate(eqn.scope):
            if scope.startswith("select:"):
                calls = _calls(eqn._replace(scope=eqn.scope[:j]))
                members[calls[-1] if calls else None, scope[len("select:"):]].append(i)
    out = {}
    for (call, name), eqns in members.items():
        made = {k for i in eqns for k in t.eqns[i].outs}
        ins = {k for i in eqns for k in t.eqns[i].ins if k not in made and k in t.fields}
        outs = [k for k in made if k in outputs or any(u not in eqns for u in t.uses[k])]
        fields = [next((f.ids.reshape(-1) for f in t.fields.get(k, ()) if f.axes == (len(t.shape[k]) - 1,)), None)
                  for k in (*ins, *outs)]
        if len(ins) == len(outs) == 1 and all(f is not None for f in fields) and len(set(fields[0].tolist())) == len(fields[0]):
            position = {node: i for i, node in enumerate(fields[0].tolist())}
            out[".".join((*(modules[call] if call is not None else ()), name))] = (
                t.roots(fields[0]), np.array([position[n] for n in fields[1].tolist()]))
    return out

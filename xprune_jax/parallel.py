"""Data parallelism over every device of every process: batches are sharded over a 1-D mesh of
``jax.devices()`` (one device is a mesh of size one), the variables replicated.

A global batch of ``B`` rows is split evenly over the mesh's devices. The mesh orders the devices by
process, so each process owns a contiguous block of rows (:func:`local_rows`): it reads and
preprocesses only those, :func:`global_batch` assembles every process's rows into one global
array, and :func:`host_rows` reads this process's rows of a result back. :func:`gather` collects
each process's host results on every process (so process 0 can write them).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xprune_jax.errors import UserError

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process), grouped by process."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """``tree`` (the same values in every process: a model's variables, a train state) whole on every device
    of ``mesh``. Across processes each builds its own devices' copies from its own values: ``jax.device_put``
    to a sharding that spans processes instead gathers every leaf from every process to check it (hundreds
    of exchanges for a model; a 2-process `score` pass spent 60% of its time there)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(place, tree)


def is_main() -> bool:
    """Whether this is process 0, the one that writes results, reports and progress."""
    return jax.process_index() == 0


def describe(mesh: Mesh) -> str:
    processes = len({d.process_index for d in mesh.devices.flat})
    return f"{mesh.size} device{'s' * (mesh.size != 1)}" + (f" of {processes} processes" if processes > 1 else "")


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "--batch_size") -> int:
    """``batch_size`` if it splits evenly over the mesh (results must not depend on the device count, so
    it is never changed silently), else a :class:`UserError`."""
    if batch_size < 1 or batch_size % mesh.size:
        multiple = max(1, -(-batch_size // mesh.size)) * mesh.size
        raise UserError(f"{flag}={batch_size} does not split over the {describe(mesh)}; use a multiple of {mesh.size}, "
                        f"e.g. {multiple}")
    return batch_size


def local_rows(batch_size: int, mesh: Mesh) -> range:
    """The rows of a global batch that this process supplies and gets back: its devices' shards."""
    per_device = batch_size // mesh.size
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine:
        raise UserError(f"this process (index {jax.process_index()}) has no device in the mesh")
    return range(mine[0] * per_device, (mine[-1] + 1) * per_device)


def local_items(items: list, batch_size: int, mesh: Mesh) -> list[list]:
    """For each global batch of ``items`` (consecutive ``batch_size`` chunks), the items this process loads."""
    rows = local_rows(batch_size, mesh)
    return [items[start + rows.start: min(start + rows.stop, len(items))] if start + rows.start < len(items) else []
            for start in range(0, len(items), batch_size)]


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to ``size`` with zeros, so every batch has one shape (one compilation)."""
    if len(batch) == size:
        return batch
    return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])


def global_batch(local, batch_size: int, mesh: Mesh):
    """The global batch (a pytree of arrays sharded over ``mesh``) from this process's rows ``local``
    (each leaf ``len(local_rows)`` long)."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (batch_size, *np.shape(x)[1:])), local)


def host_rows(x: jax.Array, rows: range) -> np.ndarray:
    """``rows`` of a global array from this process's own shards (the whole array in one process)."""
    out, filled = None, 0
    for shard in x.addressable_shards:
        index = shard.index[0] if shard.index else slice(None)
        start = index.start or 0
        stop = x.shape[0] if index.stop is None else index.stop
        lo, hi = max(start, rows.start), min(stop, rows.stop)
        if lo >= hi:
            continue
        data = np.asarray(shard.data)
        if out is None:
            out = np.empty((len(rows), *x.shape[1:]), data.dtype)
        out[lo - rows.start: hi - rows.start] = data[lo - start: hi - start]
        filled += hi - lo
    if out is None or filled < len(rows):
        raise ValueError(f"rows {rows.start}:{rows.stop} are not all on this process's devices")
    return out


def gather(rows: np.ndarray) -> np.ndarray:
    """Every process's ``rows`` (any number; the same trailing shape and dtype everywhere) concatenated in
    process order, on every process. Bytes travel, so float64 and int64 arrive exact."""
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    rows = np.ascontiguousarray(rows)
    width = int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.dtype.itemsize
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(rows)))).reshape(-1)
    padded = np.zeros((max(1, int(counts.max())), width), np.uint8)
    padded[: len(rows)] = rows.view(np.uint8).reshape(len(rows), width)
    stacked = np.asarray(multihost_utils.process_allgather(padded))
    data = np.concatenate([stacked[p, :c] for p, c in enumerate(counts)])
    return data.reshape(-1).view(rows.dtype).reshape(-1, *rows.shape[1:])


def all_processes(flags: list[bool]) -> list[bool]:
    """Elementwise AND of a list of booleans over the processes."""
    if jax.process_count() == 1:
        return list(flags)
    from jax.experimental import multihost_utils

    stacked = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32).reshape(-1, 1)))
    return [bool(v) for v in stacked.reshape(jax.process_count(), -1).min(axis=0)]

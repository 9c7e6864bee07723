"""Data parallelism: batches are sharded over a 1-D device mesh (one device is a mesh of size one)."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def round_up_batch(batch_size: int, mesh: Mesh) -> int:
    """The smallest batch size >= ``batch_size`` that splits evenly over the mesh."""
    return -(-batch_size // mesh.size) * mesh.size


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to ``size`` with zeros, so every batch has one shape (one compilation)."""
    if len(batch) == size:
        return batch
    return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])

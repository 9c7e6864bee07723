"""Top-k over (row, column) pairs without sorting every pair."""

import jax
import jax.numpy as jnp


def top_k_pairs(scores: jax.Array, k: int, row_max: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(scores.reshape(*lead, N * K), k)`` for ``scores [..., N, K]``, exactly, ties included.

    The k best pairs lie in the k rows with the best row maxima (ties to the lower row): a pair
    outside them is beaten by each of those rows' best pair, which is larger or ties it from a lower
    flat index. So it takes the top k of the N row maxima, then the top k of those rows' k * K pairs,
    gathered in row order so that ties still go to the lower flat index as in ``lax.top_k``. A
    detector's per-level top-k over anchors x classes then sorts about N + k * K values, not N * K.

    ``row_max [..., N]``: ``jnp.max(scores, axis=-1)`` where the caller has it already.

    Returns:
      values [..., k] by decreasing value, and their flat indices ``row * K + column`` [..., k].
    """
    *lead, rows, columns = scores.shape
    if k >= rows:  # every row would be kept: nothing to gain
        return jax.lax.top_k(scores.reshape(*lead, rows * columns), k)
    _, best_rows = jax.lax.top_k(jnp.max(scores, axis=-1) if row_max is None else row_max, k)
    best_rows = jnp.sort(best_rows, axis=-1)
    candidates = jnp.take_along_axis(scores, best_rows[..., None], axis=-2)  # [..., k, K]
    values, index = jax.lax.top_k(candidates.reshape(*lead, k * columns), k)
    rows_taken = jnp.take_along_axis(best_rows, index // columns, axis=-1)
    return values, rows_taken * columns + index % columns

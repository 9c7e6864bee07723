"""The one key and layout mapping between torch state_dicts and Flax variables (NumPy only).

Flax module names mirror torch module paths, so a variable's torch key is its path joined with
dots plus the torch name of the leaf; layouts differ only by the transposes below.
"""

from typing import Callable, Mapping

import jax
import numpy as np

from xprune_jax.errors import UserError

# (collection, Flax leaf name) -> torch parameter/buffer name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Buffers torch keeps that carry no information for inference.
IGNORED_TORCH_KEYS = ("num_batches_tracked",)


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    *modules, leaf = path
    return ".".join([*modules, _LEAF_NAMES[(collection, leaf)]])


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:  # linear [out, in] -> [in, out]
        return array.T
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _leaves(tree: dict):
    for collection, sub in sorted(tree.items(), key=lambda item: item[0] != "params"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
            yield collection, tuple(p.key for p in path), leaf


def _set(tree: dict, keys: tuple[str, ...], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > limit else shown


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray],
    expected: dict,
    what: str,
    rename: Callable[[str], str] = lambda key: key,
) -> dict:
    """Map a torch state_dict (NumPy values) onto the Flax variables whose shapes are ``expected``.

    ``rename`` maps a Flax-derived torch key to the key in the file (for checkpoints that nest the
    model under a prefix). Raises UserError naming every missing, unexpected and mis-shaped key.
    """
    variables, used, missing, misshaped = {}, set(), [], []
    for collection, path, shape in _leaves(expected):
        key = rename(torch_key(collection, path))
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(state_dict[key], dtype=np.float32)
        want = _to_torch_layout(path[-1], np.empty(shape.shape, np.bool_)).shape
        if value.shape != want:
            misshaped.append(f"{key} (file {tuple(value.shape)}, model {tuple(want)})")
            continue
        _set(variables, (collection, *path), _to_flax_layout(path[-1], value))
    unexpected = [k for k in state_dict if k not in used and not k.endswith(IGNORED_TORCH_KEYS)]
    if missing or unexpected or misshaped:
        problems = [f"{len(l)} {n} keys: {_listing(l)}" for n, l in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if l]
        raise UserError(f"the weights do not fit {what}: {'; '.join(problems)}. Check that --arch matches the weights file")
    return variables


def variables_to_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """Flax variables -> a torch-layout state_dict of NumPy arrays (the inverse mapping)."""
    return {torch_key(c, path): np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(leaf)))
            for c, path, leaf in _leaves({k: v for k, v in variables.items() if k in ("params", "batch_stats")})}

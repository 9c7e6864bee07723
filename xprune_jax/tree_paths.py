"""Address variable subtrees by torch module path (``layer1.0.conv1``), although Flax module names
may themselves contain dots (``layer1.0`` / ``downsample.0``)."""


def keys_of(tree: dict, name: str) -> tuple[str, ...] | None:
    """The key sequence of ``name`` in ``tree`` (longest matching key first), or None."""
    keys, node, rest = [], tree, name
    while rest:
        if not isinstance(node, dict):
            return None
        match = max((k for k in node if rest == k or rest.startswith(k + ".")), key=len, default=None)
        if match is None:
            return None
        keys.append(match)
        node, rest = node[match], rest[len(match) + 1:]
    return tuple(keys)


def get(tree: dict, name: str, default=None):
    keys = keys_of(tree, name)
    if keys is None:
        return default
    for k in keys:
        tree = tree[k]
    return tree


def delete(tree: dict, name: str) -> bool:
    """Remove the subtree at ``name`` (in place). Returns whether it existed."""
    keys = keys_of(tree, name)
    if not keys:
        return False
    for k in keys[:-1]:
        tree = tree[k]
    del tree[keys[-1]]
    return True

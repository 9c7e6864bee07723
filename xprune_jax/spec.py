"""Architecture specs: frozen dataclasses of plain data, serialisable to JSON.

A spec says which blocks exist and how wide each layer is. Modules are built from it and pruning
rewrites it, so params and spec always travel together.
"""

import dataclasses
import typing

_SPEC_TYPES: dict[str, type] = {}


def register_spec(cls):
    """Class decorator: make a frozen spec dataclass (de)serialisable by name."""
    _SPEC_TYPES[cls.__name__] = cls
    return cls


def spec_to_dict(spec) -> dict:
    """A JSON-able dict with a `type` tag at the top."""
    return {"type": type(spec).__name__, **dataclasses.asdict(spec)}


def spec_from_dict(data: dict):
    data = dict(data)
    name = data.pop("type", None)
    if name not in _SPEC_TYPES:
        raise ValueError(f"unknown spec type {name!r}; known: {sorted(_SPEC_TYPES)}")
    return _decode(_SPEC_TYPES[name], data)


def _decode(tp, value):
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value)
    return value

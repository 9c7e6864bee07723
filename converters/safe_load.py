"""``torch.load`` that runs no code from the file: both converters read weights files through it."""

import os
import pickle
import re

import torch

from xprune_jax.errors import UserError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# the weights-only unpickler's refusals: a GLOBAL opcode, or an object of a class it may not build
_DISALLOWED = (re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global"),
               re.compile(r"Can only build .* but got <class '([^']+)'>"))
_DETAIL = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")
FIX = "re-download it or point --weights at the right file"


def error_text(error: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message without ANSI colour codes, else its type's name."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".")[:limit] if lines else type(error).__name__


class DisallowedGlobal(Exception):
    """The file's pickle needs a Python global outside the allow-list (``name``); nothing of it was built."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def check_not_empty(path: str) -> None:
    if os.path.getsize(path) == 0:
        raise UserError(f"weights file {path} is empty; {FIX}")


def unreadable(path: str, error: BaseException) -> UserError:
    """The one-line error for a file that torch cannot read as a checkpoint."""
    if isinstance(error, PermissionError):
        return UserError(f"cannot read weights file {path}: permission denied; make it readable or copy it")
    reason = error_text(error)
    if isinstance(error, pickle.UnpicklingError) and (detail := _DETAIL.search(_ANSI.sub("", str(error)))):
        reason = detail[1].strip()[:160]
    with open(path, "rb") as f:
        head = f.read(16)
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive, or (before torch 1.6) a pickle
        reason = f"neither a zip archive nor a pickle: it starts with {head!r}"
    elif head.startswith(b"PK") and not isinstance(error, pickle.UnpicklingError):
        reason = f"a truncated or damaged zip archive: {reason}"
    return UserError(f"cannot read weights file {path}: not a readable torch checkpoint ({reason}); {FIX}")


def load_weights_only(path: str, allowed=()) -> object:
    """``torch.load(path, weights_only=True)``, also allowing the ``allowed`` globals (classes, or
    ``(object, "pickled.module.Name")`` aliases). A file that needs any other global raises
    :class:`DisallowedGlobal`; an empty, truncated or foreign file a one-line UserError."""
    check_not_empty(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = _ANSI.sub("", str(e))
        for pattern in _DISALLOWED:
            if (match := pattern.search(text)):
                raise DisallowedGlobal(match[1]) from None
        raise unreadable(path, e) from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise unreadable(path, e) from None

"""Files: atomic writes (results are either complete or absent, never half-written), locks, checks and the
JSON inputs a user passes."""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile

from xprune_jax.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: name the file the user asked for
        e.filename = e.filename if e.filename and e.filename != tmp else path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str, what: str, fix: str):
    """The JSON value in ``path``; a one-line :class:`UserError` naming ``what`` it is and the ``fix`` if the
    file cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path} ({e.__class__.__name__}); {fix}") from None


def differences(here: dict, there: dict) -> list[str]:
    """The fields in which what made a file (``there``) and what is asked now (``here``) differ, nested
    ones dotted, each scalar one with both values: ``precision (highest there, default here)``."""
    def short(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return f"{value[:8]}..." if isinstance(value, str) and len(value) > 16 else str(value)

    differ = []
    for name in sorted(here.keys() | there.keys()):
        a, b = here.get(name), there.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            differ += [f"{name}.{d}" for d in differences(a, b)]
        elif isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            differ.append(name)
        else:
            differ.append(f"{name} ({short(b)} there, {short(a)} here)")
    return differ


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive(directory: str, name: str = ".xprune.lock"):
    """Hold ``directory``'s lock file ``name`` for the block: a second process that wants it gets a
    :class:`UserError` naming the holder, instead of both writing the same files."""
    path = os.path.join(directory, name)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{directory} is being written by {holder}; wait for it to finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"xprune pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


@contextlib.contextmanager
def locked_directory(directory: str):
    """Hold an exclusive lock on ``directory`` itself for the block, waiting for it: processes that
    read, merge and rewrite one file there take turns. No lock file is left behind."""
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_writable(path: str, flag: str = "--out") -> None:
    """Fail now, not after the work, if ``path`` (a file or directory to be written) can't be
    created: make its parent directory (or use the directory itself, if it exists) and a temporary
    file there."""
    path = os.path.abspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".xprune-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); give {flag} a writable place") from None

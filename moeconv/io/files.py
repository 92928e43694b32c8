"""File primitives every output goes through: content hashes, atomic writes (temp + fsync + rename), an atomic folder swap."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

from moeconv.errors import MoeconvError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder (or of the one file): what a job read, by content, not by name or mtime."""
    files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else [folder]
    return {f.name: sha256_file(f) for f in files}


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a crash after it must not bring the old name back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, err: OSError) -> MoeconvError:
    """The one-line form of a failed write, naming the fix."""
    if err.errno == errno.ENOSPC:
        return MoeconvError(f"no space left on the device holding {path}; free space or choose another OUT, then rerun with --resume")
    if err.errno in (errno.EACCES, errno.EPERM):
        return MoeconvError(f"no permission to write {path}; choose an OUT in a folder you can write to")
    if err.errno == errno.EROFS:
        return MoeconvError(f"{path} is on a read-only file system; choose an OUT on a writable one")
    return MoeconvError(f"cannot write {path} ({os.strerror(err.errno) if err.errno else err}); check the OUT folder and rerun")


def replace_atomically(tmp: Path, target: Path) -> None:
    """fsync `tmp`, rename it over `target`, and fsync the folder: `target` is either the old or the new file, whole."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextmanager
def written_atomically(target: Path, folder: Path | None = None):
    """Yield a temp path to write `target` through; on leaving, it replaces `target` whole (or is removed on any
    failure, Ctrl-C and SIGTERM included).  A failed write is a one-line error naming `folder` (default: target)."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        yield tmp
        replace_atomically(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(folder or target, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with written_atomically(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # file system or kernel without the flag
        return False
    raise OSError(code, os.strerror(code), str(b))


def strict_json(data, indent: int = 2, sort_keys: bool = True) -> str:
    """JSON that strict parsers accept: NaN and Inf become null."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str)

"""Files written whole or not at all, and safetensors I/O: the one place that touches disk for
every command (atomic rename, error messages that name the user's path, never a temporary one)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

from safetensors.torch import load_file, save

from .errors import UsageError


def check_output_file(path: str, flag: str):
    """A UsageError unless `path` can name a new or existing file: its directory exists and it
    is not itself a directory. For output flags, checked before any work starts."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError(f"{flag} {path}: directory {d} does not exist")


def atomic_write_bytes(path: str, data: bytes):
    """Write to a temporary file in the same directory, fsync, then rename over `path`.
    An OSError names `path`, never the hidden temporary file."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; give a file name")
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from None
        raise


def atomic_write_json(path: str, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path: str, tensors: dict, metadata: Optional[dict] = None):
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: str) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except Exception as e:
        raise UsageError(f"{path}: corrupt or unreadable safetensors file ({e})") from None

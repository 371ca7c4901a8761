"""Crash-safe checkpoints: one directory per saved step, with a checksummed manifest.

    RUN/checkpoints/step0001000/   config.json, model.safetensors, ema_<rate>.safetensors,
                                   state.safetensors, state.json, manifest.json
    RUN/config.json, RUN/*.safetensors, RUN/state.json   copies of the newest checkpoint's
                                   files, so that `gaussdiff.load(RUN)` and `export` work
                                   (copies, not hard links: damage to one leaves the other)

A checkpoint is written into a hidden temporary directory, every file fsynced, then
manifest.json (each file's size and sha256) last, and the directory is renamed into place: a
crash or SIGKILL leaves either the complete checkpoint or none. Only then are the run
directory's top-level files replaced (each by an atomic rename) and checkpoints beyond the
newest `keep` deleted. Ctrl-C (SIGINT) during all this is held back until the checkpoint, the
top-level files and the pruning are done, so an interrupted run never keeps more than `keep`
checkpoints. On --resume the newest checkpoint whose files match their manifest is
taken; a truncated or corrupt one is reported by name and skipped in favour of the one before.
Nothing here unpickles anything: weights are safetensors, the rest JSON.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import save

from ..errors import UsageError
from ..fileio import atomic_write_bytes

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step(\d{7,})$")


class CheckpointError(UsageError):
    """A checkpoint could not be written, or none could be resumed from (one line, exit 2)."""


class CorruptCheckpoint(Exception):
    """A checkpoint directory whose files do not match its manifest."""


def step_dir_name(step: int) -> str:
    return f"step{int(step):07d}"


def list_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of the run's checkpoint directories, oldest first (not yet verified)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def holds_run(run_dir: str) -> bool:
    """Whether `run_dir` already holds a training run (checkpoints or the legacy top-level files)."""
    return bool(list_checkpoints(run_dir)) or os.path.exists(os.path.join(run_dir, STATE_JSON))


# ------------------------------------------------------------------------------ writing
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: str, data: bytes):
    """Write `data` to a new file and fsync it (the one place checkpoint bytes reach the disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:   # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def encode(name: str, value) -> bytes:
    """The bytes of one checkpoint file: bytes as they are, a dict of tensors as safetensors
    (names ending in .safetensors), anything else as JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if name.endswith(".safetensors"):
        return save({k: v.detach().cpu().contiguous() for k, v in value.items()})
    return (json.dumps(value, indent=2) + "\n").encode()


def check_finite(step: int, tensors: Dict[str, Dict[str, torch.Tensor]]):
    """Refuse to checkpoint a model with a NaN or infinite weight (names the first one)."""
    for file, state in tensors.items():
        for k, v in state.items():
            if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"step {step}: {file} holds non-finite values (first at {k}); "
                                      f"not writing it as a checkpoint")


def write_checkpoint(run_dir: str, step: int, files: Dict[str, object], keep: int = 0,
                     log: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoint `step` of the run in `run_dir`; returns its directory.

    files: name -> bytes, a dict of tensors (".safetensors") or a JSON-able object; written in
    the given order. keep: how many checkpoint directories to keep (the newest; 0 keeps all).
    An OSError (disk full, read-only or vanished run directory) becomes a one-line
    CheckpointError, and the checkpoints already on disk are left as they were.
    """
    with _sigint_held():
        return _write_checkpoint(run_dir, step, files, keep, log)


@contextlib.contextmanager
def _sigint_held():
    """Hold a Ctrl-C (SIGINT) back until the block is done, then raise KeyboardInterrupt.
    Only the main thread can install handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _write_checkpoint(run_dir, step, files, keep, log) -> str:
    root = os.path.join(run_dir, CHECKPOINTS)
    final = os.path.join(root, step_dir_name(step))
    previous = [p for s, p in list_checkpoints(run_dir) if s != step]
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        _remove_leftovers(root)
        tmp = tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.", suffix=".tmp", dir=root)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes 0700; give the directory normal permissions
        manifest = {"format": MANIFEST_FORMAT, "step": int(step), "files": {}}
        for name, value in files.items():
            data = encode(name, value)
            write_file(os.path.join(tmp, name), data)
            manifest["files"][name] = {"bytes": len(data), "sha256": _sha256(data)}
            del data
        write_file(os.path.join(tmp, MANIFEST), encode(MANIFEST, manifest))
        _fsync_dir(tmp)
        if os.path.exists(final):   # the same step saved again (a resumed run): swap it out
            old = tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.", suffix=".old", dir=root)
            os.rename(final, os.path.join(old, "x"))
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        tmp = None
        _fsync_dir(root)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final}: {_describe(e)}; {prev}") from None
    try:
        for name in files:   # state.json last: for older readers it marks a complete set
            if name != STATE_JSON:
                _replace_with_copy(os.path.join(final, name), os.path.join(run_dir, name))
        if STATE_JSON in files:
            _replace_with_copy(os.path.join(final, STATE_JSON), os.path.join(run_dir, STATE_JSON))
        _fsync_dir(run_dir)
    except OSError as e:
        raise CheckpointError(f"checkpoint {final} was written, but updating the files in "
                              f"{run_dir} failed: {_describe(e)}") from None
    prune(run_dir, keep)
    if log:
        log(f"saved {final}")
    return final


def refresh_top_level(run_dir: str, checkpoint_dir: str):
    """Make the run directory's top-level files copies of `checkpoint_dir`'s (the one a resume
    starts from): a crash between renaming a checkpoint into place and copying its files up
    leaves them one step behind, and a resumed run that has no step left to train would
    otherwise never rewrite them. Temporary copies a killed run left behind are deleted (the
    caller holds the run, so no other process is writing them)."""
    for name in os.listdir(run_dir):
        if name.startswith(".") and name.endswith(".copy"):
            os.unlink(os.path.join(run_dir, name))
    if os.path.abspath(checkpoint_dir) == os.path.abspath(run_dir):
        return
    with _sigint_held():
        for name in verify(checkpoint_dir)["files"]:
            src, dst = os.path.join(checkpoint_dir, name), os.path.join(run_dir, name)
            with open(src, "rb") as f:
                data = f.read()
            if os.path.exists(dst):
                with open(dst, "rb") as f:
                    if f.read() == data:
                        continue
            _replace_with_copy(src, dst)


def _describe(e: OSError) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


def _replace_with_copy(src: str, dst: str):
    """Atomically make `dst` a copy of `src`, through a temporary name and a rename."""
    d = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(d, f".{os.path.basename(dst)}.{os.getpid()}.copy")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        with open(src, "rb") as f:
            write_file(tmp, f.read())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _remove_leftovers(root: str):
    """Delete temporary directories left by a crash in the middle of a write."""
    for name in os.listdir(root):
        if name.startswith(".step") and (name.endswith(".tmp") or name.endswith(".old")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prune(run_dir: str, keep: int):
    """Delete all but the newest `keep` checkpoint directories (keep = 0: delete none)."""
    if keep and keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------ reading
def verify(path: str) -> dict:
    """The manifest of checkpoint directory `path`, after checking that every file it lists
    exists with the recorded size and sha256. Raises CorruptCheckpoint saying what is wrong."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read().decode())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        raise CorruptCheckpoint("no manifest.json (an incomplete write)") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"unreadable manifest.json ({e})") from None
    for name, entry in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CorruptCheckpoint(f"manifest.json names an invalid file {name!r}")
        try:
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{name} is missing") from None
        except OSError as e:
            raise CorruptCheckpoint(f"{name} is unreadable ({_describe(e)})") from None
        try:
            size, digest = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpoint(f"manifest.json entry of {name} is malformed") from None
        if len(data) != size:
            raise CorruptCheckpoint(f"{name} has {len(data)} bytes, the manifest says {size} (truncated?)")
        if _sha256(data) != digest:
            raise CorruptCheckpoint(f"{name} does not match its sha256 checksum")
    return manifest


def _warn(msg: str):
    print(msg, file=sys.stderr, flush=True)


def select_checkpoint(run_dir: str, spec="auto", log: Callable[[str], None] = _warn) -> str:
    """The directory to resume the run in `run_dir` from.

    spec "auto" (or True): the newest checkpoint whose files verify; each corrupt one on the
    way is reported through `log` and skipped. A run directory written before per-step
    checkpoints existed (top-level state.json, no checkpoints/) resumes from its top-level
    files. Any other spec names one checkpoint: a path, or a directory name under
    checkpoints/ ("step0001000"); it must verify.
    """
    if spec in (True, None, "", "auto"):
        found = list_checkpoints(run_dir)
        for step, path in reversed(found):
            try:
                verify(path)
            except CorruptCheckpoint as e:
                log(f"--resume: skipping corrupt checkpoint {path}: {e}")
                continue
            log(f"--resume: continuing from {path} (step {step})")
            return path
        if found:
            raise CheckpointError(f"--resume: none of the {len(found)} checkpoints in "
                                  f"{os.path.join(run_dir, CHECKPOINTS)} verifies (see above)")
        if os.path.exists(os.path.join(run_dir, STATE_JSON)):
            log(f"--resume: continuing from the files in {run_dir} (no checkpoints/ directory)")
            return run_dir
        raise CheckpointError(f"--resume: {run_dir} holds no checkpoint")
    path = str(spec)
    if not os.path.isdir(path):
        path = os.path.join(run_dir, CHECKPOINTS, str(spec))
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {spec}: no such checkpoint (give auto, a directory "
                              f"under {os.path.join(run_dir, CHECKPOINTS)}, or its path)")
    try:
        verify(path)
    except CorruptCheckpoint as e:
        raise CheckpointError(f"--resume {spec}: checkpoint {path} is corrupt: {e}") from None
    log(f"--resume: continuing from {path}")
    return path


def trim_log(path: str, step: int):
    """Drop the records of log.jsonl after `step` (the work a crash lost, about to be redone)
    and a torn last line, so that the log tells the history of the weights on disk."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))

"""Long sampling runs in shards that survive an interruption.

`gaussdiff sample --out S.npz --num N` with N above --shard-size draws images [k·M, (k+1)·M)
as shard k and writes it to S.npz.parts/shard_KKKKKK.npz (atomically) before drawing the next;
S.npz.parts/settings.json records every option that decides the images. Rerun the same command
after Ctrl-C or a crash and the shards already on disk are kept: as image i depends only on
(seed, i), the result equals an uninterrupted run's, byte for byte. When every shard is there,
S.npz is written and the parts directory removed. A parts directory made with other settings
is refused, never mixed in.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

from ..errors import UsageError
from ..images import save_npz
from ..modeldir import atomic_write_bytes

# options that do not change which images are drawn
_NEUTRAL = {"num", "out", "grid", "no_progress", "batch_size", "device", "func", "command",
            "channels_last", "shard_size", "force_precision"}


def sampling_settings(args) -> dict:
    """The options that decide image i: model (as an absolute path), sampler, steps, seed,
    guidance ... (JSON-ready)."""
    settings = {}
    for k, v in sorted(vars(args).items()):
        if k in _NEUTRAL or callable(v):
            continue
        if k in ("model", "classifier") and v:
            v = os.path.abspath(v)
        elif k in ("cascade", "ensemble") and v:
            v = [os.path.abspath(p) for p in v] if isinstance(v, list) else v
        settings[k] = v
    return settings


def _out_path(args) -> str:
    """--out as `save_npz` writes it (".npz" appended when missing)."""
    return args.out if args.out.endswith(".npz") else args.out + ".npz"


def _shard_path(parts: str, k: int) -> str:
    return os.path.join(parts, f"shard_{k:06d}.npz")


def sample_in_shards(args, draw, stats: dict):
    """Images [0, args.num) of `draw(start, stop, progress) -> (uint8 images, labels)`, shard by
    shard through args.out + ".parts/"; returns all images and labels (None if unlabelled)."""
    out = _out_path(args)
    parts = out + ".parts"
    settings = sampling_settings(args)
    settings_path = os.path.join(parts, "settings.json")
    if os.path.isdir(parts):
        try:
            with open(settings_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if saved != settings:
            differ = sorted(k for k in set(settings) | set(saved or {})
                            if (saved or {}).get(k) != settings.get(k))
            raise UsageError(f"{parts} holds shards of a sampling run with other settings "
                             f"({', '.join(differ[:4]) or 'unreadable settings.json'}): remove it, "
                             f"or rerun with that run's options to continue it")
    else:
        os.makedirs(parts)
        atomic_write_bytes(settings_path, (json.dumps(settings, indent=1) + "\n").encode())
    size = args.shard_size
    bounds = [(s, min(s + size, args.num)) for s in range(0, args.num, size)]
    done = [k for k in range(len(bounds)) if os.path.exists(_shard_path(parts, k))]
    if done:
        print(f"--out {out}: continuing; {len(done)} of {len(bounds)} shards already in {parts}",
              file=sys.stderr)
    nfe = []
    for k, (start, stop) in enumerate(bounds):
        if k in done:
            continue
        images, labels = draw(start, stop, not args.no_progress)
        nfe.append(stats.get("nfe", 0))
        save_npz(_shard_path(parts, k), images, labels)
    images, labels = [], []
    for k, (start, stop) in enumerate(bounds):
        with np.load(_shard_path(parts, k)) as z:
            if z["arr_0"].shape[0] != stop - start:
                raise UsageError(f"{_shard_path(parts, k)} holds {z['arr_0'].shape[0]} images, "
                                 f"expected {stop - start}: remove it and rerun")
            images.append(z["arr_0"])
            if "arr_1" in z:
                labels.append(z["arr_1"])
    if nfe:
        stats["nfe"] = max(nfe)
    elif "nfe" not in stats:
        stats["nfe"] = "(all shards were already on disk)"
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def finish(args):
    """Remove the parts directory once --out is written."""
    shutil.rmtree(_out_path(args) + ".parts", ignore_errors=True)

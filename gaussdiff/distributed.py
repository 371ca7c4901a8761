"""Several processes, one run: training and sampling under `torchrun` (PyTorch's own engine).

    torchrun --nproc_per_node 2 -m gaussdiff train --preset fashion-small --out runs/r
    torchrun --nproc_per_node 2 -m gaussdiff sample runs/r --num-samples 10000 --out s.npz

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR, MASTER_PORT); `setup` reads
them and starts a process group: nccl when the process drives a CUDA device (cuda:LOCAL_RANK),
gloo on CPUs. Without torchrun (or with one process) nothing here does anything, and a run is
the plain single-process one.

How a run is split (training/trainer.py, cli/__init__.py):
- Training: --batch-size is the GLOBAL batch B. Every rank draws the same global batch from
  the same permutation, and the same flips, timesteps and noise for all B rows from the same
  generator, then keeps its own B / W rows (`shard`). A global batch is therefore the same
  images with the same noise whatever the number of processes, the saved state (permutation
  position, generator, step) is global, and a run resumes with any number of processes.
  DistributedDataParallel averages the gradients. Dropout masks come from a per-rank seed
  derived from (run seed, step, rank) (`rank_seed`).
- Sampling: image i depends only on (seed, i); rank r draws a contiguous range of indices and
  rank 0 gathers them into one .npz, identical to the single-process one.
- Rank 0 alone writes checkpoints, logs, grids and .npz files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def env_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (single process without)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    return DistInfo(rank, world, local) if world > 1 else SINGLE


def current() -> DistInfo:
    """The running process group's DistInfo (single process when none was started)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_info().local_rank)
    return SINGLE


def setup(device: Optional[str] = None):
    """(DistInfo, torch.device) for this process; starts the process group under torchrun.

    device: what the user asked for (None: cuda when available, else cpu). Under torchrun a
    CUDA device becomes cuda:LOCAL_RANK, one GPU per process."""
    info = env_info()
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if not info.enabled:
        return info, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard(n: int, info: DistInfo) -> slice:
    """This rank's contiguous part of n items: rank r of W takes [r·n // W, (r + 1)·n // W)."""
    return slice(info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size)


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank `rank` at training step `step` of a run with seed `seed`."""
    return int(np.random.SeedSequence([int(seed), int(step), int(rank), 0x6464]).generate_state(1)[0])


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a tensor [n_r, ...] of every rank along dim 0, in rank order (the sizes
    may differ between ranks)."""
    if not info.enabled:
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])

"""Choosing a sampling batch size: `gaussdiff sample --batch-size auto`.

Sampling time is (number of network evaluations) x (time of one evaluation), so the batch size
that maximises images/s of one network evaluation maximises sampling throughput. On a CPU
throughput peaks at a moderate batch and then falls as activations leave the caches, so the
batch is found by timing a few forward passes per candidate; on CUDA throughput keeps rising
with the batch until memory runs out, so the largest candidate that fits is taken.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from ..modeldir import num_timesteps

CANDIDATES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _probe_input(pipe, batch: int, device):
    C, H, W = pipe.image_shape
    x = torch.randn(batch, C, H, W, device=device)
    T = num_timesteps(pipe.config) or 1000   # σ-space: any noise input times the same
    t = torch.full((batch,), T // 2, device=device, dtype=torch.long)
    kwargs = {}
    if pipe.num_classes is not None:
        kwargs["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    task = pipe.config.get("task") or {}
    if task.get("type") == "upsample":   # the second stage of a cascade also sees the low-res image
        kwargs["low_res"] = torch.zeros(batch, C, task["low_res"], task["low_res"], device=device)
    return x, t, kwargs


@torch.no_grad()
def forward_seconds(pipe, batch: int, repeats: int = 2) -> float:
    """Best time of one network evaluation on a batch of `batch` (after one warm-up call)."""
    device = next(pipe.model.parameters()).device
    x, t, kwargs = _probe_input(pipe, batch, device)
    pipe.model.eval()
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        pipe.model(x, t, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def autotune_batch_size(pipe, num: int, candidates: Sequence[int] = CANDIDATES,
                        max_batch: Optional[int] = None, report: Optional[dict] = None) -> int:
    """The sampling batch size for `num` images: the fastest (images/s of one network
    evaluation) of `candidates` on a CPU, the largest that fits in memory on CUDA. Candidates
    above num (and max_batch) are not tried; on a CPU the probe stops once throughput has
    fallen twice in a row. `report`, when given, receives {batch: images/s}."""
    device = next(pipe.model.parameters()).device
    limit = min(num, max_batch or num)
    tried = [b for b in candidates if b <= limit] or [limit]
    if tried[-1] < limit and limit not in tried:
        tried.append(limit)   # num itself (one batch for everything) when it is small
    rates = {} if report is None else report
    falls = 0
    for b in tried:
        try:
            rate = b / forward_seconds(pipe, b, repeats=1 if device.type == "cuda" else 2)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if device.type != "cuda" and rates:
            falls = falls + 1 if rate < max(rates.values()) else 0
        rates[b] = rate
        if falls >= 2:
            break
    if not rates:
        return tried[0]
    if device.type == "cuda":
        return max(rates)
    return max(rates, key=rates.get)

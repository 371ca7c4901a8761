"""Random draws that are reproducible per image.

A `generator` is None (global RNG), one `torch.Generator`, or a list of generators, one per
batch element (NVlabs/edm's idea): with a list, image i's noise depends only on its own
generator, so a seed gives the same image whatever the batch size.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np
import torch

Generator = Union[None, torch.Generator, Sequence[torch.Generator]]


def per_sample_generators(seeds: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per seed (CPU so that draws are identical on every device)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn(shape, generator: Generator = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`; with a list of generators, row i comes from generator i."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        out = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        return out.to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
            for g in generator]
    return torch.stack(rows).to(device)


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def seed_for(seed: int, index: int) -> int:
    """The seed of image `index` in a run with seed `seed` (independent of batching)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def image_generators(seed: int, indices) -> List[torch.Generator]:
    """The generators of images `indices` of a run with seed `seed` (seed_for each): image i
    draws the same numbers whatever batch it falls in."""
    return per_sample_generators([seed_for(seed, i) for i in indices])

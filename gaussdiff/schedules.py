"""Noise schedules and timestep respacing (float64 throughout).

`beta_schedule` gives the β table of a discrete diffusion; `space_timesteps` picks a subset of
its steps for fast sampling, reproducing improved-diffusion's algorithm exactly (see
API_CONVENTIONS.md).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence, Union

import numpy as np

from .errors import UsageError

SCHEDULES = ("linear", "cosine")


def beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """β_1..β_T as a float64 array of shape [num_steps].

    "linear": DDPM's 1e-4 .. 0.02, both ends scaled by 1000 / T (Improved DDPM, so any T gives
    the same curve of ᾱ). "cosine": Improved DDPM eq. 17 with s = 0.008, β capped at 0.999.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise UsageError(f"diffusion steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise UsageError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """β_t = 1 - ᾱ(t/T) / ᾱ((t-1)/T) for a continuous ᾱ on [0, 1], capped at `max_beta`."""
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return np.array(betas, dtype=np.float64)


def betas_from_alphas_cumprod(alphas_cumprod: Sequence[float]) -> np.ndarray:
    """Inverse of ᾱ_t = Π(1 - β_s): a user-given ᾱ table (decreasing, in (0, 1]) to β."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0 or np.any(a <= 0) or np.any(a > 1) or np.any(np.diff(a) > 0):
        raise UsageError("alphas_cumprod must be a non-empty decreasing sequence in (0, 1]")
    prev = np.append(1.0, a[:-1])
    return 1.0 - a / prev


def space_timesteps(num_steps: int, spacing: Union[str, Iterable[int]]) -> list:
    """The sorted subset of range(num_steps) to keep when respacing.

    `spacing` is "250" or "10,15,20" (per-section counts, improved-diffusion's algorithm),
    "ddimN" (an even stride giving exactly N steps), or an explicit iterable of indices.
    """
    if not isinstance(spacing, str):
        steps = sorted(set(int(s) for s in spacing))
        if not steps or steps[0] < 0 or steps[-1] >= num_steps:
            raise UsageError(f"respaced timesteps must lie in [0, {num_steps}), got {spacing!r}")
        return steps
    spacing = spacing.strip()
    if spacing.startswith("ddim"):
        try:
            desired = int(spacing[4:])
        except ValueError:
            raise UsageError(f"bad respacing {spacing!r}: expected ddimN, e.g. ddim50") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        if desired == num_steps:
            return list(range(num_steps))
        raise UsageError(f"cannot make {desired} equally-strided steps from {num_steps}")
    try:
        counts = [int(x) for x in spacing.split(",")]
    except ValueError:
        raise UsageError(f"bad respacing {spacing!r}: expected e.g. 250, 10,15,20 or ddim50") from None
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise UsageError(f"cannot take {count} steps from a section of {size} steps "
                             f"(respacing {spacing!r} of {num_steps})")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))

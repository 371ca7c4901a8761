"""Noise schedules and timestep respacing (float64 throughout).

`beta_schedule` gives the β table of a discrete diffusion; `space_timesteps` picks a subset of
its steps for fast sampling, reproducing improved-diffusion's algorithm exactly (see
docs/conventions.md). `karras_sigmas`, `vp_sigmas`, `ve_sigmas` and `iddpm_sigmas` give the noise
levels σ_0 > ... > σ_N = 0 of σ-space samplers (EDM Table 1); `EDMODE`, `VEODE` and `VPODE` the
σ(t), s(t) of its general ODE.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import UsageError

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
        if scale * 0.02 >= 1:   # β_T = 1 makes ᾱ_T = 0: x_0 = x_t / sqrt(ᾱ_T) is then NaN
            raise UsageError(f"the linear schedule needs more than 20 diffusion steps (its last β "
                             f"is 0.02 x 1000 / T), got {num_steps}; use the cosine schedule")
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
    "ddimN" (an even stride giving exactly N steps), or a list or tuple of ints, read as
    section counts exactly as improved-diffusion reads it ([20, 5, 30] is "20,5,30", 58
    steps). Explicit indices are not a spacing: pass them as `GaussianDiffusion(timesteps=...)`.
    """
    if not isinstance(spacing, str):
        counts = list(spacing)
        if not counts or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                 for c in counts):
            raise UsageError(f"bad respacing {spacing!r}: a list means per-section step counts "
                             f"(integers), as in improved-diffusion")
        spacing = ",".join(str(int(c)) for c in counts)
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



# ------------------------------------------------------------------------------------------
# σ-space noise levels (EDM, Karras et al. 2022, Table 1 "Time steps"). Each returns the N + 1
# levels σ_0 > ... > σ_{N-1} > σ_N = 0 of an N-step sampler as a float64 numpy array.

SIGMA_SCHEDULES = ("karras", "vp", "ve", "iddpm")


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> np.ndarray:
    """EDM eq. 5: σ_{i<N} = (σ_max^{1/ρ} + i/(N-1)·(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, σ_N = 0. [n+1]"""
    _check_levels(n, sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(sigmas, 0.0)


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> np.ndarray:
    """EDM Table 1, VP: t_i = 1 + i/(N-1)·(ε_s - 1), σ_i = σ(t_i) of the VP ODE, σ_N = 0. [n+1]"""
    _check_levels(n, 1.0, 2.0)
    t = np.linspace(1.0, eps_s, n)
    return np.append(VPODE(beta_d, beta_min).sigma(t), 0.0)


def ve_sigmas(n: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> np.ndarray:
    """EDM Table 1, VE: t_i = σ_max²·(σ_min²/σ_max²)^{i/(N-1)}, σ_i = sqrt(t_i), σ_N = 0. [n+1]"""
    _check_levels(n, sigma_min, sigma_max)
    t = sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** np.linspace(0.0, 1.0, n)
    return np.append(np.sqrt(t), 0.0)


def iddpm_u(alphas_cumprod: Optional[Sequence[float]] = None, C1: float = 0.001,
            C2: float = 0.008, M: int = 1000) -> np.ndarray:
    """The M + 1 discrete noise levels u_0 > ... > u_M = 0 of iDDPM (EDM Table 1):
    u_{j-1} = sqrt((u_j² + 1) / max(ᾱ_{j-1}/ᾱ_j, C1) - 1).

    ᾱ_j = sin²(π/2 · j / (M(C2 + 1))) (iDDPM's cosine, j = 0 is pure noise), or a model's own
    table `alphas_cumprod` (ᾱ_t, t = 0..T-1, decreasing) read as ᾱ_j = ᾱ_{t=M-1-j}, ᾱ_M = 1 and
    M = T; then u_j = sqrt(1/ᾱ_t - 1) at t = M-1-j, the σ the model was trained with.
    """
    if alphas_cumprod is None:
        alpha_bar = np.sin(0.5 * np.pi * np.arange(M + 1) / (M * (C2 + 1))) ** 2
    else:
        table = np.asarray(alphas_cumprod, dtype=np.float64)
        M, alpha_bar = len(table), np.append(table[::-1], 1.0)
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C1) - 1)
    return u


def iddpm_sigmas(n: int, alphas_cumprod: Optional[Sequence[float]] = None, j0: int = 8,
                 C1: float = 0.001, C2: float = 0.008, M: int = 1000) -> np.ndarray:
    """EDM Table 1, iDDPM + DDIM: σ_{i<N} = u_{⌊j0 + (M-1-j0)/(N-1)·i + ½⌋}, σ_N = 0. [n+1]

    u as in `iddpm_u` (M = len(alphas_cumprod) when a table is given). j0 = 8 is EDM's choice
    (iDDPM used j0 = 0).
    """
    u = iddpm_u(alphas_cumprod, C1, C2, M)
    M = len(u) - 1
    _check_levels(n, 1.0, 2.0)
    if not 0 <= j0 < M:
        raise UsageError(f"j0 must lie in [0, {M}), got {j0}")
    i = np.arange(n)
    j = np.floor(j0 + (M - 1 - j0) / max(n - 1, 1) * i + 0.5).astype(np.int64)
    return np.append(u[j], 0.0)


def _check_levels(n, sigma_min, sigma_max):
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"the number of sampling steps must be a positive integer, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise UsageError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")


# σ(t) and s(t) of the general probability-flow ODE (EDM eq. 4, Table 1 "Schedule", "Scaling"),
# for EDM Algorithm 1. t, σ may be floats or numpy arrays.

class EDMODE:
    """σ(t) = t, s(t) = 1 (EDM, and DDIM)."""
    def sigma(self, t): return t
    def sigma_dot(self, t): return np.ones_like(t)
    def sigma_inv(self, sigma): return sigma
    def s(self, t): return np.ones_like(t)
    def s_dot(self, t): return np.zeros_like(t)


class VEODE(EDMODE):
    """σ(t) = sqrt(t), s(t) = 1 (Song et al.'s VE ODE)."""
    def sigma(self, t): return np.sqrt(t)
    def sigma_dot(self, t): return 0.5 / np.sqrt(t)
    def sigma_inv(self, sigma): return np.square(sigma)


class VPODE:
    """σ(t) = sqrt(e^{½β_d t² + β_min t} - 1), s(t) = 1/sqrt(e^{½β_d t² + β_min t}) (Song et al.'s
    VP ODE; β_d = 19.9, β_min = 0.1 as in EDM Table 1)."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1):
        self.beta_d, self.beta_min = beta_d, beta_min

    def sigma(self, t):
        return np.sqrt(np.expm1(0.5 * self.beta_d * np.square(t) + self.beta_min * t))

    def sigma_dot(self, t):
        sigma = self.sigma(t)
        return 0.5 * (self.beta_d * t + self.beta_min) * (sigma + 1 / sigma)

    def sigma_inv(self, sigma):
        return (np.sqrt(self.beta_min ** 2 + 2 * self.beta_d * np.log1p(np.square(sigma)))
                - self.beta_min) / self.beta_d

    def s(self, t):
        return 1 / np.sqrt(1 + np.square(self.sigma(t)))

    def s_dot(self, t):
        return -self.sigma(t) * self.sigma_dot(t) * self.s(t) ** 3

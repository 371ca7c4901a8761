"""σ-space samplers: one signature, many solvers (k-diffusion's contract, EDM's formulas).

Every sampler is a free function

    sampler(denoiser, x, sigmas, *, generator=None, callback=None, model_kwargs=None,
            stats=None, **options) -> x at sigmas[-1]

- denoiser: D(x, sigma, **model_kwargs) -> clean estimate, sigma of shape [B] (denoisers.py).
- x: [B, ...] the start at σ_0, i.e. noise * sigmas[0]. The sampler's state keeps x's dtype and
  device (use float64 on CPU for accuracy); the denoiser casts to its own dtype.
- sigmas: the N + 1 decreasing noise levels (numpy, list or tensor; schedules.karras_sigmas ...),
  usually ending in 0. The step to σ = 0 is a plain Euler step (x = D(x; σ_{N-1})).
- generator: None, a torch.Generator, or one per batch row (rng.py): with a list, row i's
  result depends only on its own generator, whatever the batch.
- callback(dict(i, sigma, x, denoised, nfe)) after step i, with x at sigma = sigmas[i + 1].
- stats: a dict the sampler fills: "nfe" is the number of denoiser calls of this run (one
  batched call is one network function evaluation); `adaptive` adds per-row step counts.

The probability-flow ODE with σ(t) = t, s(t) = 1 is dx/dσ = (x - D(x; σ))/σ (EDM eq. 4);
`heun_general` runs EDM Algorithm 1 for any σ(t), s(t) (schedules.VPODE, VEODE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Tuple

import torch

from ..errors import UsageError
from ..rng import Generator, randn_like
from ..diffusion.schedules import VPODE

__all__ = ["NFECounter", "to_d", "ancestral_step", "euler", "heun", "heun_general",
           "euler_ancestral", "ddim", "dpmpp_2m", "adaptive", "SamplerSpec", "REGISTRY", "SAMPLERS",
           "SAMPLER_NAMES", "get_spec", "sampler_help"]


class NFECounter:
    """Wraps a denoiser (or any network callable) and counts its calls in stats["nfe"]
    (reset to 0 on creation); one batched call is one network function evaluation."""

    def __init__(self, fn, stats: Optional[dict] = None):
        self.fn, self.stats = fn, ({} if stats is None else stats)
        self.stats["nfe"] = 0

    def __call__(self, *args, **kwargs):
        self.stats["nfe"] += 1
        return self.fn(*args, **kwargs)

    @property
    def nfe(self) -> int:
        return self.stats["nfe"]


class _Denoiser:
    """The denoiser as samplers call it: D(x, σ) with σ a float or a [B] tensor, the
    conditioning bound and the calls counted."""

    def __init__(self, denoiser, model_kwargs, stats):
        self.counter, self.cond = NFECounter(denoiser, stats), model_kwargs or {}

    def __call__(self, x, sigma):
        if not torch.is_tensor(sigma):
            sigma = x.new_full((x.shape[0],), sigma)
        return self.counter(x, sigma, **self.cond)

    def report(self, callback, i, sigma, x, denoised):
        if callback is not None:
            callback(dict(i=i, sigma=sigma, x=x, denoised=denoised, nfe=self.counter.nfe))


def _setup(denoiser, sigmas, model_kwargs, stats):
    """(D, sigmas as a list of Python floats), checking that the levels decrease to >= 0."""
    levels = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
    if len(levels) < 2 or levels[-1] < 0 or any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sigmas must be 2 or more levels decreasing to >= 0, got {levels}")
    return _Denoiser(denoiser, model_kwargs, stats), levels


def to_d(x, sigma, denoised):
    """dx/dσ = (x - D(x; σ))/σ: the ODE with σ(t) = t, s(t) = 1 (EDM Algorithm 1, line 4)."""
    return (x - denoised) / sigma


def _churn(x, sigma, n, churn, tmin, tmax, noise_scale, generator):
    """EDM Algorithm 2, lines 3-6: raise σ_i to σ̂ = σ_i(1 + γ_i), adding noise of std
    S_noise·sqrt(σ̂² - σ_i²), with γ_i = min(S_churn/N, √2 - 1) if σ_i ∈ [S_tmin, S_tmax], else 0."""
    gamma = min(churn / n, math.sqrt(2) - 1) if tmin <= sigma <= tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + randn_like(x, generator) * noise_scale * math.sqrt(sigma_hat ** 2 - sigma ** 2)
    return x, sigma_hat


@torch.no_grad()
def euler(denoiser, x, sigmas, *, generator: Generator = None, callback=None,
          model_kwargs=None, stats=None, churn=0.0, tmin=0.0, tmax=float("inf"), noise_scale=1.0):
    """Euler's method on dx/dσ = (x - D)/σ (EDM Table 1: the VP, VE and DDIM solver), with
    Algorithm 2's churn when churn > 0. N steps, N NFE."""
    D, sigmas = _setup(denoiser, sigmas, model_kwargs, stats)
    n = len(sigmas) - 1
    for i, sigma_next in enumerate(sigmas[1:]):
        x, sigma_hat = _churn(x, sigmas[i], n, churn, tmin, tmax, noise_scale, generator)
        denoised = D(x, sigma_hat)
        x = x + (sigma_next - sigma_hat) * to_d(x, sigma_hat, denoised)
        D.report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def heun(denoiser, x, sigmas, *, generator: Generator = None, callback=None,
         model_kwargs=None, stats=None, churn=0.0, tmin=0.0, tmax=float("inf"), noise_scale=1.0):
    """EDM's sampler: Heun's 2nd order method on dx/dσ = (x - D)/σ, an Euler step on the last
    step to σ = 0 (Algorithm 1 with σ(t) = t, s(t) = 1: N steps, 2N - 1 NFE); churn > 0 makes
    it the stochastic Algorithm 2 (S_churn = churn, S_tmin, S_tmax, S_noise = noise_scale)."""
    D, sigmas = _setup(denoiser, sigmas, model_kwargs, stats)
    n = len(sigmas) - 1
    for i, sigma_next in enumerate(sigmas[1:]):
        x_hat, sigma_hat = _churn(x, sigmas[i], n, churn, tmin, tmax, noise_scale, generator)
        denoised = D(x_hat, sigma_hat)
        d = to_d(x_hat, sigma_hat, denoised)
        x = x_hat + (sigma_next - sigma_hat) * d                    # Euler step (line 8)
        if sigma_next != 0:                                         # trapezoidal rule (9-11)
            denoised = D(x, sigma_next)
            x = x_hat + (sigma_next - sigma_hat) * (d + to_d(x, sigma_next, denoised)) / 2
        D.report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def heun_general(denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                 model_kwargs=None, stats=None, ode=VPODE()):
    """EDM Algorithm 1 with arbitrary σ(t) and s(t) (`ode`: schedules.VPODE, VEODE, EDMODE),
    stepping in t_i = σ^{-1}(σ_i). x and the result are unscaled (x̂ = x/s(t), the contract of
    every sampler); the ODE state is s(t)·x̂. N steps, 2N - 1 NFE."""
    D, sigmas = _setup(denoiser, sigmas, model_kwargs, stats)
    ts = [float(ode.sigma_inv(sigma)) for sigma in sigmas]

    def dxdt(x, t, sigma):  # Algorithm 1, line 4
        sigma_dot, s, s_dot = float(ode.sigma_dot(t)), float(ode.s(t)), float(ode.s_dot(t))
        denoised = D(x / s, sigma)
        return (sigma_dot / sigma + s_dot / s) * x - sigma_dot * s / sigma * denoised, denoised

    x = x * float(ode.s(ts[0]))
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d, denoised = dxdt(x, t, sigmas[i])
        x_next = x + (t_next - t) * d                               # Euler step (line 5)
        if sigmas[i + 1] != 0:                                      # trapezoidal rule (6-8)
            d_prime, denoised = dxdt(x_next, t_next, sigmas[i + 1])
            x_next = x + (t_next - t) * (d + d_prime) / 2
        x = x_next
        D.report(callback, i, sigmas[i + 1], x / float(ode.s(t_next)), denoised)
    return x / float(ode.s(ts[-1]))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0):
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next²: move deterministically to σ_down, then add
    fresh noise of std σ_up = η·sqrt(σ_next²(σ² - σ_next²)/σ²). This σ_up is DDIM's σ_t(η)
    (Song et al. eq. 16) in σ-space; η = 1 is DDPM's ancestral step (k-diffusion)."""
    sigma_up = min(sigma_next,
                   eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


@torch.no_grad()
def euler_ancestral(denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                    model_kwargs=None, stats=None, eta=1.0, noise_scale=1.0):
    """Ancestral sampling: an Euler step to σ_down, then noise σ_up·S_noise·z (`ancestral_step`).
    N steps, N NFE."""
    D, sigmas = _setup(denoiser, sigmas, model_kwargs, stats)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = D(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * to_d(x, sigma, denoised)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * noise_scale * sigma_up
        D.report(callback, i, sigma_next, x, denoised)
    return x


def ddim(denoiser, x, sigmas, *, generator: Generator = None, callback=None,
         model_kwargs=None, stats=None, eta=0.0, noise_scale=1.0):
    """DDIM (Song et al. eq. 12) in σ-space. With x = x_t/sqrt(ᾱ_t) and σ_t = sqrt(1/ᾱ_t - 1),
    DDIM's update x_{t-1} = sqrt(ᾱ_{t-1})·x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t(η)²)·ε̂ + σ_t(η)·z becomes
    x' = D + σ_down·(x - D)/σ + σ_up·z: an Euler step to σ_down plus noise σ_up, which is
    `euler_ancestral` with η (and η = 0 is `euler`). N steps, N NFE."""
    return euler_ancestral(denoiser, x, sigmas, generator=generator, callback=callback,
                           model_kwargs=model_kwargs, stats=stats, eta=eta, noise_scale=noise_scale)


@torch.no_grad()
def dpmpp_2m(denoiser, x, sigmas, *, generator: Generator = None, callback=None,
             model_kwargs=None, stats=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion's formulation) in λ = -log σ:
    x' = (σ'/σ)·x - (e^{-h} - 1)·D̂, h = λ' - λ, with D̂ = (1 + 1/2r)·D_i - (1/2r)·D_{i-1},
    r = h_{i-1}/h_i (D̂ = D_i on the first step and on the last step to σ = 0). N steps, N NFE."""
    D, sigmas = _setup(denoiser, sigmas, model_kwargs, stats)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = D(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            D_hat = denoised
            if old_denoised is not None:
                r = h_last / h
                D_hat = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * D_hat
            old_denoised, h_last = denoised, h
        D.report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def adaptive(denoiser, x, sigmas, *, generator: Generator = None, callback=None,
             model_kwargs=None, stats=None, rtol=0.05, atol=0.0078, h_init=0.05, safety=0.9,
             max_nfe=10000):
    """Adaptive steps: the embedded Heun-Euler 2(1) pair on dx/ds = x - D(x; e^s), s = log σ,
    from σ_0 = sigmas[0] down to the last nonzero level of `sigmas` (the levels between are
    ignored), then an Euler step to σ = 0 when sigmas ends in 0.

    Each row of the batch has its own step size h (so row i does not depend on the batch): a
    step is accepted when err = RMS((x_Heun - x_Euler) / (atol + rtol·max(|x|, |x_Heun|))) <= 1,
    the Heun result is kept, and h is scaled by clamp(safety·err^{-1/2}, 0.2, 5) (Hairer,
    Nørsett & Wanner I, II.4). atol = 0.0078 is one 8-bit level of a [-1, 1] image, rtol and
    h_init (in log σ) as in k-diffusion's dpm_solver_adaptive. Two NFE per attempted step; stats
    gets "accepted" and "rejected", the per-row step counts; the callback's sigma is per row [B].
    """
    D, sigmas = _setup(denoiser, sigmas, model_kwargs, stats)
    B, shape = x.shape[0], (-1,) + (1,) * (x.ndim - 1)
    s_end = math.log(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1])
    s = x.new_full((B,), math.log(sigmas[0]))
    h = x.new_full((B,), -abs(h_init))
    done = s <= s_end
    accepted, rejected = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    i = 0
    while not done.all():
        if D.counter.nfe >= max_nfe:
            raise UsageError(f"adaptive sampler: no convergence within {max_nfe} network "
                             f"evaluations: loosen --rtol/--atol (defaults 0.05, 0.0078)")
        h = torch.where(done, torch.zeros_like(h), torch.maximum(h, s_end - s))
        denoised = D(x, s.exp())
        k1 = x - denoised                                            # dx/ds at (x, s)
        x_euler = x + h.reshape(shape) * k1
        k2 = x_euler - D(x_euler, (s + h).exp())
        x_heun = x + (h / 2).reshape(shape) * (k1 + k2)
        scale = atol + rtol * torch.maximum(x.abs(), x_heun.abs())
        err = ((x_heun - x_euler) / scale).pow(2).flatten(1).mean(1).sqrt()
        err = torch.nan_to_num(err, nan=float("inf"))
        accept = (err <= 1) & ~done
        x = torch.where(accept.reshape(shape), x_heun, x)
        done = done | (accept & (h <= s_end - s))                     # h was cut to reach s_end
        s = torch.where(accept, torch.where(done, torch.full_like(s, s_end), s + h), s)
        accepted += accept.cpu()
        rejected += (~accept & ~done).cpu()
        h = h * (safety * err.clamp_min(1e-10) ** -0.5).clamp(0.2, 5.0)
        D.report(callback, i, s.exp(), x, denoised)
        i += 1
    if sigmas[-1] == 0:
        x = D(x, math.exp(s_end))                                    # Euler step to σ = 0
    if stats is not None:
        stats.update(accepted=accepted.tolist(), rejected=rejected.tolist())
    return x


# ----------------------------------------------------------------------------- the registry
def _churned(options: dict) -> bool:
    return options.get("churn", 0) > 0


@dataclass(frozen=True)
class SamplerSpec:
    """All the library knows about one sampler, in one place: what `gaussdiff sample --sampler`,
    `Pipeline.sample`, `gaussdiff sweep`, guidance and the CLI help read.

    fn: the σ-space function (the contract of this module's docstring); None for the discrete
        engine's ddpm and ddim (GaussianDiffusion.p_sample_loop / ddim_sample_loop).
    nfe: (a, b) with NFE = a·N + b network evaluations for N steps; None when the sampler
        chooses its own steps (adaptive), which sweeps at fixed NFE then leave out.
    stochastic(options): whether the sampler adds fresh noise with these options (what
        `--temperature-mode noise` scales).
    summary: one line for `--help`.
    Adding a sampler: write its function (module docstring's signature), add a SamplerSpec to
    REGISTRY; tests/test_samplers.py checks every entry's NFE formula by counting calls.
    """
    name: str
    summary: str
    fn: Optional[Callable] = None
    nfe: Optional[Tuple[int, int]] = (1, 0)
    stochastic: Callable[[dict], bool] = field(default=lambda options: False)

    @property
    def discrete(self) -> bool:
        return self.fn is None


REGISTRY = {spec.name: spec for spec in (
    SamplerSpec("ddpm", "ancestral sampling, the discrete engine (DDPM; learned variances)",
                stochastic=lambda options: True),
    SamplerSpec("ddim", "DDIM, the discrete engine (--eta; 0, the default, is deterministic)",
                stochastic=lambda options: bool(options.get("eta"))),
    SamplerSpec("euler", "Euler on the probability-flow ODE (--churn: EDM Algorithm 2)", euler,
                stochastic=_churned),
    SamplerSpec("heun", "EDM's Heun sampler, 2N - 1 NFE (--churn: EDM Algorithm 2)", heun, (2, -1),
                stochastic=_churned),
    SamplerSpec("heun_vp", "Heun in VP time t, EDM Algorithm 1 with the VP ODE", partial(heun_general, ode=VPODE()),
                (2, -1)),
    SamplerSpec("euler_ancestral", "Euler steps plus ancestral noise (--eta, default 1)", euler_ancestral,
                stochastic=lambda options: options.get("eta", 1) > 0),
    SamplerSpec("ddim_sigma", "DDIM in σ-space (--eta, default 0)", ddim,
                stochastic=lambda options: options.get("eta", 0) > 0),
    SamplerSpec("dpmpp_2m", "DPM-Solver++(2M), multistep 2nd order", dpmpp_2m),
    SamplerSpec("adaptive", "adaptive-step Heun with error control (--rtol, --atol)", adaptive, None),
)}

# What Pipeline.sample and `gaussdiff sample --sampler` accept, and the σ-space functions by name.
SAMPLER_NAMES = tuple(REGISTRY)
SAMPLERS = {name: spec.fn for name, spec in REGISTRY.items() if not spec.discrete}


def get_spec(name: str, flag: Optional[str] = "--sampler") -> SamplerSpec:
    """The registry entry of `name`; otherwise a UsageError naming `flag` (or, with flag None,
    the name alone) and the choices."""
    if name not in REGISTRY:
        what = f"{flag} {name}: unknown sampler" if flag else f"unknown sampler {name!r}"
        raise UsageError(f"{what}, choose one of {', '.join(SAMPLER_NAMES)}")
    return REGISTRY[name]


def sampler_help() -> str:
    """The --sampler help text, from the registry."""
    return "; ".join(f"{name}: {spec.summary}" for name, spec in REGISTRY.items())

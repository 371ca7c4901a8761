"""Exact likelihood of the probability-flow ODE: `gaussdiff nll --ode`.

Song et al. 2021 ("Score-Based Generative Modeling through SDEs", section 4.3 and appendix D.2)
in EDM's σ-space (Karras et al. 2022, eq. 4): with x_σ = x_0 + σ·n the probability-flow ODE is

    dx/dσ = f(x, σ) = (x − D(x; σ))/σ,

and along a solution the instantaneous change of variables (Chen et al. 2018, NODE theorem 1)
gives d log p_σ(x(σ))/dσ = −∇·f(x(σ), σ). Integrating from σ_min to σ_max:

    log p_{σ_min}(x(σ_min)) = log p_{σ_max}(x(σ_max)) + ∫_{σ_min}^{σ_max} ∇·f dσ,

with the prior p_{σ_max} ≈ N(0, σ_max² I). We integrate in s = log σ (scale-free steps):

    dx/ds = x − D(x; e^s),     d(Δ log p)/ds = σ·∇·f = d − ∇_x·D(x; e^s),      d = dim(x).

∇_x·D is Hutchinson's estimate (1/K)·Σ_k ε_kᵀ (∂D/∂x) ε_k with K fixed probes per image
(Rademacher or Gaussian, drawn once, as Song et al.), each a vector-Jacobian product; or the
exact trace (d products: tiny dimensions only). The integrator is scipy's RK45 (rtol = atol =
1e-5, Song et al.'s) or Heun's method on `steps` steps, EDM's ρ = 7 levels between σ_min and σ_max.

σ-space models use their preconditioned denoiser; discrete-time models the DiscreteDenoiser
wrapper (x = x_t/sqrt(ᾱ_t), so no s(t) scaling appears in the ODE and p_σ is a density of the
unscaled data variable). The data point is taken as a sample of p_{σ_min}, the noise level the
integration starts from (default max(0.002, the model's smallest σ): EDM's σ_min; a discrete
model knows no σ below its σ_0 = sqrt(β_0/(1 − β_0))), as Song et al. start at t = ε.

Dequantization and bits/dim (Song et al.'s convention, score_sde's likelihood.py): pixel values
k ∈ {0..255} become z = 2(k + u)/256 − 1 ∈ [-1, 1) with u ~ U(0, 1)^d, so pixel k owns the bin
[2k/256 − 1, 2(k+1)/256 − 1) of width 2/256. Then P(k) = ∫_bin p(z) dz = (2/256)^d·E_u p(z), and
by Jensen −log P(k) ≤ −E_u log p(z) − d·log(2/256), so per dimension in bits

    bpd = (−log p(z) − d·log(2/256)) / (d·ln 2) = −log p(z)/(d·ln 2) + 7,

an upper bound on the discrete NLL (in expectation over u); a uniform density on [-1, 1]^d gives
8 bits. (gaussdiff's discrete decoder uses bins of width 2/255 centred on k/127.5 − 1; the ODE
follows Song et al. so that its numbers compare with theirs.)
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion.schedules import karras_sigmas
from ..errors import UsageError
from .likelihood import mean_stderr
from ..rng import Generator, image_generators, randn
from ..sampling.denoisers import pipeline_denoiser

PROBES = ("rademacher", "gaussian")
LOG_BIN = math.log(2 / 256)   # log of the dequantization bin width in [-1, 1]


def dequantize(images_u8: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """uint8 NHWC [B, H, W, C] -> z = 2(k + u)/256 − 1 in [-1, 1), float64 NCHW, u ~ U(0, 1)
    (one generator per row gives per-image noise)."""
    k = images_u8.permute(0, 3, 1, 2).to(torch.float64)
    gens = [generator] * len(k) if not isinstance(generator, (list, tuple)) else generator
    u = torch.stack([torch.rand(k.shape[1:], generator=g, dtype=torch.float64) for g in gens])
    return 2 * (k + u.to(k.device)) / 256 - 1


def bpd_from_logp(logp, dim: int):
    """Bits/dim of the 256-bin discrete data from the continuous log density (nats) of the
    dequantized point in [-1, 1]^dim: (−log p − dim·log(2/256))/(dim·ln 2)."""
    return (-logp - dim * LOG_BIN) / (dim * math.log(2))


def gaussian_prior_logp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; 0, σ² I) per row of x [B, ...] -> [B]."""
    d = x[0].numel()
    return -0.5 * d * math.log(2 * math.pi * sigma ** 2) - x.flatten(1).pow(2).sum(1) / (2 * sigma ** 2)


def draw_probes(shape, num: int, kind: str = "rademacher", generator: Generator = None,
                dtype=torch.float64, device=None) -> torch.Tensor:
    """`num` Hutchinson probes per row: [num, B, ...], E[ε εᵀ] = I (entries ±1 or N(0, 1))."""
    if kind not in PROBES:
        raise UsageError(f"unknown probe {kind!r}: choose one of {', '.join(PROBES)}")
    eps = torch.stack([randn(shape, generator, dtype=dtype) for _ in range(num)])
    if kind == "rademacher":
        eps = torch.where(eps >= 0, 1.0, -1.0).to(dtype)   # the sign of a normal: ±1 equally
    return eps.to(device)


def divergence(out: torch.Tensor, x: torch.Tensor, probes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∇_x·g per row [B] of out = g(x) (computed with x.requires_grad and rows independent):
    (1/K)·Σ_k ε_kᵀ J ε_k for probes [K, B, ...] (K vector-Jacobian products), or the exact
    trace Σ_j (e_jᵀ J e_j) when probes is None (one product per dimension)."""
    flat = x[0].numel()
    if probes is not None:
        total = 0
        for i, eps in enumerate(probes):
            vjp, = torch.autograd.grad(out, x, eps, retain_graph=i < len(probes) - 1)
            total = total + (vjp * eps).flatten(1).sum(1)
        return total / len(probes)
    diag = []
    for j in range(flat):
        e = torch.zeros_like(x).flatten(1)
        e[:, j] = 1
        vjp, = torch.autograd.grad(out, x, e.view_as(x), retain_graph=j < flat - 1)
        diag.append(vjp.flatten(1)[:, j])
    return torch.stack(diag, 1).sum(1)


def ode_log_likelihood(denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, *,
                       model_kwargs: Optional[dict] = None, steps: Optional[int] = None,
                       rtol: float = 1e-5, atol: float = 1e-5, probes: Optional[torch.Tensor] = None,
                       prior_logp: Optional[Callable] = None, stats: Optional[dict] = None) -> dict:
    """log p_{σ_min}(x) under the probability-flow ODE of `denoiser` (see the module docstring).

    denoiser: D(x, sigma [B], **model_kwargs) -> clean estimate (sampling/denoisers.py).
    x: [B, ...] the points (float64 recommended), taken as samples of p_{σ_min}.
    steps: None for RK45 with rtol/atol (scipy solve_ivp), else Heun with `steps` steps.
    probes: [K, B, ...] Hutchinson probes (draw_probes), fixed over the trajectory; None for
        the exact trace.
    prior_logp(x_max, sigma_max) -> [B]: the log density at σ_max (default N(0, σ_max² I)).
    stats: receives "nfe", the ODE function evaluations (one network forward and K or d
        vector-Jacobian products each).
    Returns dict(logp, prior_logp, delta_logp: [B] in nats, x_max: x(σ_max) [B, ...]) with
    logp = prior_logp + delta_logp, delta_logp = ∫_{σ_min}^{σ_max} ∇·f dσ.
    """
    if not 0 < sigma_min < sigma_max < math.inf:
        raise UsageError(f"the noise levels must satisfy 0 < sigma_min < sigma_max < inf, "
                         f"got {sigma_min}, {sigma_max}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise UsageError(f"--steps must be a positive integer for --ode, got {steps!r}")
    if rtol <= 0 or atol <= 0:
        raise UsageError(f"--rtol and --atol must be positive, got {rtol}, {atol}")
    cond = model_kwargs or {}
    B, shape, d = x.shape[0], x.shape, x[0].numel()
    nfe = 0

    def field(x, s):
        """(dx/ds, d(Δ log p)/ds) at log σ = s: (x − D, d − ∇·D)."""
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            D = denoiser(x, x.new_full((B,), math.exp(s)), **cond)
            div = divergence(D, x, probes)
        return (x - D).detach(), d - div.detach()

    s0, s1 = math.log(sigma_min), math.log(sigma_max)
    if steps is None:
        from scipy.integrate import solve_ivp   # lazy: scipy.integrate costs ~530 ms at start-up (measured)

        def fun(s, y):
            dx, ddelta = field(torch.from_numpy(y[:-B]).to(x).view(shape), s)
            return np.concatenate([dx.double().cpu().numpy().ravel(), ddelta.double().cpu().numpy()])

        y0 = np.concatenate([x.detach().double().cpu().numpy().ravel(), np.zeros(B)])
        sol = solve_ivp(fun, (s0, s1), y0, method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"the ODE solver failed: {sol.message}")
        y = torch.from_numpy(sol.y[:, -1])
        x_max, delta = y[:-B].to(x).view(shape), y[-B:].to(x.device)
    else:
        levels = np.log(karras_sigmas(steps + 1, sigma_min, sigma_max)[:-1][::-1])  # ascending
        x_max, delta = x.detach(), torch.zeros(B, dtype=torch.float64, device=x.device)
        for s, s_next in zip(levels[:-1], levels[1:]):
            h = float(s_next - s)
            dx, dd = field(x_max, float(s))
            x_euler = x_max + h * dx
            dx2, dd2 = field(x_euler, float(s_next))   # trapezoidal rule (EDM Algorithm 1)
            x_max = x_max + h * (dx + dx2) / 2
            delta = delta + h * (dd + dd2).double() / 2
    prior = (prior_logp or gaussian_prior_logp)(x_max, sigma_max).double()
    if stats is not None:
        stats["nfe"] = nfe
    delta = delta.double()
    return dict(logp=prior + delta, prior_logp=prior, delta_logp=delta, x_max=x_max)


def default_sigma_range(denoiser, sigma_min=None, sigma_max=None):
    """(σ_min, σ_max): max(0.002, the model's smallest σ) and the model's largest σ (80, EDM's,
    for a preconditioner without one), unless given."""
    lo = max(0.002, float(denoiser.sigma_min)) if sigma_min is None else float(sigma_min)
    if sigma_max is not None:
        return lo, float(sigma_max)
    hi_model = float(denoiser.sigma_max)
    hi = hi_model if math.isfinite(hi_model) else 80.0
    return lo, hi


def evaluate_ode_nll(pipe, images: np.ndarray, labels: Optional[np.ndarray] = None, *,
                     steps: Optional[int] = None, rtol: float = 1e-5, atol: float = 1e-5,
                     hutchinson_samples: int = 1, probe: str = "rademacher",
                     exact_trace: bool = False, sigma_min: Optional[float] = None,
                     sigma_max: Optional[float] = None, batch_size: int = 16, seed: int = 0,
                     progress: bool = True, tolerance: float = 0.01) -> dict:
    """The probability-flow ODE NLL in bits/dim of uint8 NHWC images under a loaded Pipeline
    (σ-space or discrete-time). Image i's dequantization noise, then its probes, come from
    the generator of seed_for(seed, i). With Heun (`steps`) image i's value depends only on
    (seed, i); RK45 chooses its steps for the whole batch, so a value moves with the batch
    within the tolerance.

    A fixed-step run checks its own convergence: every batch is integrated again with
    steps // 2 steps (same dequantization and probes, 1.5x the work), and as Heun's error is
    O(h²), bpd(N) − bpd(N/2) ≈ −3·error(N). "convergence" holds both means and that estimate;
    "converged" is whether |estimate| <= `tolerance` bits/dim (a warning goes to stderr if not).
    The mean over the images (not each image) is what is checked: the Hutchinson noise of a
    single image is much larger than the discretisation error and cancels in the difference.

    Returns a JSON-ready dict: bpd (mean, stderr), nfe (mean per batch and per batch),
    settings, per_image {bpd, logp, prior_logp, delta_logp} (log densities in nats in [-1, 1]),
    and for fixed steps convergence and converged.
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be positive")
    if hutchinson_samples < 1:
        raise UsageError(f"--hutchinson-samples must be positive, got {hutchinson_samples}")
    if probe not in PROBES:
        raise UsageError(f"--probe {probe!r}: choose one of {', '.join(PROBES)}")
    if pipe.task != "generate":
        raise UsageError(f"{pipe.path or 'this model'} is an upsampler: --ode needs a generative model")
    C, H, W = pipe.image_shape
    if images.shape[1:] != (H, W, C):
        raise UsageError(f"the data has images of shape {images.shape[1:]} (HWC), "
                         f"the model expects {(H, W, C)}")
    denoiser = pipeline_denoiser(pipe)
    lo, hi = default_sigma_range(denoiser, sigma_min, sigma_max)
    device = next(pipe.model.parameters()).device
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    pipe.model.eval()
    d = C * H * W
    per = {"bpd": [], "logp": [], "prior_logp": [], "delta_logp": []}
    nfes, coarse_bpd = [], []
    coarse = None if steps is None else max(1, steps // 2)
    bar = tqdm(total=len(images), unit="img", disable=not progress,
               desc=f"nll --ode ({'rk45' if steps is None else f'heun {steps}'})")
    for start in range(0, len(images), batch_size):
        idx = range(start, min(start + batch_size, len(images)))
        gens = image_generators(seed, idx)
        z = dequantize(torch.from_numpy(images[start:idx.stop]), gens).to(device, dtype)
        probes = None if exact_trace else draw_probes(z.shape, hutchinson_samples, probe, gens,
                                                      dtype=dtype, device=device)
        kwargs = {}
        if pipe.num_classes is not None:
            if labels is None:
                raise UsageError("the model is class-conditional: the data needs labels")
            kwargs["y"] = torch.from_numpy(labels[start:idx.stop]).to(device)
        stats = {}
        out = ode_log_likelihood(denoiser, z, lo, hi, model_kwargs=kwargs, steps=steps,
                                 rtol=rtol, atol=atol, probes=probes, stats=stats)
        nfes.append(stats["nfe"])
        if coarse is not None:
            half = ode_log_likelihood(denoiser, z, lo, hi, model_kwargs=kwargs, steps=coarse,
                                      probes=probes)
            coarse_bpd += bpd_from_logp(half["logp"].cpu(), d).tolist()
        for key in ("logp", "prior_logp", "delta_logp"):
            per[key] += out[key].cpu().tolist()
        per["bpd"] += bpd_from_logp(out["logp"].cpu(), d).tolist()
        bar.update(len(idx))
    bar.close()
    extra = {}
    if coarse is not None:
        fine_mean, coarse_mean = float(np.mean(per["bpd"])), float(np.mean(coarse_bpd))
        error = (coarse_mean - fine_mean) / 3   # Richardson: e(N/2) ≈ 4·e(N) for a 2nd-order method
        extra = {"convergence": {"steps": steps, "bpd": fine_mean, "half_steps": coarse,
                                 "half_steps_bpd": coarse_mean, "estimated_error": error,
                                 "tolerance": tolerance},
                 "converged": abs(error) <= tolerance}
        if not extra["converged"]:
            print(f"warning: nll --ode --steps {steps} has not converged: {coarse} steps give "
                  f"{coarse_mean:.3f} bits/dim, {steps} give {fine_mean:.3f} (estimated error "
                  f"{abs(error):.3f} > {tolerance}); use more --steps or leave --steps out (RK45)",
                  file=sys.stderr)
    return {
        "bpd": mean_stderr(per["bpd"]),
        "num": len(images),
        "nfe": {"mean": float(np.mean(nfes)), "per_batch": nfes},
        "settings": {"solver": "rk45" if steps is None else "heun", "steps": steps,
                     "rtol": rtol if steps is None else None,
                     "atol": atol if steps is None else None,
                     "sigma_min": lo, "sigma_max": hi, "divergence": "exact" if exact_trace
                     else f"hutchinson ({hutchinson_samples} {probe} probe"
                          f"{'s' if hutchinson_samples > 1 else ''})",
                     "dequantization": "uniform: z = 2(k + u)/256 - 1, bpd = -log p(z)/(D ln 2) + 7",
                     "batch_size": batch_size},
        **extra,
        "per_image": per,
    }

"""Denoisers: the one contract every σ-space sampler uses.

A denoiser is any callable `D(x, sigma, **cond) -> clean estimate` (EDM's D(x; σ)):
x is the noisy sample [B, ...] = x_0 + σ·n (no s(t) scaling), sigma has shape [B], the result
has x's shape and dtype. `DiscreteDenoiser` adapts a discrete-time network (ε, x0 or v output,
learned-variance channels ignored) trained with a ᾱ table to this contract.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..diffusion.process import MEAN_TYPES, _check_choice
from ..errors import UsageError


class DiscreteDenoiser:
    """D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; t(σ)) for a network F trained in discrete
    time on the table ᾱ_t, t = 0..T-1 (EDM section 5 and Table 1, "iDDPM" column).

    Args:
        model: F(x_t, t, **cond) -> [B, C or 2C, ...]; only the first C channels are used.
        alphas_cumprod: ᾱ_t of the model's ORIGINAL T steps (decreasing), float64 [T].
        mean_type: what F predicts: "eps", "x0" or "v" (sqrt(ᾱ)ε - sqrt(1-ᾱ)x0).
        quantize: give F the integer index of the nearest discrete level (nearest in log σ)
            instead of a fractional t interpolated in log σ over the table.
        dtype: the dtype F is called in; default: its first parameter's (else x's) dtype.

    A discrete level σ_t = sqrt((1 - ᾱ_t)/ᾱ_t) holds x = x_t/sqrt(ᾱ_t), so F sees
    c_in·x = x/sqrt(1 + σ²) = x_t, and at σ = σ_t the denoiser reproduces the discrete model
    exactly. Conditioning kwargs (`y=...`) go to F unchanged.
    """

    def __init__(self, model, alphas_cumprod: Sequence[float], mean_type: str = "eps", *,
                 quantize: bool = False, dtype: Optional[torch.dtype] = None):
        _check_choice("mean type", mean_type, MEAN_TYPES)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.model, self.mean_type, self.quantize = model, mean_type, bool(quantize)
        # the discrete levels σ_t, t = 0..T-1 (increasing)
        self.sigmas = torch.from_numpy(np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod))
        self.log_sigmas = self.sigmas.log()
        if dtype is None and isinstance(model, torch.nn.Module):
            dtype = next((p.dtype for p in model.parameters()), None)
        self.dtype = dtype

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "DiscreteDenoiser":
        """The denoiser of a loaded model directory (`gaussdiff.load(path)`)."""
        diffusion = pipe.diffusion
        if diffusion.num_timesteps != diffusion.original_num_steps:
            raise ValueError("the pipeline's diffusion must not be respaced")
        return cls(pipe.model, diffusion.alphas_cumprod, diffusion.mean_type, **kwargs)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model timestep of noise levels sigma [B]: long indices when quantized, else
        fractional t in [0, T-1] by linear interpolation in log σ (clamped at the ends)."""
        log_sigma = sigma.detach().to(torch.float64).log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        if self.quantize:
            return (log_sigma[:, None] - log_sigmas[None]).abs().argmin(dim=1)
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        w = ((log_sigma - log_sigmas[hi - 1]) / (log_sigmas[hi] - log_sigmas[hi - 1])).clamp(0, 1)
        return hi - 1 + w

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """x [B, C, ...] at noise levels sigma [B] -> the clean estimate, in x's dtype."""
        t = self.sigma_to_t(sigma.reshape(-1))
        sigma = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        # EDM Table 1 (σ_data = 1): c_in = 1/sqrt(σ² + 1); eps: c_skip = 1, c_out = -σ;
        # x0: c_skip = 0, c_out = 1; v: c_skip = 1/(σ² + 1), c_out = -σ/sqrt(σ² + 1)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_skip, c_out = {"eps": (1, -sigma), "x0": (0, 1),
                         "v": (c_in ** 2, -sigma * c_in)}[self.mean_type]
        dtype = self.dtype or x.dtype
        F = self.model((c_in * x).to(dtype), t if self.quantize else t.to(dtype), **cond)
        return c_skip * x + c_out * F[:, :x.shape[1]].to(x.dtype)


class ClipDenoised:
    """D'(x, σ) = clamp(D(x, σ), lo, hi): the discrete samplers' clip_denoised for any denoiser
    (with it, DDIM in σ-space equals GaussianDiffusion.ddim_sample_loop's default)."""

    def __init__(self, denoiser, lo: float = -1.0, hi: float = 1.0):
        self.denoiser, self.lo, self.hi = denoiser, lo, hi

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.denoiser(x, sigma, **cond).clamp(self.lo, self.hi)


def pipeline_denoiser(pipe, quantize: bool = False):
    """The denoiser of a loaded model directory: its preconditioned network for σ-space
    objectives (`pipe.denoiser`), else `DiscreteDenoiser.from_pipeline`."""
    if getattr(pipe, "denoiser", None) is not None:
        if quantize:
            raise UsageError(f"{pipe.path or 'this model'} was trained in σ-space: "
                             "quantizing σ to discrete levels applies only to discrete-time models")
        return pipe.denoiser
    return DiscreteDenoiser.from_pipeline(pipe, quantize=quantize)

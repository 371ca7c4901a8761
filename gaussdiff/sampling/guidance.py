"""Steering a diffusion model while it samples: classifier guidance, classifier-free guidance
and temperature (ADM appendices D and I; Ho & Salimans 2022; Kynkäänniemi et al. 2024).

Each piece is a small wrapper, so that every sampler gets it for free:
- the discrete engine (ddpm, ddim): classifier guidance is the loop's `cond_fn`, ADM's hook
  (`GaussianDiffusion.condition_mean` for ddpm: the mean becomes μ + s·Σ·∇ log p_φ(y | x_t),
  Algorithm 1; `condition_score` for ddim: ε̂ = ε − s·sqrt(1 − ᾱ_t)·∇ log p_φ(y | x_t),
  Algorithm 2); classifier-free guidance and ε-temperature wrap the network;
- σ-space samplers (gaussdiff.sampling.samplers): every piece wraps the denoiser D(x, σ, **cond).

Classifier guidance in σ-space. A discrete level holds x = x_t/sqrt(ᾱ_t) with
σ² = (1 − ᾱ_t)/ᾱ_t, and D = x − σ·ε. ADM eq. 60 turns into

    D̂ = x − σ·ε̂ = D + s·σ·sqrt(1 − ᾱ_t)·∇_{x_t} log p_φ(y | x_t),

and as x_t = sqrt(ᾱ_t)·x = x/sqrt(1 + σ²), ∇_x = sqrt(ᾱ_t)·∇_{x_t} and sqrt(1 − ᾱ_t)/sqrt(ᾱ_t) = σ:

    D̂(x; σ) = D(x; σ) + s·σ²·∇_x log p_φ(y | x_t = x/sqrt(1 + σ²), t(σ)),

t(σ) being the classifier's (fractional) timestep of σ on its own ᾱ table. The same follows
from the score: ∇_x log p_σ(x) = (D − x)/σ² (EDM eq. 3), so adding s·∇_x log p(y | x) to the
score moves D by s·σ²·∇_x log p(y | x).

Temperature (ADM section I), τ < 1 for less diversity: "noise" scales the noise each transition
adds by τ (ddpm; ddim and ddim_sigma with eta > 0; S_noise of the stochastic σ-space samplers;
x_T itself is not scaled); "eps" divides ε by τ. The output of every parameterisation is
affine in ε at fixed input, out = A·x + B·ε (A = 0 for ε, 1/sqrt(ᾱ_t) for x0, −sqrt(1/ᾱ_t − 1)
for v, and 1 for a denoiser, D = x − σ·ε), so ε/τ is out' = A·x + (out − A·x)/τ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .denoisers import ClipDenoised
from ..errors import UsageError
from .samplers import get_spec
from ..validate import check_sampling_numbers

TEMPERATURE_MODES = ("noise", "eps")
GRAD_AT = ("x_t", "mean")


def _bc(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] in x's dtype and device."""
    return c.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def classifier_grad(log_prob: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """∇_x log_prob(x, *args, **kwargs) for a per-row log-probability [B]: [B, ...] like x
    (rows do not interact, so the gradient of the sum is each row's own)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        return torch.autograd.grad(log_prob(x_in, *args, **kwargs).sum(), x_in)[0]


class ClassifierCondFn:
    """ADM's cond_fn for the discrete loops: cond_fn(x_t, t, y) = s·∇_{x_t} log p_φ(y | x_t).

    log_prob(x_t, t, y) -> [B]: the classifier's log-probability of labels y at the model's
    (original) timesteps t (`NoisyClassifier.discrete_log_prob`, or any function, e.g. an
    analytic one in tests)."""

    def __init__(self, log_prob: Callable, scale: float):
        self.log_prob, self.scale = log_prob, float(scale)

    def __call__(self, x, t, y=None, **unused):
        if y is None:
            raise UsageError("classifier guidance needs class labels y")
        return self.scale * classifier_grad(self.log_prob, x, t, y)


class ClassifierGuidedDenoiser:
    """D̂(x, σ, y) = D(x, σ, y) + s·σ²·∇_x log p_φ(y | x/sqrt(1 + σ²), t(σ)): classifier
    guidance for every σ-space sampler (derivation in the module docstring).

    sigma_log_prob(x, sigma, y) -> [B]: `NoisyClassifier.sigma_log_prob` or any function."""

    def __init__(self, denoiser, sigma_log_prob: Callable, scale: float):
        self.denoiser, self.sigma_log_prob, self.scale = denoiser, sigma_log_prob, float(scale)

    def __call__(self, x, sigma, y=None, **cond):
        if y is None:
            raise UsageError("classifier guidance needs class labels y")
        D = self.denoiser(x, sigma, y=y, **cond)
        g = classifier_grad(self.sigma_log_prob, x, sigma, y)
        return D + self.scale * _bc(sigma, x) ** 2 * g


class ClassifierFree:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out_w = out_u + w·(out_c − out_u),
    out_c = fn(x, s, y) and out_u = fn(x, s, y=null) of one network trained with label dropout
    (`gaussdiff train --label-dropout P`; null = the label index num_classes).

    fn is a network F(x_t, t, **cond) of the discrete engine or a denoiser D(x, σ, **cond): both
    outputs are affine in ε at fixed x with the same coefficients for out_c and out_u, so mixing
    them mixes ε (and D) exactly as D_w = D_u + w·(D_c − D_u). Only the first C channels mix;
    a learned variance comes from the conditional half.
    interval (lo, hi): guide only where σ ∈ [lo, hi], elsewhere w = 1, the conditional model
    (Kynkäänniemi et al. 2024); sigma_of(s) [B] is σ of fn's second argument.
    The two halves run as one batch of 2B (one network evaluation); w = 1 (or outside the
    interval) runs the conditional half alone, w = 0 the unconditional half alone.
    y may be labels [B] or label weights [B, K] (interpolation; the null label is then one-hot).
    """

    def __init__(self, fn, scale: float, null_label: int,
                 interval: Optional[Tuple[float, float]] = None,
                 sigma_of: Callable = lambda s: s):
        self.fn, self.scale, self.null = fn, float(scale), int(null_label)
        self.interval, self.sigma_of = interval, sigma_of

    def null_like(self, y: torch.Tensor) -> torch.Tensor:
        if y.is_floating_point():
            return F.one_hot(torch.full(y.shape[:1], self.null, device=y.device), y.shape[1]).to(y.dtype)
        return torch.full_like(y, self.null)

    def __call__(self, x, s, y=None, **cond):
        if y is None:
            raise UsageError("classifier-free guidance needs class labels y")
        w = torch.full((x.shape[0],), self.scale, dtype=torch.float64)
        if self.interval is not None:
            sigma = torch.as_tensor(self.sigma_of(s), dtype=torch.float64).cpu().reshape(-1)
            lo, hi = self.interval
            w = torch.where((sigma >= lo) & (sigma <= hi), w, torch.ones_like(w))
        if bool((w == 1).all()):
            return self.fn(x, s, y=y, **cond)
        if bool((w == 0).all()):
            return self.fn(x, s, y=self.null_like(y), **cond)
        B, C = x.shape[0], x.shape[1]
        twice = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and v.shape[0] == B else v
                 for k, v in cond.items()}
        both = self.fn(torch.cat([x, x]), torch.cat([s, s]), y=torch.cat([y, self.null_like(y)]), **twice)
        out_c, out_u = both[:B], both[B:]
        mixed = out_u[:, :C] + _bc(w, out_c) * (out_c[:, :C] - out_u[:, :C])
        return torch.cat([mixed, out_c[:, C:]], dim=1)


class EpsTemperature:
    """ε/τ (ADM section I, "dividing ε_θ(x_t) by τ") for a network or denoiser fn(x, s, **cond)
    whose output is A·x + B·ε: out' = A·x + (out − A·x)/τ with A = offset(s) ([B] or a number;
    module docstring). Only the first C channels change."""

    def __init__(self, fn, tau: float, offset: Callable = lambda s: 1.0):
        self.fn, self.tau, self.offset = fn, float(tau), offset

    def __call__(self, x, s, **cond):
        out = self.fn(x, s, **cond)
        C = x.shape[1]
        A = self.offset(s)
        Ax = (_bc(A, x) if torch.is_tensor(A) else A) * x
        return torch.cat([Ax + (out[:, :C] - Ax) / self.tau, out[:, C:]], dim=1)


class WithoutLabels:
    """fn(x, s, **cond) with y dropped: an unconditional model sampled with classifier guidance
    (the labels are the classifier's, as in ADM's classifier_sample.py)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, s, y=None, **cond):
        return self.fn(x, s, **cond)


def table_sigma(alphas_cumprod) -> Callable:
    """σ(t) = sqrt(1/ᾱ_t − 1) for original timesteps t (long, or fractional: interpolated)."""
    sigmas = np.sqrt(1 / np.asarray(alphas_cumprod, dtype=np.float64) - 1)

    def sigma_of(t):
        t = torch.as_tensor(t).detach().cpu().to(torch.float64).numpy()
        return torch.from_numpy(np.interp(t, np.arange(len(sigmas)), sigmas))
    return sigma_of


def eps_offset(alphas_cumprod, mean_type: str) -> Callable:
    """A(t) of a discrete network's output A·x_t + B·ε: 0 (eps), 1/sqrt(ᾱ_t) (x0) or
    −sqrt(1/ᾱ_t − 1) (v), at original timesteps t."""
    a = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
    table = {"eps": torch.zeros_like(a), "x0": a.rsqrt(), "v": -(1 / a - 1).sqrt()}[mean_type]
    return lambda t: table[torch.as_tensor(t).detach().cpu().round().long()]


@dataclass
class Guidance:
    """How to steer a `Pipeline.sample` run (every field optional; the default changes nothing).

    classifier: a `gaussdiff.training.classifier.NoisyClassifier` (or an object with its methods
        num_classes, discrete_log_prob(alphas_cumprod) and sigma_log_prob) and its scale s.
    grad_at: where ∇ log p_φ is taken: "x_t" (ADM) or "mean", the unguided mean μ of
        p(x_{t-1} | x_t), the point of ADM D.2's Taylor expansion (ddpm only).
    cfg_scale: w of classifier-free guidance (None: off; 1: the conditional model; 0: the
        unconditional one), applied for σ in cfg_interval = (lo, hi) only, if given.
    temperature, temperature_mode: τ, and "noise" (scale the added noise) or "eps" (ε/τ).
    clip_guided: with clip_denoised, clamp the classifier-guided x̂_0 to [-1, 1] as well (ddim
        and σ-space samplers). False is ADM's Algorithm 2 as published, which clips only
        before the shift: on cosine schedules its first step moves x̂_0 by ≈ σ_T·s·∇log p
        (σ_T ≈ 2·10⁴) and DDIM returns binary images (`GaussianDiffusion.condition_score`).
    """
    classifier: Optional[object] = None
    classifier_scale: float = 1.0
    grad_at: str = "x_t"
    cfg_scale: Optional[float] = None
    cfg_interval: Optional[Tuple[float, float]] = None
    temperature: float = 1.0
    temperature_mode: str = "noise"
    clip_guided: bool = True

    def __post_init__(self):
        if self.grad_at not in GRAD_AT:
            raise UsageError(f"unknown gradient point {self.grad_at!r}: choose one of {', '.join(GRAD_AT)}")
        if self.temperature_mode not in TEMPERATURE_MODES:
            raise UsageError(f"unknown temperature mode {self.temperature_mode!r}: choose one of "
                             f"{', '.join(TEMPERATURE_MODES)}")
        check_sampling_numbers(cfg_scale=self.cfg_scale, temperature=self.temperature,
                               classifier_scale=self.classifier_scale)
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            if not 0 <= lo <= hi:
                raise UsageError(f"--cfg-interval LO,HI needs 0 <= LO <= HI, got {lo},{hi}")
            if self.cfg_scale is None:
                raise UsageError("--cfg-interval applies with --cfg-scale")

    @property
    def num_classes(self) -> Optional[int]:
        """The classifier's number of classes (labels to draw for an unconditional model)."""
        return None if self.classifier is None else self.classifier.num_classes

    def _check(self, pipe, sampler: str):
        where = pipe.path or "this model"
        if self.cfg_scale is not None and not pipe.config["model"].get("null_class"):
            raise UsageError(f"{where}: classifier-free guidance needs a model trained with "
                             f"--label-dropout (it has no null label)")
        if self.classifier is not None and pipe.num_classes not in (None, self.classifier.num_classes):
            raise UsageError(f"{where} has {pipe.num_classes} classes, the classifier "
                             f"{self.classifier.num_classes}")
        if self.grad_at == "mean" and (self.classifier is None or sampler != "ddpm"):
            raise UsageError("the gradient at the predicted mean applies to classifier guidance "
                             "with the ddpm sampler (others take the score at x_t)")

    def _noise_scale(self, sampler: str, stochastic: bool) -> dict:
        if self.temperature == 1 or self.temperature_mode != "noise":
            return {}
        if not stochastic:
            raise UsageError(f"temperature mode noise scales the noise a sampler adds; {sampler} "
                             f"adds none here: use --temperature-mode eps, or a stochastic "
                             f"sampler (ddpm, --eta > 0, --churn > 0, euler_ancestral)")
        return {"noise_scale": self.temperature}

    def for_discrete(self, pipe, sampler: str, options: dict):
        """(wrap(model) -> model, keyword arguments of the ddpm or ddim loop) for a pipeline."""
        self._check(pipe, sampler)
        alphas = pipe.diffusion.alphas_cumprod   # the model's original table

        def wrap(model):
            if pipe.num_classes is None:
                model = WithoutLabels(model)
            if self.cfg_scale is not None:
                model = ClassifierFree(model, self.cfg_scale, pipe.num_classes, self.cfg_interval,
                                       table_sigma(alphas))
            if self.temperature != 1 and self.temperature_mode == "eps":
                model = EpsTemperature(model, self.temperature,
                                       eps_offset(alphas, pipe.diffusion.mean_type))
            return model
        loop = self._noise_scale(sampler, get_spec(sampler).stochastic(options))
        if self.classifier is not None:
            loop["cond_fn"] = ClassifierCondFn(self.classifier.discrete_log_prob(alphas),
                                               self.classifier_scale)
            if sampler == "ddpm":
                loop["cond_at_mean"] = self.grad_at == "mean"
            else:
                loop["clip_guided"] = self.clip_guided
        return wrap, loop

    def for_sigma_space(self, pipe, denoiser, sampler: str, options: dict, clip_denoised: bool):
        """(guided denoiser, sampler options) for a σ-space sampler. Order as in the discrete
        engine: CFG and ε/τ on the raw estimate, then clipping, then the classifier's shift."""
        self._check(pipe, sampler)
        if pipe.num_classes is None:
            denoiser = WithoutLabels(denoiser)
        if self.cfg_scale is not None:
            denoiser = ClassifierFree(denoiser, self.cfg_scale, pipe.num_classes, self.cfg_interval)
        if self.temperature != 1 and self.temperature_mode == "eps":
            denoiser = EpsTemperature(denoiser, self.temperature)
        if clip_denoised:
            denoiser = ClipDenoised(denoiser)
        if self.classifier is not None:
            denoiser = ClassifierGuidedDenoiser(denoiser, self.classifier.sigma_log_prob,
                                                self.classifier_scale)
            if clip_denoised and self.clip_guided:
                denoiser = ClipDenoised(denoiser)
        extra = self._noise_scale(sampler, get_spec(sampler).stochastic(options))
        if extra and "noise_scale" in options:
            raise UsageError("--snoise and --temperature-mode noise both set the noise scale: give one")
        return denoiser, {**options, **extra}

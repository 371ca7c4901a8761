"""σ-space denoisers and their training losses: the columns VP, VE, iDDPM and EDM of EDM's Table 1
(Karras et al. 2022, "Network and preconditioning" and "Training"), following NVlabs/edm.

A preconditioner wraps a network F_θ (a `UNetModel`, called as F_θ(x, c_noise, **cond)) as a
denoiser with the sampler contract D(x, sigma, **cond) -> clean estimate:

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x; c_noise(σ))            (EDM eq. 7)

A loss draws σ ~ p_train(σ) and n ~ N(0, σ²I) and weights the denoising error by λ(σ):

    E_{σ, y, n} λ(σ)·||D(y + n; σ) − y||²                                    (EDM eq. 8)

Units: images y lie in [-1, 1] and x = y + n is not rescaled (s(t) = 1; a VP network sees
c_in·x = x / sqrt(1 + σ²), which is the discrete engine's x_t). The squared error is the mean
over non-batch dimensions, one value per sample, as everywhere in gaussdiff (NVlabs/edm sums
over pixels instead: the loss is smaller by the number of dimensions, which Adam ignores).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UsageError
from .gaussian import mean_flat
from ..rng import randn
from .schedules import iddpm_u


def _as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a [B] tensor in x's dtype and device (a number or 0-d tensor is broadcast)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


def _bc(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1], to broadcast against x."""
    return c.reshape(-1, *([1] * (x.ndim - 1)))


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """VP schedule σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) (expm1: exact also for tiny t)."""
    t = torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t
    return torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """Inverse of `vp_sigma`: t = (sqrt(β_min² + 2β_d ln(1 + σ²)) − β_min) / β_d."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not torch.is_tensor(sigma) else sigma
    return ((beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)).sqrt() - beta_min) / beta_d


# --------------------------------------------------------------------------- preconditioners
class Precond(nn.Module):
    """D(x, sigma, **cond) = c_skip·x + c_out·F_θ(c_in·x, c_noise, **cond)  (EDM eq. 7).

    x: [B, C, H, W]; sigma: [B] (or a number); cond goes to F_θ (y=class labels,
    augment_labels=[B, 9]). Returns the clean-image estimate [B, C, H, W] in x's dtype; F_θ runs
    in its parameters' dtype. Only F_θ's first C output channels are used (a learned-variance
    network's variance channels are ignored). `sigma_min`/`sigma_max` bound the σ the network
    was trained for; `round_sigma` maps σ to one the network knows (identity but for iDDPM).
    """
    kind = ""
    sigma_min, sigma_max = 0.0, float("inf")

    def __init__(self, model: nn.Module, **params):
        super().__init__()
        self.model = model
        self.params = params   # constructor values, recorded in config.json

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise), each shaped like sigma [B]."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def config(self) -> dict:
        """This preconditioner as a config.json "precond" section."""
        return {"type": self.kind, **self.params}

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = _as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        param = next(self.model.parameters(), None)
        dtype = x.dtype if param is None else param.dtype
        F_x = self.model((_bc(c_in, x) * x).to(dtype), c_noise.to(dtype), **cond)
        return _bc(c_skip, x) * x + _bc(c_out, x) * F_x[:, :x.shape[1]].to(x.dtype)


class VPPrecond(Precond):
    """VP column: c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = (M − 1)·σ⁻¹(σ),
    with σ(t) = sqrt(exp(½β_d t² + β_min t) − 1), t ∈ [ε_t, 1]."""
    kind = "vp"

    def __init__(self, model, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5):
        super().__init__(model, beta_d=float(beta_d), beta_min=float(beta_min), M=int(M),
                         epsilon_t=float(epsilon_t))
        self.beta_d, self.beta_min, self.M = float(beta_d), float(beta_min), int(M)
        self.sigma_min = float(vp_sigma(epsilon_t, beta_d, beta_min))
        self.sigma_max = float(vp_sigma(1.0, beta_d, beta_min))

    def coefficients(self, sigma):
        return (torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(),
                (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min))


class VEPrecond(Precond):
    """VE column: c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(½σ)."""
    kind = "ve"

    def __init__(self, model, sigma_min=0.02, sigma_max=100.0):
        super().__init__(model, sigma_min=float(sigma_min), sigma_max=float(sigma_max))
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(Precond):
    """iDDPM column: c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1),
    c_noise = M − 1 − argmin_j |u_j − σ|, with u_0 > ... > u_M = 0 of `schedules.iddpm_u`."""
    kind = "iddpm"

    def __init__(self, model, C1=0.001, C2=0.008, M=1000):
        super().__init__(model, C1=float(C1), C2=float(C2), M=int(M))
        self.M = int(M)
        u = torch.from_numpy(iddpm_u(C1=C1, C2=C2, M=self.M))
        self.register_buffer("u", u, persistent=False)
        self.sigma_min, self.sigma_max = float(self.u[self.M - 1]), float(self.u[0])

    def round_sigma(self, sigma, return_index: bool = False):
        """The nearest u_j to each σ (or its index j)."""
        sigma = torch.as_tensor(sigma)
        u = self.u.to(sigma.device)
        index = (sigma.reshape(-1, 1).to(u.dtype) - u).abs().argmin(1).reshape(sigma.shape)
        return index if return_index else u[index].to(sigma.dtype)

    def coefficients(self, sigma):
        j = self.round_sigma(sigma, return_index=True)
        return (torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(),
                (self.M - 1 - j).to(sigma.dtype))


class EDMPrecond(Precond):
    """EDM column: c_skip = σ_data²/(σ² + σ_data²), c_out = σ·σ_data/sqrt(σ² + σ_data²),
    c_in = 1/sqrt(σ² + σ_data²), c_noise = ¼ ln σ."""
    kind = "edm"

    def __init__(self, model, sigma_data=0.5):
        super().__init__(model, sigma_data=float(sigma_data))
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma):
        sd = self.sigma_data
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
                1 / (sigma ** 2 + sd ** 2).sqrt(), sigma.log() / 4)


# --------------------------------------------------------------------------- losses
class SigmaLoss:
    """λ(σ)·mean((D(y + n; σ) − y)²) with σ ~ p_train(σ), n ~ N(0, σ²I)  (EDM eq. 8).

    Call as loss(denoiser, y [B, C, H, W], generator, model_kwargs) -> dict(loss, mse, sigma),
    each [B]; mse is the unweighted denoising error. σ and n come from `generator` (a CPU
    torch.Generator, or None for the global RNG), σ first, so training resumes bit for bit.
    """
    kind = ""

    def sample_sigma(self, n: int, generator=None) -> torch.Tensor:
        """n noise levels from p_train(σ), float64 [n]."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ), shaped like sigma."""
        return 1 / sigma ** 2

    def config(self) -> dict:
        """This loss as a config.json "objective" section."""
        return {"type": self.kind, **asdict(self)}

    def __call__(self, denoiser, y: torch.Tensor, generator=None, model_kwargs=None) -> dict:
        sigma, n = self.draw(y, generator)
        return self.evaluate(denoiser, y, sigma, n, model_kwargs)

    def draw(self, y: torch.Tensor, generator=None):
        """(σ [B], n [B, C, H, W] ~ N(0, σ²I)) for the rows of y, σ drawn first."""
        sigma = self.sample_sigma(y.shape[0], generator).to(y.device, y.dtype)
        return sigma, randn(y.shape, generator, device=y.device, dtype=y.dtype) * _bc(sigma, y)

    def evaluate(self, denoiser, y: torch.Tensor, sigma: torch.Tensor, n: torch.Tensor,
                 model_kwargs=None) -> dict:
        """The loss terms at given σ and n (rows may be any part of a drawn batch)."""
        D = denoiser(y + n, sigma, **(model_kwargs or {}))
        mse = mean_flat((D - y) ** 2)
        return dict(loss=self.weight(sigma) * mse, mse=mse, sigma=sigma)


@dataclass
class VPLoss(SigmaLoss):
    """VP column: σ = σ(t), t ~ U(ε_t, 1); λ(σ) = 1/σ²."""
    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_t: float = 1e-5
    kind = "vp"

    def sample_sigma(self, n, generator=None):
        t = 1 + torch.rand(n, generator=generator, dtype=torch.float64) * (self.epsilon_t - 1)
        return vp_sigma(t, self.beta_d, self.beta_min)


@dataclass
class VELoss(SigmaLoss):
    """VE column: ln σ ~ U(ln σ_min, ln σ_max); λ(σ) = 1/σ²."""
    sigma_min: float = 0.02
    sigma_max: float = 100.0
    kind = "ve"

    def sample_sigma(self, n, generator=None):
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u


@dataclass
class iDDPMLoss(SigmaLoss):
    """iDDPM column: σ = u_j, j ~ U{0, ..., M − 1}; λ(σ) = 1/σ² (iDDPM's L_vlb term is not
    included: this is L_simple in σ-space)."""
    C1: float = 0.001
    C2: float = 0.008
    M: int = 1000
    kind = "iddpm"

    def __post_init__(self):
        self.u = torch.from_numpy(iddpm_u(C1=self.C1, C2=self.C2, M=self.M))

    def sample_sigma(self, n, generator=None):
        return self.u[torch.randint(0, self.M, (n,), generator=generator)]


@dataclass
class EDMLoss(SigmaLoss):
    """EDM column: ln σ ~ N(P_mean, P_std²); λ(σ) = (σ² + σ_data²)/(σ·σ_data)² = 1/c_out(σ)²."""
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    kind = "edm"

    def sample_sigma(self, n, generator=None):
        return (torch.randn(n, generator=generator, dtype=torch.float64) * self.P_std
                + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


PRECONDS = {"vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond, "edm": EDMPrecond}
LOSSES = {"vp": VPLoss, "ve": VELoss, "iddpm": iDDPMLoss, "edm": EDMLoss}
# "ddpm" is the discrete engine (GaussianDiffusion.training_losses); the rest train in σ-space
OBJECTIVES = ("ddpm",) + tuple(PRECONDS)


def _build(table: dict, section: dict, what: str, *args):
    params = dict(section)
    kind = params.pop("type", None)
    if kind not in table:
        raise UsageError(f"{what}: unknown type {kind!r}: choose one of {', '.join(table)}")
    try:
        return table[kind](*args, **params)
    except TypeError as e:
        raise UsageError(f"{what} {kind!r}: bad parameters {sorted(params)} ({e})") from None


def make_precond(section: dict, model: nn.Module) -> Precond:
    """The preconditioner of a config.json "precond" section, e.g. {"type": "edm",
    "sigma_data": 0.5}, wrapped around `model` (F_θ)."""
    return _build(PRECONDS, section, "precond", model)


def make_loss(section: dict) -> SigmaLoss:
    """The σ-space loss of a config.json "objective" section, e.g. {"type": "edm",
    "P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}."""
    return _build(LOSSES, section, "objective")


def objective_sections(objective: str, sigma_data: float = 0.5, P_mean: float = -1.2,
                       P_std: float = 1.2, model: Optional[nn.Module] = None,
                       precond: Optional[str] = None):
    """The config.json "precond" and "objective" sections of a σ-space `objective` (vp, ve, iddpm,
    edm: its column's loss, λ(σ) and σ distribution), with every parameter filled in. precond:
    another column's preconditioning (EDM Table 2's config E: objective vp, precond edm);
    default the objective's own. sigma_data applies to the edm precond and loss, P_mean and
    P_std to the edm loss."""
    precond = precond or objective
    for what, kind in (("objective", objective), ("precond", precond)):
        if kind not in PRECONDS:
            raise UsageError(f"unknown {what} {kind!r}: choose one of "
                             f"{', '.join(OBJECTIVES if what == 'objective' else PRECONDS)}")
    if "edm" in (objective, precond) and sigma_data <= 0:
        raise UsageError(f"--sigma-data must be positive, got {sigma_data}")
    if objective == "edm" and P_std <= 0:
        raise UsageError(f"--p-std must be positive, got {P_std}")
    precond_params = dict(sigma_data=sigma_data) if precond == "edm" else {}
    loss = dict(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data) if objective == "edm" else {}
    net = model if model is not None else nn.Identity()
    return (make_precond({"type": precond, **precond_params}, net).config(),
            make_loss({"type": objective, **loss}).config())

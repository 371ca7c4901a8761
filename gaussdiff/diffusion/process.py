"""The discrete-time Gaussian diffusion of DDPM / Improved DDPM / ADM.

Names follow openai/improved-diffusion so that readers of the papers find their way:
q_sample, q_posterior_mean_variance, p_mean_variance, vb_terms_bpd, training_losses.
Coefficient tables are float64 numpy arrays, gathered into the dtype of the input tensor.

Timesteps: the `t` given to these methods indexes this diffusion's own step list (respaced or
not); the model always receives the ORIGINAL index `timestep_map[t]` in [0, T).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from .gaussian import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from ..rng import Generator, randn, randn_like
from .schedules import beta_schedule, betas_from_alphas_cumprod, space_timesteps

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
FIXED_VAR_TYPES = VAR_TYPES[:2]
LOSS_TYPES = ("mse", "hybrid", "kl")
LN2 = math.log(2.0)


def _check_choice(what, value, choices):
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


class GaussianDiffusion:
    """A diffusion with β table `betas` (the ORIGINAL T steps), optionally respaced.

    Args:
        betas: float64 array [T] of the original process.
        mean_type: what the network predicts: "eps" (ε), "x0", or "v" (sqrt(ᾱ)ε - sqrt(1-ᾱ)x0).
        var_type: "fixed_small" (β̃_t), "fixed_large" (β_t, β̃_1 at t=0), "learned" (log σ²),
            "learned_range" (Improved DDPM eq. 15: v in [-1, 1] interpolates log β and log β̃).
        loss_type: "mse" (L_simple), "hybrid" (L_simple + λ·T·L_t with a stop-gradient on the
            mean), "kl" (T·L_t alone: with t uniform this estimates the full L_vlb in bits/dim).
        timesteps: a sorted subset of range(T) to keep (respacing), or None for all steps.
        hybrid_lambda: λ of L_hybrid (Improved DDPM: 0.001).
        vb_stop_grad: stop the VLB term's gradient into the mean (Improved DDPM Table 1 ablation).
        p2_gamma, p2_k: P2 weighting (Choi et al. 2022) of the L_simple term, λ_t = 1/(k + SNR(t))^γ
            with SNR(t) = ᾱ_t/(1 − ᾱ_t); γ = 0 turns it off (their best: γ = 1, k = 1).
        min_snr_gamma: Min-SNR-γ weighting (Hang et al. 2023) of the L_simple term, 0 = off. It
            weights every parameterisation as min(SNR, γ)·||x0 − x̂0||²: the weight of the mse
            is min(SNR, γ)/SNR for eps, min(SNR, γ) for x0 and min(SNR, γ)/(SNR + 1) for v (their
            γ = 5). Neither weighting touches the VLB term.
    """

    def __init__(self, betas, mean_type="eps", var_type="fixed_small", loss_type="mse",
                 timesteps: Optional[Sequence[int]] = None, hybrid_lambda: float = 0.001,
                 vb_stop_grad: bool = True, p2_gamma: float = 0.0, p2_k: float = 1.0,
                 min_snr_gamma: float = 0.0):
        _check_choice("mean type", mean_type, MEAN_TYPES)
        _check_choice("variance type", var_type, VAR_TYPES)
        _check_choice("loss type", loss_type, LOSS_TYPES)
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.hybrid_lambda, self.vb_stop_grad = float(hybrid_lambda), bool(vb_stop_grad)
        self.original_betas = np.asarray(betas, dtype=np.float64)
        if self.original_betas.ndim != 1 or not np.all((self.original_betas > 0) & (self.original_betas < 1)):
            raise UsageError("betas must be a 1-D array with values in (0, 1)")
        self.original_num_steps = len(self.original_betas)
        orig_alphas_cumprod = np.cumprod(1.0 - self.original_betas)
        if timesteps is None:
            self.timestep_map = np.arange(self.original_num_steps)
            betas = self.original_betas
        else:
            self.timestep_map = np.array(sorted(set(int(t) for t in timesteps)))
            if len(self.timestep_map) == 0 or self.timestep_map[0] < 0 or \
                    self.timestep_map[-1] >= self.original_num_steps:
                raise UsageError(f"timesteps must lie in [0, {self.original_num_steps})")
            kept = orig_alphas_cumprod[self.timestep_map]
            betas = 1.0 - kept / np.append(1.0, kept[:-1])  # β recomputed from the kept ᾱ
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0): DDPM eqs. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so the log is clipped with β̃_1 (improved-diffusion's convention)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1 else np.array([betas[0]]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # fixed_large: σ² = β_t, with β̃_1 at t = 0 for a better decoder likelihood
        large = np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1 else betas
        self.fixed_large_variance, self.fixed_large_log_variance = large, np.log(large)
        self.p2_gamma, self.p2_k, self.min_snr_gamma = float(p2_gamma), float(p2_k), float(min_snr_gamma)
        self.mse_weight = self._mse_weight_table()
        self._tables: Dict = {}

    # ----------------------------------------------------------------- helpers
    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather table `name` at indices t, shaped [B, 1, ..., 1] in x's dtype and device."""
        key = (name, x.device, x.dtype)
        table = self._tables.get(key)
        if table is None:
            table = torch.as_tensor(getattr(self, name), dtype=x.dtype, device=x.device)
            self._tables[key] = table
        return table[t.to(x.device)].reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep indices for this diffusion's indices t (what the model receives)."""
        key = ("timestep_map", t.device)
        table = self._tables.get(key)
        if table is None:
            table = torch.as_tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._tables[key] = table
        return table[t]

    def _call_model(self, model, x, t, model_kwargs):
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def _mse_weight_table(self) -> Optional[np.ndarray]:
        """Per-step weights [T] of the L_simple term (P2 or Min-SNR-γ), None when unweighted."""
        if self.p2_gamma < 0 or self.min_snr_gamma < 0:
            raise UsageError("--p2-gamma and --min-snr-gamma must be >= 0 (0 turns them off)")
        if self.p2_gamma and self.min_snr_gamma:
            raise UsageError("choose one loss weighting: --p2-gamma or --min-snr-gamma, not both")
        if (self.p2_gamma or self.min_snr_gamma) and self.loss_type == "kl":
            raise UsageError("P2 and Min-SNR-γ weight the L_simple term: use loss type mse or hybrid")
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        if self.p2_gamma:
            if self.p2_k <= 0:
                raise UsageError(f"--p2-k must be positive, got {self.p2_k}")
            return 1.0 / (self.p2_k + snr) ** self.p2_gamma
        if self.min_snr_gamma:
            clipped = np.minimum(snr, self.min_snr_gamma)
            with np.errstate(divide="ignore"):   # SNR = 0: weight 1 (min(SNR, γ)/SNR → 1)
                eps = np.minimum(1.0, self.min_snr_gamma / snr)
            return {"eps": eps, "x0": clipped, "v": clipped / (snr + 1.0)}[self.mean_type]
        return None

    @property
    def learns_variance(self) -> bool:
        return self.var_type in ("learned", "learned_range")

    # ----------------------------------------------------------------- forward process
    def q_mean_variance(self, x0, t):
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = 1.0 - self._extract("alphas_cumprod", t, x0)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, variance, log_variance

    def q_sample(self, x0, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I). x0: [B, ...], t: [B] long."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x0
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        return (mean, self._extract("posterior_variance", t, x_t),
                self._extract("posterior_log_variance_clipped", t, x_t))

    # ----------------------------------------------------------------- parameterisations
    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, x0):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_xstart_from_v(self, x_t, t, v):
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def v_target(self, x0, t, noise):
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0."""
        return (self._extract("sqrt_alphas_cumprod", t, x0) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    def split_output(self, out: torch.Tensor, x: torch.Tensor):
        """(mean part, variance part or None) of a model output with C or 2C channels."""
        C = x.shape[1]
        if self.learns_variance:
            if out.shape[1] != 2 * C:
                raise ValueError(f"var_type {self.var_type!r} needs {2 * C} output channels, "
                                 f"the model gave {out.shape[1]}")
            return out[:, :C], out[:, C:]
        return out[:, :C], None

    def pred_xstart(self, mean_out, x_t, t):
        if self.mean_type == "eps":
            return self.predict_xstart_from_eps(x_t, t, mean_out)
        if self.mean_type == "x0":
            return mean_out
        return self.predict_xstart_from_v(x_t, t, mean_out)

    def variance_from_output(self, var_out, x_t, t):
        """(variance, log variance) of p(x_{t-1} | x_t) for this diffusion's var_type."""
        if self.var_type == "learned":
            return torch.exp(var_out), var_out
        if self.var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (var_out + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        if self.var_type == "fixed_large":
            return (self._extract("fixed_large_variance", t, x_t).expand_as(x_t),
                    self._extract("fixed_large_log_variance", t, x_t).expand_as(x_t))
        return (self._extract("posterior_variance", t, x_t).expand_as(x_t),
                self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t))

    @property
    def log_betas(self):
        return np.log(self.betas)

    # ----------------------------------------------------------------- reverse process
    def p_mean_variance(self, model, x_t, t, clip_denoised=True, model_kwargs=None,
                        denoised_fn: Optional[Callable] = None, model_output=None):
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, model_output).

        x_t: [B, C, ...]; t: [B] long indices into this diffusion's steps. The x_0 prediction is
        clipped to [-1, 1] when clip_denoised, and passed through denoised_fn if given.
        """
        if model_output is None:
            model_output = self._call_model(model, x_t, t, model_kwargs)
        mean_out, var_out = self.split_output(model_output, x_t)
        variance, log_variance = self.variance_from_output(var_out, x_t, t)
        pred_xstart = self.pred_xstart(mean_out, x_t, t)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance,
                    pred_xstart=pred_xstart, model_output=model_output)

    # ----------------------------------------------------------------- likelihood
    def vb_terms_bpd(self, model, x0, x_t, t, clip_denoised=True, model_kwargs=None,
                     model_output=None):
        """The VLB term L_t in bits/dim, one value per sample: KL(q(x_{t-1}|x_t,x_0) || p) for
        t > 0, the discretized Gaussian decoder NLL -log p(x_0 | x_1) at t = 0.
        Returns dict(output=[B], pred_xstart=[B, ...])."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / LN2
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / LN2
        return dict(output=torch.where(t == 0, decoder_nll, kl), pred_xstart=out["pred_xstart"])

    def prior_bpd(self, x0):
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, one value per sample."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / LN2

    @torch.no_grad()
    def calc_bpd_loop(self, model, x0, clip_denoised=True, model_kwargs=None, progress=False,
                      generator: Generator = None):
        """The full variational bound of x0 in bits/dim, with its terms.

        Returns dict(total_bpd=[B], prior_bpd=[B], vb=[B, T], xstart_mse=[B, T], mse=[B, T]).
        """
        B, T = x0.shape[0], self.num_timesteps
        vb, xstart_mse, mse = [], [], []
        for i in tqdm(range(T - 1, -1, -1), disable=not progress, desc="bpd"):
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            noise = randn_like(x0, generator)
            x_t = self.q_sample(x0, t, noise)
            out = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x0) ** 2))
            eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb[::-1], dim=1)
        prior = self.prior_bpd(x0)
        return dict(total_bpd=vb.sum(dim=1) + prior, prior_bpd=prior, vb=vb,
                    xstart_mse=torch.stack(xstart_mse[::-1], dim=1),
                    mse=torch.stack(mse[::-1], dim=1))

    # ----------------------------------------------------------------- training
    def training_losses(self, model, x0, t, noise=None, model_kwargs=None):
        """Per-sample losses at indices t: dict(loss, mse, and vb for hybrid/kl), each [B].

        mse is the mean over non-batch dims of the squared error of the mean_type target
        (unweighted; the loss holds it times the P2 / Min-SNR-γ weight of step t, if any);
        vb is λ·T·L_t for hybrid (= (T/1000)·L_t at λ = 0.001) and T·L_t for kl (bits/dim).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self._call_model(model, x_t, t, model_kwargs)
        terms = {}
        T = self.num_timesteps
        if self.loss_type == "kl":
            terms["vb"] = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False,
                                            model_output=out)["output"] * T
            terms["loss"] = terms["vb"]
            return terms
        mean_out, var_out = self.split_output(out, x_t)
        target = {"eps": noise, "x0": x0, "v": None}[self.mean_type]
        if target is None:
            target = self.v_target(x0, t, noise)
        terms["mse"] = mean_flat((target - mean_out) ** 2)
        terms["loss"] = terms["mse"]
        if self.mse_weight is not None:
            terms["loss"] = self._extract("mse_weight", t, terms["mse"]) * terms["mse"]
        if self.loss_type == "hybrid":
            if var_out is None:
                raise UsageError("loss type 'hybrid' needs a learned variance "
                                 "(var_type learned or learned_range)")
            frozen = torch.cat([mean_out.detach() if self.vb_stop_grad else mean_out, var_out], 1)
            vb = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False, model_output=frozen)
            terms["vb"] = vb["output"] * (self.hybrid_lambda * T)
            terms["loss"] = terms["loss"] + terms["vb"]
        return terms

    # ----------------------------------------------------------------- ancestral sampling
    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, denoised_fn=None,
                 generator: Generator = None, noise_scale: float = 1.0, cond_fn=None,
                 cond_at_mean: bool = False):
        """One ancestral step x_t -> x_{t-1}. Returns dict(sample, pred_xstart).

        noise_scale multiplies the added noise (temperature τ, ADM section I). cond_fn(x, t,
        **model_kwargs) -> s·∇_x log p(y | x) guides the step (`condition_mean`)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs, denoised_fn)
        if cond_fn is not None:
            out = self.condition_mean(cond_fn, out, x, t, model_kwargs, cond_at_mean)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        noise = randn_like(x, generator)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise * noise_scale
        return dict(sample=sample, pred_xstart=out["pred_xstart"])

    # ----------------------------------------------------------------- classifier guidance
    def condition_mean(self, cond_fn, out, x, t, model_kwargs=None, at_mean: bool = False):
        """ADM Algorithm 1 (derivation: section D.2): p(x_{t-1} | x_t) with its mean shifted to
        μ + Σ·g, g = cond_fn(x, t, **model_kwargs) = s·∇ log p_φ(y | x). g is taken at x_t with
        the model's timestep of t, as ADM does, or with at_mean at the unguided mean μ (the
        point of D.2's Taylor expansion) with the timestep of t - 1, the level μ belongs to."""
        if at_mean:
            g = cond_fn(out["mean"], self.model_timesteps((t - 1).clamp(min=0)), **(model_kwargs or {}))
        else:
            g = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        return dict(out, mean=out["mean"] + out["variance"] * g)

    def condition_score(self, cond_fn, out, x, t, model_kwargs=None, clip: bool = False):
        """ADM Algorithm 2 (section D.3, eq. 60): the score form ε̂ = ε − sqrt(1 − ᾱ_t)·g with
        g = cond_fn(x_t, t, **model_kwargs) = s·∇ log p_φ(y | x_t); x̂_0 and the mean follow
        from ε̂. ε̂ is applied as the equivalent shift of x̂_0 (x̂_0 = (x_t − sqrt(1 − ᾱ)ε)/sqrt(ᾱ)
        moves by −sqrt(1/ᾱ − 1)·Δε), so that g = 0 changes nothing, bit for bit.

        clip: clamp the guided x̂_0 to [-1, 1] as well. ADM clips x̂_0 before the shift only, and
        the shift is sqrt(1/ᾱ_t − 1)·sqrt(1 − ᾱ_t)·g ≈ σ_t·g: at the last step of a cosine
        schedule (ᾱ ≈ 2.4e-9, σ ≈ 2·10⁴) it throws x̂_0 far outside the data range and DDIM
        then commits to a binary image. Clipping after the shift keeps every step's x̂_0 a
        possible image; ε̂ is recomputed from it, as the step does for an unguided clip."""
        g = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        eps_shift = -self._extract("sqrt_one_minus_alphas_cumprod", t, x) * g
        pred_xstart = out["pred_xstart"] - self._extract("sqrt_recipm1_alphas_cumprod", t, x) * eps_shift
        if clip:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(out, pred_xstart=pred_xstart, mean=mean)

    def _initial_noise(self, shape, noise, generator, device, dtype):
        if noise is not None:
            return noise
        return randn(tuple(shape), generator, device=device, dtype=dtype)

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                      denoised_fn=None, device=None, dtype=torch.float32, progress=False,
                      generator: Generator = None, callback=None, noise_scale: float = 1.0,
                      cond_fn=None, cond_at_mean: bool = False, start: Optional[int] = None):
        """Ancestral sampling from x_T ~ N(0, I) (or `noise`) down to x_0, [B, C, H, W].

        Device and dtype come from `noise` when given. `callback(dict(i, t, sample,
        pred_xstart))` is called after every step, `sample` being the state at step i − 1.
        noise_scale, cond_fn, cond_at_mean: see `p_sample` (temperature and classifier
        guidance). start: the step index to begin at (default the last, T' − 1), `noise` then
        being the state x at that step, e.g. a noised image (SDEdit-style continuations).
        """
        x = self._initial_noise(shape, noise, generator, device, dtype)
        start = self.num_timesteps - 1 if start is None else int(start)
        if not 0 <= start < self.num_timesteps:
            raise ValueError(f"start must be a step index in [0, {self.num_timesteps - 1}], got {start}")
        for i in tqdm(range(start, -1, -1), disable=not progress, desc="ddpm"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_sample(model, x, t, clip_denoised, model_kwargs, denoised_fn, generator,
                                noise_scale, cond_fn, cond_at_mean)
            x = out["sample"]
            if callback is not None:
                callback(dict(i=i, t=t, sample=x, pred_xstart=out["pred_xstart"]))
        return x

    # ----------------------------------------------------------------- DDIM
    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, denoised_fn=None,
                    eta=0.0, generator: Generator = None, noise_scale: float = 1.0, cond_fn=None,
                    clip_guided: bool = False):
        """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12). eta=0: deterministic.
        noise_scale multiplies the noise added when eta > 0 (temperature); cond_fn guides the
        step in score form (`condition_score`); clip_guided (with clip_denoised) clamps the
        guided x̂_0 too (False: ADM's Algorithm 2 as published)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs, denoised_fn)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs,
                                       clip=clip_denoised and clip_guided)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        a_bar = self._extract("alphas_cumprod", t, x)
        a_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma ** 2) * eps
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        if eta > 0:
            mean = mean + nonzero * sigma * randn_like(x, generator) * noise_scale
        return dict(sample=mean, pred_xstart=out["pred_xstart"])

    def ddim_reverse_sample(self, model, x, t, clip_denoised=False, model_kwargs=None,
                            denoised_fn=None):
        """One deterministic DDIM step x_t -> x_{t+1} (the ODE run forwards; ADM section H)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs, denoised_fn)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        a_bar_next = self._extract("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * torch.sqrt(a_bar_next) + torch.sqrt(1 - a_bar_next) * eps
        return dict(sample=sample, pred_xstart=out["pred_xstart"])

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                         denoised_fn=None, device=None, dtype=torch.float32, progress=False,
                         eta=0.0, generator: Generator = None, callback=None,
                         noise_scale: float = 1.0, cond_fn=None, clip_guided: bool = False):
        """DDIM sampling over this diffusion's steps (respace it for fewer), [B, C, H, W].
        noise_scale, cond_fn, clip_guided: see `ddim_sample`."""
        x = self._initial_noise(shape, noise, generator, device, dtype)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="ddim"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.ddim_sample(model, x, t, clip_denoised, model_kwargs, denoised_fn, eta,
                                   generator, noise_scale, cond_fn, clip_guided)
            x = out["sample"]
            if callback is not None:
                callback(dict(i=i, t=t, sample=x, pred_xstart=out["pred_xstart"]))
        return x

    @torch.no_grad()
    def ddim_reverse_sample_loop(self, model, x0, clip_denoised=False, model_kwargs=None,
                                 denoised_fn=None, progress=False, skip_last: bool = False):
        """Deterministic DDIM inversion x_0 -> x_T. With skip_last, the last step is not taken
        and the result is the latent at the second-to-last step."""
        x = x0
        last = self.num_timesteps - (1 if skip_last else 0)
        for i in tqdm(range(last), disable=not progress, desc="invert"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.ddim_reverse_sample(model, x, t, clip_denoised, model_kwargs, denoised_fn)["sample"]
        return x


def make_diffusion(schedule="linear", steps=1000, mean_type="eps", var_type="fixed_small",
                   loss_type="mse", respacing=None, hybrid_lambda=0.001, vb_stop_grad=True,
                   alphas_cumprod=None, p2_gamma=0.0, p2_k=1.0,
                   min_snr_gamma=0.0) -> GaussianDiffusion:
    """A GaussianDiffusion from config values (as stored in config.json), optionally respaced."""
    if alphas_cumprod is not None:
        betas = betas_from_alphas_cumprod(alphas_cumprod)
    else:
        betas = beta_schedule(schedule, steps)
    timesteps = None
    if respacing not in (None, "", "none"):
        timesteps = space_timesteps(len(betas), respacing)
    return GaussianDiffusion(betas, mean_type=mean_type, var_type=var_type, loss_type=loss_type,
                             timesteps=timesteps, hybrid_lambda=hybrid_lambda,
                             vb_stop_grad=vb_stop_grad, p2_gamma=p2_gamma, p2_k=p2_k,
                             min_snr_gamma=min_snr_gamma)

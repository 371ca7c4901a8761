"""Noisy classifiers p_φ(y | x_t, t) for classifier guidance (ADM section 4.1 and appendix D).

`gaussdiff train-classifier` trains ADM's encoder (gaussdiff.nn.encoder) with cross-entropy on
x_t = q_sample(x_0, t), t uniform, through `gaussdiff train`'s Trainer (same run directory,
EMA, checkpoints, bit-exact resume, microbatches and torchrun); its log.jsonl reports loss and
accuracy overall and by quarter of the process (acc_q0 for t in [0, T/4), ... acc_q3 for
[3T/4, T)). The directory's config.json says "kind": "classifier" and records the noise
schedule the classifier was trained for.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.objectives import ClassifierObjective
from ..diffusion.process import make_diffusion
from ..diffusion.timesteps import make_schedule_sampler
from ..errors import UsageError
from ..modeldir import build_model, default_device, load_state_into, read_config, weights_path
from ..nn.encoder import EncoderConfig
from ..sampling.denoisers import DiscreteDenoiser
from .trainer import DEFAULTS, Trainer, unet_config

# `gaussdiff train`'s defaults, with a small ADM classifier (Table 12 shrunk for 28x28 data:
# attention pooling, BigGAN down-sampling, AdaGN, weight decay) and no sample grids.
CLASSIFIER_DEFAULTS = dict(
    DEFAULTS, class_cond=True, model_channels=32, channel_mult="1,2,2", num_res_blocks=1,
    attention_resolutions="7", num_head_channels=32, resblock_updown=True, pool="attention",
    lr=3e-4, weight_decay=0.05, ema="0.999", sample_every=0)


class ClassifierTrainer(Trainer):
    """`gaussdiff train-classifier`: Trainer with the encoder as network and cross-entropy on
    noisy images as objective. Options: CLASSIFIER_DEFAULTS' keys."""
    LOG_KEYS = ("loss", "acc")
    QUARTER_KEYS = ("loss", "acc")

    def __init__(self, opts: dict, out_dir: str, **kwargs):
        fixed = dict(class_cond=True, objective="ddpm", sample_every=0, label_dropout=0.0,
                     task="generate", low_res=None, schedule_sampler="uniform", augment=0.0)
        super().__init__({**CLASSIFIER_DEFAULTS, **opts, **fixed}, out_dir, **kwargs)

    def make_objective(self, o: dict) -> ClassifierObjective:
        schedule = dict(schedule=o["schedule"], steps=o["diffusion_steps"])
        diffusion = make_diffusion(**schedule)
        return ClassifierObjective(diffusion, make_schedule_sampler("uniform", diffusion.num_timesteps),
                                   schedule)

    def network_config(self, o: dict, out_channels: int):
        cfg = unet_config(o, out_channels).to_dict()
        return EncoderConfig.from_dict({**cfg, "out_channels": o["num_classes"], "num_classes": None,
                                        "pool": o.get("pool", "attention")})

    def config_extras(self, o: dict) -> dict:
        return {"kind": "classifier"}


class NoisyClassifier:
    """A trained noisy classifier: `.model` (EncoderUNetModel), `.config`, `.num_classes`,
    `.alphas_cumprod` (the ᾱ table of the schedule it was trained on)."""

    def __init__(self, model: torch.nn.Module, config: dict, path: str = ""):
        self.model, self.config, self.path = model, config, path
        self.num_classes = int(config["model"]["out_channels"])
        self.alphas_cumprod = make_diffusion(**config["diffusion"]).alphas_cumprod
        self.levels = DiscreteDenoiser(None, self.alphas_cumprod)   # its σ -> t map

    def log_prob(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p_φ(y | x_t) [B] at the classifier's timesteps t [B] (long or fractional).
        y: labels [B], or label weights [B, K] (K >= num_classes; extra columns such as a
        diffusion model's null label are ignored): then Σ_k y_k·log p_φ(k | x_t), ADM section
        H's interpolation of classifier log-probabilities."""
        param = next(self.model.parameters())
        logits = self.model(x_t.to(param.dtype), t.to(param.device))
        log_p = F.log_softmax(logits.float(), dim=-1)
        if y.is_floating_point():
            return (log_p * y[:, :self.num_classes].to(log_p)).sum(dim=1)
        return log_p.gather(1, y.reshape(-1, 1).to(log_p.device))[:, 0]

    def discrete_log_prob(self, alphas_cumprod):
        """log_prob(x_t, t, y) for a diffusion model with ᾱ table alphas_cumprod, t being its
        original timesteps: the classifier sees t itself when both were trained on the same
        table, else its own (fractional) timestep of the same noise level σ_t."""
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        if alphas_cumprod.shape == self.alphas_cumprod.shape and \
                np.array_equal(alphas_cumprod, self.alphas_cumprod):
            return self.log_prob
        sigmas = torch.from_numpy(np.sqrt(1 / alphas_cumprod - 1))

        def log_prob(x_t, t, y):
            return self.log_prob(x_t, self.levels.sigma_to_t(sigmas[t.cpu()]), y)
        return log_prob

    def sigma_log_prob(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p_φ(y | x_t) [B] for x = x_0 + σ·n [B, ...] at levels sigma [B]:
        x_t = x/sqrt(1 + σ²) at the classifier's timestep of σ."""
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.log_prob(x / (1 + s ** 2).sqrt(), self.levels.sigma_to_t(sigma.reshape(-1)), y)


def load_classifier(path: str, device=None, ema: Optional[str] = "auto") -> NoisyClassifier:
    """Load a `gaussdiff train-classifier` directory (ema as in gaussdiff.load)."""
    cfg = read_config(path)
    if cfg.get("kind") != "classifier":
        raise UsageError(f"{path} is not a classifier directory (made by gaussdiff train-classifier)")
    model = build_model(cfg)
    load_state_into(model, weights_path(path, cfg, ema))
    model.to(device or default_device()).eval().requires_grad_(False)
    return NoisyClassifier(model, cfg, path)


def schedule_of(model_dir: str) -> dict:
    """The noise schedule options (schedule, diffusion_steps) of a diffusion model directory,
    for training a classifier that matches it."""
    d = read_config(model_dir)["diffusion"]
    if d.get("alphas_cumprod") is not None:
        raise UsageError(f"{os.path.join(model_dir, 'config.json')}: a tabulated ᾱ schedule cannot "
                         f"be copied: pass --schedule and --diffusion-steps")
    return dict(schedule=d["schedule"], diffusion_steps=d["steps"])

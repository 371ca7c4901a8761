"""Gaussian KL and the discretized Gaussian decoder likelihood (DDPM eq. 13), in nats."""
from __future__ import annotations

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of Φ used by DDPM and improved-diffusion (kept for comparability)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) under a Gaussian discretized into 256 bins of width 2/255 on [-1, 1].

    x holds data scaled to [-1, 1] (exact bin centres); the edge bins extend to ±infinity, so the
    probabilities of the 256 bins sum to one. Returns log-probabilities in nats, shaped like x.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min,
                    torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


def mean_flat(x):
    """Mean over all non-batch dimensions: one value per sample."""
    return x.mean(dim=tuple(range(1, x.ndim)))

"""Feature statistics and the Fréchet distance (FID, Heusel et al. 2017).

    d²((μ1, Σ1), (μ2, Σ2)) = ||μ1 − μ2||² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½

tr (Σ1 Σ2)^½ is computed as the sum of the square roots of the eigenvalues of the symmetric
PSD matrix Σ1^½ Σ2 Σ1^½ (which has the eigenvalues of Σ1 Σ2). Unlike scipy.linalg.sqrtm of
the non-symmetric product (pytorch-fid, ADM's evaluator), this needs no ε-offset retry and stays
accurate when the covariances are singular (fewer samples than dimensions).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch


def _float64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    f = _float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need an [N, D] array with N >= 2, got shape {f.shape}")
    mu = f.mean(axis=0)
    c = f - mu
    sigma = c.T @ c / (f.shape[0] - 1)
    return mu, sigma


def _clip_round_off(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those at round-off level (below D·ε·λ_max, as in
    numpy's matrix_rank) set to 0. Without this, sqrt turns ~1e-16 noise on the zero
    eigenvalues of a singular covariance into ~1e-8 each, a 1e-6 relative error at D = 2048."""
    return np.where(w > w.max(initial=0.0) * len(w) * np.finfo(np.float64).eps, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(_clip_round_off(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr (Σ1 Σ2)^½ = Σ_i sqrt(λ_i(Σ1^½ Σ2 Σ1^½)) for symmetric PSD Σ1, Σ2 [D, D]."""
    s1 = _psd_sqrt(_float64(sigma1))
    m = s1 @ _float64(sigma2) @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_round_off(w)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2), computed in float64.

    mu*: [D]; sigma*: [D, D] symmetric PSD; numpy arrays or torch tensors. Returns a float >= 0.
    """
    mu1, mu2 = _float64(mu1), _float64(mu2)
    sigma1, sigma2 = _float64(sigma1), _float64(sigma2)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    # d² >= 0 exactly; a tiny negative value is round-off of two nearly equal traces
    return float(max(value, 0.0))

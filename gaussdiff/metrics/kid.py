"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

The unbiased estimate of MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³,
averaged over random subsets, as in the authors' code and torch-fidelity:

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / m²
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .frechet import _float64


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (xᵀy / d + coef0)^degree for rows x [n, d], y [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD² between samples x [m, d] and y [m, d] (same m) with the polynomial kernel."""
    x, y = _float64(x), _float64(y)
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"MMD² needs two sample sets of one size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx = polynomial_kernel(x, x, degree, coef0)
    kyy = polynomial_kernel(y, y, degree, coef0)
    kxy = polynomial_kernel(x, y, degree, coef0)
    off_xx = kxx.sum() - np.trace(kxx)
    off_yy = kyy.sum() - np.trace(kyy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * kxy.sum() / m ** 2)


def kernel_distance(features1, features2, subset_size: int = 1000, num_subsets: int = 100,
                    seed: int = 0, degree: int = 3, coef0: float = 1.0) -> Tuple[float, float, int]:
    """KID: (mean, std over subsets, subset size used) of MMD²_u between features [n1, d], [n2, d].

    Each subset draws `subset_size` rows of each set without replacement (numpy RandomState(seed),
    as torch-fidelity). The subset size is lowered to min(n1, n2) when the sets are smaller.
    """
    f1, f2 = _float64(features1), _float64(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs [n, d] feature arrays of one width, got {f1.shape} and {f2.shape}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        values[s] = mmd2_unbiased(x, y, degree, coef0)
    return float(values.mean()), float(values.std()), m

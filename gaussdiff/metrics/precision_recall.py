"""Improved Precision and Recall (Kynkäänniemi et al. 2019), k = 3 as in ADM.

The manifold of a feature set Φ is the union of balls around each φ ∈ Φ with radius the
distance to its k-th nearest neighbour in Φ (itself excluded). Then

    precision = fraction of generated features inside the real manifold  (fidelity)
    recall    = fraction of real features inside the generated manifold  (diversity)

A point lies inside when ||φ − φ'|| <= radius(φ') for some φ' of the other set.
Distances are computed in float64, a batch of rows at a time.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .frechet import _float64


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, m] between rows of a [n, d] and b [m, d]."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def knn_radii(features, k: int = 3, batch_size: int = 1000) -> np.ndarray:
    """Distance from each row of features [n, d] to its k-th nearest other row -> [n]."""
    f = torch.from_numpy(_float64(features))
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {n}")
    radii = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, batch_size):
        d = _sq_distances(f[i:i + batch_size], f)
        # the k+1 smallest include the point itself at distance 0
        radii[i:i + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii.sqrt().numpy()


def manifold_coverage(manifold, radii, queries, batch_size: int = 1000) -> np.ndarray:
    """For each query [q, d]: is it within radii[j] of some manifold point j? -> bool [q]."""
    m = torch.from_numpy(_float64(manifold))
    r2 = torch.from_numpy(_float64(radii)) ** 2
    q = torch.from_numpy(_float64(queries))
    inside = torch.empty(q.shape[0], dtype=torch.bool)
    for i in range(0, q.shape[0], batch_size):
        inside[i:i + batch_size] = (_sq_distances(q[i:i + batch_size], m) <= r2[None]).any(1)
    return inside.numpy()


def precision_recall(real_features, fake_features, k: int = 3,
                     batch_size: int = 1000) -> Tuple[float, float]:
    """(precision, recall) of fake features [n_f, d] against real features [n_r, d]."""
    real, fake = _float64(real_features), _float64(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall need [n, d] arrays of one width, got {real.shape} and {fake.shape}")
    precision = manifold_coverage(real, knn_radii(real, k, batch_size), fake, batch_size).mean()
    recall = manifold_coverage(fake, knn_radii(fake, k, batch_size), real, batch_size).mean()
    return float(precision), float(recall)

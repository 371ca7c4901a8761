"""Inception Score (Salimans et al. 2016) from class probabilities p(y|x).

    IS = exp( E_x KL(p(y|x) || p(y)) ),  p(y) = E_x p(y|x)

computed on `splits` equal chunks, reporting the mean and standard deviation over chunks.
gaussdiff's Inception network ends at the pool3 features (it has no ImageNet classifier
head), so the CLI computes IS with a classifier trained on the data (`is_<name>`).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .frechet import _float64


def inception_score(probs, splits: int = 1) -> Tuple[float, float]:
    """(mean, std over splits) of the Inception Score of class probabilities probs [N, K]."""
    p = _float64(probs)
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"inception_score needs probabilities [N, K] with N >= splits >= 1, "
                         f"got shape {p.shape} and splits={splits}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        # 0 · log 0 = 0
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(np.where(py > 0, py, 1))), 0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))

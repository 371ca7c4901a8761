"""Exact networks with known answers, shared by the tests."""
import numpy as np
import torch


class GaussianOracleEps(torch.nn.Module):
    """The exact ε-predictor of data x_0 ~ N(μ, s² I): E[ε | x_t] = sqrt(1 − ᾱ_t)(x_t −
    sqrt(ᾱ_t)μ)/(ᾱ_t s² + 1 − ᾱ_t), with ᾱ looked up at the ORIGINAL timestep index it gets.
    s = 1, μ = 0 gives sqrt(1 − ᾱ_t)·x_t. A zero parameter tells Pipeline its device."""

    def __init__(self, alphas_cumprod, s: float = 1.0, mu: float = 0.0):
        super().__init__()
        self.register_buffer("a", torch.from_numpy(np.asarray(alphas_cumprod)))
        self.s, self.mu = s, mu
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, **unused):
        a = self.a[t].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)

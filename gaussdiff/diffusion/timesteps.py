"""Which timesteps to train on: uniform, or importance-sampled (Improved DDPM section 3.3).

L_vlb = Σ_t L_t = E_{t~p} [L_t / p_t]: any p_t > 0 gives an unbiased estimate. Improved DDPM
takes p_t ∝ sqrt(E[L_t²]), estimated from the last 10 losses seen at each t, which cuts the
variance of L_vlb training. This is improved-diffusion's LossSecondMomentResampler:
uniform until every step has 10 losses of history, then

    p_t = (1 − u) · sqrt(mean(history_t²)) / Σ_s sqrt(mean(history_s²)) + u / T,   u = 0.001

A sampler returns (t, w) with w = 1 / (T · p_t): the mean of w · L_t over t ~ p estimates the
mean of L_t over uniform t, so the loss keeps its meaning (and its scale) under any sampler.
State is kept in tensors (state_tensors / load_state_tensors) so a resumed run is bit-exact.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from ..errors import UsageError

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


class ScheduleSampler:
    """Base: a distribution p over this diffusion's T steps."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalised probabilities, float64 [T]."""
        return np.ones(self.num_timesteps)

    def probs(self) -> np.ndarray:
        w = self.weights()
        return w / w.sum()

    def sample(self, batch_size: int, generator: torch.Generator = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t long [B], weights float32 [B] = 1 / (T · p_t)), drawn with `generator` (CPU)."""
        p = torch.from_numpy(self.probs())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor):
        """Record per-sample losses [B] seen at timesteps t [B] (no-op for fixed samplers)."""

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state: Dict[str, torch.Tensor]):
        pass


class UniformSampler(ScheduleSampler):
    """t uniform on [0, T), all weights 1. Draws exactly torch.randint(0, T, (B,), generator)."""

    def sample(self, batch_size, generator=None):
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator)
        return t, torch.ones(batch_size)


class LossSecondMomentResampler(ScheduleSampler):
    """p_t ∝ sqrt(E[L_t²]) over the last `history_per_term` losses at each t, mixed with
    `uniform_prob` of the uniform distribution; uniform until every t has a full history."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term, self.uniform_prob = int(history_per_term), float(uniform_prob)
        self.loss_history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self.loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self):
        if not self.warmed_up():
            return np.ones(self.num_timesteps)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t, losses):
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.loss_counts[ti] == self.history_per_term:   # shift out the oldest
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, self.loss_counts[ti]] = loss
                self.loss_counts[ti] += 1

    def state_tensors(self):
        return {"resample.history": torch.from_numpy(self.loss_history.copy()),
                "resample.counts": torch.from_numpy(self.loss_counts.copy())}

    def load_state_tensors(self, state):
        if "resample.history" not in state:
            raise UsageError("--resume: the checkpoint holds no loss-second-moment history: "
                             "resume with the --schedule-sampler the run was started with")
        history = state["resample.history"].numpy().astype(np.float64)
        if history.shape != self.loss_history.shape:
            raise UsageError(f"--resume: the checkpoint's resampler history has shape "
                             f"{tuple(history.shape)}, expected {self.loss_history.shape}")
        self.loss_history = history.copy()
        self.loss_counts = state["resample.counts"].numpy().astype(np.int64).copy()


def make_schedule_sampler(name: str, num_timesteps: int) -> ScheduleSampler:
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise UsageError(f"unknown schedule sampler {name!r}: choose one of {', '.join(SCHEDULE_SAMPLERS)}")

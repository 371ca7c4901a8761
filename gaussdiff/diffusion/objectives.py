"""Training objectives: one contract for every loss the trainer optimises.

`Objective` is what `gaussdiff.training.Trainer` needs from an objective. Three implement it:

- `DiscreteObjective`: the discrete-time process of DDPM / Improved DDPM / ADM
  (`GaussianDiffusion.training_losses`: L_simple, L_hybrid, L_vlb, P2 and min-SNR weighting),
  t from a timestep sampler (uniform, or importance sampling with weights 1/(T p_t)).
  config.json: a "diffusion" section.
- `SigmaObjective`: EDM's σ-space table (VP, VE, iDDPM, EDM preconditioning and loss, EDM
  eq. 8), σ from the loss's p_train(σ). config.json: "precond" and "objective" sections only.
- `ClassifierObjective`: ADM's noisy classifier, cross-entropy on x_t = q_sample(x_0, t) with t
  uniform. config.json: a "diffusion" section with only the schedule ("schedule", "steps").

A training step calls, in this order: `draw` (the noise levels and noise of the whole global
batch, from the trainer's generator, so that every row gets the same random numbers whatever
the number of processes or microbatches), `losses` on any rows of that draw, and, once the
step's losses are gathered, `observe` (the importance sampler's history).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from .precond import make_loss, make_precond, objective_sections
from .process import GaussianDiffusion
from .timesteps import ScheduleSampler

# `gaussdiff train` options that only one family of objectives reads; each objective names the
# ones it ignores, and the trainer leaves them out of config.json's "training" record.
DISCRETE_LOSS_OPTIONS = ("mean_type", "var_type", "loss", "hybrid_lambda", "vb_stop_grad",
                         "p2_gamma", "p2_k", "min_snr_gamma")
DISCRETE_OPTIONS = ("schedule", "diffusion_steps") + DISCRETE_LOSS_OPTIONS + ("schedule_sampler",)
SIGMA_OPTIONS = ("sigma_data", "p_mean", "p_std", "precond")


@dataclass
class Draw:
    """The random part of one training step, for the B rows of the global batch.
    levels: t [B] (long, discrete objectives) or σ [B]; noise [B, C, H, W] as the objective
    adds it; weights [B]: the importance weights of t (1 when t is uniform), or None."""
    levels: torch.Tensor
    noise: torch.Tensor
    weights: Optional[torch.Tensor] = None

    def rows(self, sl: slice) -> "Draw":
        return Draw(self.levels[sl], self.noise[sl], None if self.weights is None else self.weights[sl])


class Objective(Protocol):
    """What the trainer needs from a training objective (see the module docstring)."""
    name: str               # "ddpm", "edm", "vp", "ve", "iddpm" or "classifier"
    num_timesteps: Optional[int]   # T of a discrete-time objective; None in σ-space
    unused_options: Tuple[str, ...]   # training options this objective ignores

    def sections(self) -> dict:
        """The config.json sections that describe this objective (and nothing else)."""

    def output_channels(self, channels: int) -> int:
        """The network's output channels for images of `channels` channels (a learned Σ doubles them)."""

    def network(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a step differentiates: the network itself, or the denoiser D(x; σ) around it."""

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> Draw:
        """Noise levels and noise for every row of x0 (the global batch)."""

    def losses(self, net, x0: torch.Tensor, draw: Draw, model_kwargs: dict
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(the per-row loss to minimise [b], the per-row terms to log, each [b]) for the rows
        x0 [b] and their draw."""

    def observe(self, draw: Draw, loss: torch.Tensor) -> None:
        """The finite per-row losses [B] of a whole step (importance sampling's history)."""

    def quarters(self, draw: Draw) -> Optional[torch.Tensor]:
        """Each row's quarter of the process (0 for t in [0, T/4), ... 3), for the log; or None."""

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """The state a resumed run needs (checkpoint's state.safetensors)."""

    def load_state_tensors(self, state: Dict[str, torch.Tensor]) -> None:
        ...


class _TimestepObjective:
    """Shared by the objectives whose noise level is a discrete timestep t of `diffusion`,
    drawn by `sampler`."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: ScheduleSampler):
        self.diffusion, self.sampler, self.num_timesteps = diffusion, sampler, diffusion.num_timesteps

    def network(self, model):
        return model

    def draw(self, x0, generator):
        t, weights = self.sampler.sample(x0.shape[0], generator)   # uniform: weights 1
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return Draw(t.to(x0.device), noise, weights.to(x0.device))

    def observe(self, draw, loss):
        self.sampler.update(draw.levels, loss)

    def quarters(self, draw):
        return draw.levels * 4 // self.num_timesteps

    def state_tensors(self):
        return self.sampler.state_tensors()

    def load_state_tensors(self, state):
        self.sampler.load_state_tensors(state)


class DiscreteObjective(_TimestepObjective):
    """DDPM / Improved DDPM / ADM: `diffusion.training_losses`, weighted by 1/(T p_t)."""
    name = "ddpm"
    unused_options = SIGMA_OPTIONS

    def __init__(self, diffusion: GaussianDiffusion, sampler: ScheduleSampler, config: dict):
        super().__init__(diffusion, sampler)
        self.config = config   # the "diffusion" section

    def sections(self):
        return {"diffusion": dict(self.config)}

    def output_channels(self, channels):
        return channels * (2 if self.diffusion.learns_variance else 1)

    def losses(self, net, x0, draw, model_kwargs):
        terms = self.diffusion.training_losses(net, x0, draw.levels, draw.noise, model_kwargs)
        return terms["loss"] * draw.weights, terms   # w = 1/(T p_t): an unbiased estimate


class SigmaObjective:
    """EDM's σ-space objectives: λ(σ)·||D(x_0 + n; σ) − x_0||² with σ ~ p_train(σ) (EDM eq. 8)."""
    num_timesteps = None
    unused_options = DISCRETE_OPTIONS

    def __init__(self, name: str, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2,
                 precond: Optional[str] = None):
        self.name = name   # the loss's column; precond: another column's c_skip, c_out, c_in, c_noise
        self.precond, self.objective = objective_sections(name, sigma_data, P_mean, P_std,
                                                          precond=precond)
        self.loss = make_loss(self.objective)

    def sections(self):
        return {"precond": self.precond, "objective": self.objective}

    def output_channels(self, channels):
        return channels   # F_θ has no variance output

    def network(self, model):
        return make_precond(self.precond, model)

    def draw(self, x0, generator):
        sigma, noise = self.loss.draw(x0, generator)
        return Draw(sigma, noise)

    def losses(self, net, x0, draw, model_kwargs):
        terms = self.loss.evaluate(net, x0, draw.levels, draw.noise, model_kwargs)
        return terms["loss"], terms

    def observe(self, draw, loss):
        pass

    def quarters(self, draw):
        return None

    def state_tensors(self):
        return {}

    def load_state_tensors(self, state):
        pass


class ClassifierObjective(_TimestepObjective):
    """ADM's noisy-classifier objective: cross-entropy of p_φ(y | x_t, t) on x_t = q_sample(x_0, t),
    t uniform. Logged terms: loss (nats) and acc (1 where the arg-max is right)."""
    name = "classifier"
    unused_options = DISCRETE_LOSS_OPTIONS + SIGMA_OPTIONS

    def __init__(self, diffusion: GaussianDiffusion, sampler: ScheduleSampler, schedule: dict):
        super().__init__(diffusion, sampler)
        self.schedule = schedule   # {"schedule", "steps"}

    def sections(self):
        return {"diffusion": dict(self.schedule)}

    def output_channels(self, channels):
        return channels   # unused: the classifier's outputs are its classes (network_config)

    def losses(self, net, x0, draw, model_kwargs):
        kwargs = dict(model_kwargs or {})
        y = kwargs.pop("y")
        x_t = self.diffusion.q_sample(x0, draw.levels, draw.noise)
        logits = net(x_t, self.diffusion.model_timesteps(draw.levels), **kwargs).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        return loss * draw.weights, dict(loss=loss, acc=(logits.argmax(dim=1) == y).float())

"""The Gaussian diffusion process and what defines it.

- process.py: `GaussianDiffusion` (DDPM / Improved DDPM / ADM: q, posterior, p, VLB, losses,
  DDPM/DDIM loops), `make_diffusion`, and the mean/variance/loss type names
- schedules.py: β schedules, respacing, σ levels (Karras ρ, VP, VE, iDDPM), the VP/EDM ODEs
- precond.py: EDM's table: the VP/VE/iDDPM/EDM preconditioners and their losses
- gaussian.py: Gaussian KL and the discretized Gaussian log-likelihood (in nats)
- timesteps.py: timestep samplers for training (uniform, loss-second-moment importance sampling)
- objectives.py: the `Objective` contract every training objective implements (the discrete
  process, EDM's σ-space table, ADM's noisy classifier), and the config sections each writes

`from gaussdiff.diffusion import X` keeps working for every public name of the former
gaussdiff/diffusion.py module.
"""
from .gaussian import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .process import (FIXED_VAR_TYPES, LN2, LOSS_TYPES, MEAN_TYPES, VAR_TYPES, GaussianDiffusion,
                      make_diffusion)

__all__ = ["FIXED_VAR_TYPES", "LN2", "LOSS_TYPES", "MEAN_TYPES", "VAR_TYPES", "GaussianDiffusion",
           "make_diffusion", "discretized_gaussian_log_likelihood", "mean_flat", "normal_kl"]

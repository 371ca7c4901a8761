"""Negative log-likelihood bounds in bits/dim: `gaussdiff nll`.

The variational bound of DDPM eq. 5 / Improved DDPM eq. 4-5, per image:

    L_vlb = L_T (prior) + Σ_{t=1}^{T-1} L_t (KL terms) + L_0 (discretized decoder)

computed by GaussianDiffusion.calc_bpd_loop on the model's diffusion or on a respaced one
with K evaluation steps (Improved DDPM Fig. 5: NLL versus number of evaluation steps).
Image i's noise depends only on (seed, i), so results do not depend on the batch size.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import to_model_range
from ..errors import UsageError
from ..rng import image_generators


def mean_stderr(values) -> dict:
    """{"mean", "stderr"} of per-image values; stderr = std(ddof=1) / sqrt(n) (None if n = 1)."""
    v = np.asarray(values, dtype=np.float64)
    stderr = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "stderr": stderr}


@torch.no_grad()
def evaluate_nll(pipe, images: np.ndarray, labels: Optional[np.ndarray] = None, steps=None,
                 batch_size: int = 16, seed: int = 0, progress: bool = True,
                 clip_denoised: bool = True) -> dict:
    """The VLB in bits/dim of uint8 NHWC images under a loaded Pipeline.

    steps: None for the model's own T steps, else a respacing (an int K, "ddimK", "a,b,c").
    Returns a JSON-ready dict: bpd (mean, stderr), terms {prior, decoder, kl_sum} (mean,
    stderr), per_step {t (original indices), vb, mse (of ε), xstart_mse (of the x̂_0 from that
    step's x_t)} (means over images, bits/dim for vb),
    and per_image total_bpd. total = prior + decoder + kl_sum for every image.
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be positive")
    if pipe.config.get("precond"):
        raise UsageError(f"{pipe.path or 'this model'} was trained in σ-space: nll computes the "
                         f"discrete-time VLB, which needs a discrete diffusion model")
    C, H, W = pipe.image_shape
    if images.shape[1:] != (H, W, C):
        raise UsageError(f"the data has images of shape {images.shape[1:]} (HWC), "
                         f"the model expects {(H, W, C)}")
    diffusion = pipe.diffusion if steps is None else pipe.respaced(steps)
    device = next(pipe.model.parameters()).device
    pipe.model.eval()
    totals, priors, decoders, kl_sums, vb_sum, mse_sum, xmse_sum = [], [], [], [], 0.0, 0.0, 0.0
    bar = tqdm(total=len(images), desc=f"nll ({diffusion.num_timesteps} steps)", unit="img",
               disable=not progress)
    for start in range(0, len(images), batch_size):
        idx = range(start, min(start + batch_size, len(images)))
        x0 = to_model_range(torch.from_numpy(images[start:idx.stop])).to(device)
        kwargs = {}
        if pipe.num_classes is not None:
            if labels is None:
                raise UsageError("the model is class-conditional: the data needs labels")
            kwargs["y"] = torch.from_numpy(labels[start:idx.stop]).to(device)
        gens = image_generators(seed, idx)
        out = diffusion.calc_bpd_loop(pipe.model, x0, clip_denoised=clip_denoised,
                                      model_kwargs=kwargs, generator=gens)
        vb, prior = out["vb"].double().cpu(), out["prior_bpd"].double().cpu()
        totals.append(prior + vb.sum(1))   # summed in float64, not calc_bpd_loop's float32 total
        priors.append(prior)
        decoders.append(vb[:, 0])
        kl_sums.append(vb[:, 1:].sum(1))
        vb_sum = vb_sum + vb.sum(0)
        mse_sum = mse_sum + out["mse"].double().cpu().sum(0)
        xmse_sum = xmse_sum + out["xstart_mse"].double().cpu().sum(0)
        bar.update(len(idx))
    bar.close()
    n = len(images)
    total = torch.cat(totals).numpy()
    return {
        "bpd": mean_stderr(total),
        "terms": {"prior": mean_stderr(torch.cat(priors).numpy()),
                  "decoder": mean_stderr(torch.cat(decoders).numpy()),
                  "kl_sum": mean_stderr(torch.cat(kl_sums).numpy())},
        "num": n,
        "num_steps": diffusion.num_timesteps,
        "per_step": {"t": [int(t) for t in diffusion.timestep_map],
                     "vb": (vb_sum / n).tolist(), "mse": (mse_sum / n).tolist(),
                     "xstart_mse": (xmse_sum / n).tolist()},
        "per_image": {"total_bpd": total.tolist()},
    }

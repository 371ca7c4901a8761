"""`Pipeline`: a loaded model and the one `sample` call behind every sampler.

`gaussdiff.load(path)` (gaussdiff.modeldir) returns one. `Pipeline.sample` looks the sampler up
in the registry (gaussdiff.sampling.samplers.REGISTRY): σ-space samplers run on the denoiser
contract D(x; σ) (the preconditioned network of a σ-space model, or `DiscreteDenoiser` around
a discrete-time one); `ddpm` (ancestral, learned variances) and the seeds' `ddim` run on the
discrete engine (GaussianDiffusion). Image i depends only on (seed, start_index + i).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import to_uint8
from ..diffusion.process import FIXED_VAR_TYPES, GaussianDiffusion, make_diffusion
from ..diffusion.schedules import SIGMA_SCHEDULES, iddpm_sigmas, karras_sigmas, ve_sigmas, vp_sigmas
from ..errors import UsageError
from ..rng import image_generators
from ..training.precision import autocast_forward
from ..validate import check_sampling_numbers, task_of
from .denoisers import ClipDenoised, pipeline_denoiser
from .samplers import SAMPLER_NAMES, SAMPLERS, NFECounter, get_spec


@dataclass
class Pipeline:
    """A loaded model: `.model` (the network), `.diffusion` (its full-length GaussianDiffusion)
    and `.config` (config.json). `.sample(...)` draws images. Models trained in σ-space
    (config.json has a "precond" section, `gaussdiff train --objective edm|vp|ve|iddpm`) have
    `.denoiser`, the preconditioned network D(x, sigma, **cond) (gaussdiff.diffusion.precond)
    that σ-space samplers take, instead of a `.diffusion` (None)."""
    model: torch.nn.Module
    diffusion: Optional[GaussianDiffusion]
    config: dict
    path: str = ""
    denoiser: Optional[torch.nn.Module] = None

    @property
    def image_shape(self):
        d = self.config["data"]
        return (d["channels"], d["image_size"], d["image_size"])

    @property
    def num_classes(self) -> Optional[int]:
        return self.config["model"].get("num_classes")

    @property
    def task(self) -> str:
        """"generate", or "upsample" for the second stage of a cascade (needs low_res)."""
        return task_of(self.config)["type"]

    def respaced(self, steps, var_type: Optional[str] = None) -> GaussianDiffusion:
        """This model's diffusion respaced to `steps` (an int, "ddimN", "a,b,c" or a list of
        section counts, as improved-diffusion reads one); var_type "fixed_small" (β̃_t) or
        "fixed_large" (β_t) replaces the model's reverse variances (a learned-Σ model's
        variance channels are then ignored: Improved DDPM Fig. 8's fixed-Σ curves)."""
        if self.diffusion is None:
            raise UsageError(f"{self.path or 'this model'} was trained in σ-space (objective "
                             f"{self.config['precond']['type']}): it has no discrete diffusion to "
                             f"respace; use a σ-space sampler such as heun")
        spacing = steps if not isinstance(steps, int) else str(steps)
        config = dict(self.config["diffusion"])
        if var_type is not None:
            if var_type not in FIXED_VAR_TYPES:
                raise UsageError(f"--var-type {var_type}: choose one of {', '.join(FIXED_VAR_TYPES)}")
            config["var_type"] = var_type
        return make_diffusion(respacing=spacing, **config)

    def sigma_steps(self, steps: int, schedule: str = "karras", rho: Optional[float] = None,
               sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
               denoiser=None) -> np.ndarray:
        """The steps + 1 noise levels σ_0 > ... > σ_N = 0 of a σ-space sampler (EDM Table 1).

        "karras": EDM eq. 5 with ρ = 7 on [max(0.002, model σ_min), min(80, model σ_max)] (EDM's
        σ range clipped to the model's, as NVlabs/edm does); "ve": geometric on [0.02, 100];
        "vp": β_d = 19.9, β_min = 0.1, ε_s = 1e-3; "iddpm": u_j with j0 = 8 of the model's own ᾱ
        table (discrete-time models) or of iDDPM's cosine. rho applies to karras, sigma_min and
        sigma_max to karras and ve.
        """
        if schedule not in SIGMA_SCHEDULES:
            raise UsageError(f"unknown σ schedule {schedule!r}: choose one of {', '.join(SIGMA_SCHEDULES)}")
        if rho is not None and schedule != "karras":
            raise UsageError(f"rho applies only to the karras schedule, not {schedule}")
        if (sigma_min, sigma_max) != (None, None) and schedule not in ("karras", "ve"):
            raise UsageError(f"sigma_min and sigma_max apply to the karras and ve schedules, not {schedule}")
        D = denoiser if denoiser is not None else pipeline_denoiser(self)
        if schedule == "karras":
            return karras_sigmas(steps, max(0.002, D.sigma_min) if sigma_min is None else sigma_min,
                                 min(80.0, D.sigma_max) if sigma_max is None else sigma_max,
                                 7.0 if rho is None else rho)
        if schedule == "ve":
            return ve_sigmas(steps, 0.02 if sigma_min is None else sigma_min,
                             100.0 if sigma_max is None else sigma_max)
        if schedule == "vp":
            return vp_sigmas(steps)
        return iddpm_sigmas(steps, getattr(D, "alphas_cumprod", None))

    @torch.no_grad()
    def sample(self, num: int, sampler: str = "ddim", steps=50, eta: Optional[float] = None,
               seed: int = 0, batch_size: int = 64, labels: Optional[Sequence[int]] = None,
               progress: bool = True, clip_denoised: bool = True, start_index: int = 0, *,
               sigma_schedule: Optional[str] = None, rho: Optional[float] = None,
               sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
               churn: Optional[float] = None, tmin: Optional[float] = None,
               tmax: Optional[float] = None, snoise: Optional[float] = None,
               rtol: Optional[float] = None, atol: Optional[float] = None, quantize: bool = False,
               state_dtype: Optional[torch.dtype] = None, stats: Optional[dict] = None,
               guidance=None, low_res: Optional[torch.Tensor] = None, precision: str = "fp32",
               var_type: Optional[str] = None, callback=None):
        """Draw `num` images. Returns (uint8 NHWC array, int64 labels or None).

        sampler: "ddpm" (ancestral) or "ddim" (with eta), the discrete engine, with `steps` a
        respacing of the original T (250, "ddim50", "10,15,20"); or a σ-space sampler of
        gaussdiff.sampling.samplers.SAMPLERS (euler, heun, heun_vp, euler_ancestral, ddim_sigma,
        dpmpp_2m, adaptive) with an integer number of `steps` on the levels of `sigma_schedule`
        (karras, the default, vp, ve or iddpm; with rho, sigma_min, sigma_max: see `sigma_steps`).
        Sampler options, an error where the sampler does not take them: eta (ddim, ddim_sigma,
        euler_ancestral; ignored by ddpm), churn, tmin, tmax (EDM's S_churn, S_tmin, S_tmax:
        heun, euler), snoise (S_noise: heun, euler, euler_ancestral, ddim_sigma), rtol, atol
        (adaptive).
        quantize: give a discrete-time model the nearest discrete timestep instead of a
        fractional one. state_dtype: the σ-space state (default float64 on CPU, else float32).
        clip_denoised: clamp the x0 estimate to [-1, 1], for every sampler.
        stats: a dict that receives "nfe", the network evaluations per image (the most over the
        batches), and "nfe_per_batch".
        guidance: a gaussdiff.sampling.guidance.Guidance (classifier and classifier-free guidance,
        temperature). low_res: [num, C, h, w] in [-1, 1], the low-resolution images an
        upsampling model (`task` "upsample") refines, row i for image i.
        precision: "fp32", or "bf16"/"fp16": the network runs under autocast and returns float32
        (gaussdiff.training.precision.autocast_forward); the sampler's state and arithmetic keep
        their dtype.
        var_type: the ddpm sampler's reverse variances instead of the model's own: "fixed_small"
        (β̃_t) or "fixed_large" (β_t); see `respaced`.
        callback: called after every step of every batch with dict(step, steps, start, denoised):
        step in 1..steps, `start` the batch's first image index, `denoised` the x̂_0 estimate
        [B, C, H, W] in [-1, 1] of that step (the watchable preview; the discrete engines'
        pred_xstart, the σ-space samplers' D(x; σ)).
        Image i depends only on (seed, start_index + i), never on the batch size.
        """
        options = dict(eta=eta, churn=churn, tmin=tmin, tmax=tmax, snoise=snoise, rtol=rtol, atol=atol)
        check_sampling_numbers(rho=rho, sigma_min=sigma_min, sigma_max=sigma_max, **options)
        options = {k: v for k, v in options.items() if v is not None}
        if get_spec(sampler, None).discrete:
            if self.config.get("precond"):
                raise UsageError(f"{self.path or 'this model'} was trained in σ-space (objective "
                                 f"{self.config['precond']['type']}): the discrete {sampler} sampler does "
                                 f"not apply; use a σ-space sampler such as heun")
            _check_sampler_options(sampler, options, ("eta",))   # ddpm ignores eta, as it always did
            given = dict(sigma_schedule=sigma_schedule, rho=rho, sigma_min=sigma_min,
                         sigma_max=sigma_max, quantize=quantize or None, state_dtype=state_dtype,
                         var_type=var_type)
            _check_sampler_options(sampler, {k: v for k, v in given.items() if v is not None},
                                   ("var_type",) if sampler == "ddpm" else ())
            diffusion = self.respaced(steps, var_type)
            loop = diffusion.p_sample_loop if sampler == "ddpm" else \
                partial(diffusion.ddim_sample_loop, eta=options.get("eta", 0.0))
            num_steps = diffusion.num_timesteps
            wrap, guided = (lambda m: m), {}
            if guidance is not None:   # model wrappers, cond_fn and noise_scale of the loop
                wrap, guided = guidance.for_discrete(self, sampler, options)

            def run(noise, kwargs, gens, batch_stats, report=None):
                return loop(wrap(NFECounter(self.model, batch_stats)), noise.shape, noise=noise,
                            model_kwargs=kwargs, clip_denoised=clip_denoised, generator=gens,
                            callback=report and (lambda d: report(d["pred_xstart"])), **guided)
        else:
            if var_type is not None:
                _check_sampler_options(sampler, {"var_type": var_type}, ())
            run, num_steps = self._sigma_sampler(sampler, steps, options, sigma_schedule, rho,
                                                 sigma_min, sigma_max, quantize, clip_denoised,
                                                 state_dtype, guidance)
        if (low_res is None) != (self.task != "upsample") or \
                (low_res is not None and len(low_res) != num):
            raise UsageError(f"{self.path or 'this model'}: pass low_res, {num} low-resolution images, "
                             f"if and only if the model is an upsampler (its task is {self.task})")
        device = next(self.model.parameters()).device
        self.model.eval()
        out, out_labels, nfe = [], [], []
        nc = self.num_classes   # an unconditional model guided by a classifier: its labels
        if nc is None and guidance is not None:
            nc = guidance.num_classes
        bar = tqdm(total=num, disable=not progress, desc=f"sampling ({sampler}, {num_steps} steps)",
                   unit="img")
        with autocast_forward(self.model, precision):   # the network only, not the sampler
            for start in range(0, num, batch_size):
                idx = range(start_index + start, start_index + min(start + batch_size, num))
                gens = image_generators(seed, idx)
                kwargs = {}
                if nc is not None:
                    if labels is not None:
                        y = torch.as_tensor([labels[i - start_index] for i in idx], dtype=torch.long)
                    else:
                        y = torch.tensor([int(torch.randint(nc, (1,), generator=g)) for g in gens])
                    kwargs["y"] = y.to(device)
                    out_labels.append(y.numpy())
                if low_res is not None:
                    kwargs["low_res"] = low_res[start:start + len(idx)].to(device)
                shape = (len(idx),) + self.image_shape
                noise = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)
                batch_stats = {}
                report = None
                if callback is not None:
                    done = [0]   # steps of this batch (the adaptive sampler's count is its own)

                    def report(denoised, first=start_index + start):
                        done[0] += 1
                        callback(dict(step=done[0], steps=max(num_steps, done[0]), start=first,
                                      denoised=denoised))
                x = run(noise, kwargs, gens, batch_stats, report)
                if not torch.isfinite(x).all():   # never let NaN become black images on disk
                    raise UsageError(f"{self.path or 'the model'}: the {sampler} sampler produced "
                                     f"NaN or infinite values (images {idx.start}..{idx.stop - 1}); "
                                     f"nothing was written: check the sampler options and the weights")
                nfe.append(batch_stats["nfe"])
                out.append(to_uint8(x))
                bar.update(len(idx))
        bar.close()
        if stats is not None:
            stats.update(nfe=max(nfe), nfe_per_batch=nfe)
        return np.concatenate(out), (np.concatenate(out_labels) if out_labels else None)

    def _sigma_sampler(self, sampler, steps, options, sigma_schedule, rho, sigma_min, sigma_max,
                       quantize, clip_denoised, state_dtype, guidance=None):
        """(run(noise, model_kwargs, generators, stats) -> x, number of steps) of a σ-space sampler."""
        if sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLER_NAMES)}")
        fn = SAMPLERS[sampler]
        if isinstance(steps, str) and steps.isdigit():
            steps = int(steps)
        if not isinstance(steps, int) or steps < 1:
            raise UsageError(f"the {sampler} sampler takes a positive integer number of steps, got {steps!r}")
        _check_sampler_options(sampler, options, tuple(inspect.signature(fn).parameters))
        kwargs = {("noise_scale" if k == "snoise" else k): v for k, v in options.items()}
        denoiser = pipeline_denoiser(self, quantize)
        sigmas = self.sigma_steps(steps, sigma_schedule or "karras", rho, sigma_min, sigma_max, denoiser)
        if guidance is not None:   # denoiser wrappers (clipping included) and noise_scale
            denoiser, kwargs = guidance.for_sigma_space(self, denoiser, sampler, kwargs, clip_denoised)
        elif clip_denoised:
            denoiser = ClipDenoised(denoiser)
        device = next(self.model.parameters()).device
        dtype = state_dtype or (torch.float64 if device.type == "cpu" else torch.float32)

        def run(noise, model_kwargs, gens, batch_stats, report=None):
            return fn(denoiser, noise.to(dtype) * float(sigmas[0]), sigmas, generator=gens,
                      model_kwargs=model_kwargs, stats=batch_stats,
                      callback=report and (lambda d: report(d["denoised"])), **kwargs)
        return run, steps


def _check_sampler_options(sampler: str, given: dict, accepted):
    """A UsageError for the first option in `given` that `sampler` does not take."""
    for name in given:
        if (name if name != "snoise" else "noise_scale") not in accepted:
            raise UsageError(f"option {name} does not apply to the {sampler} sampler")

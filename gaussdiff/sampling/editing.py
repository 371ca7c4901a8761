"""Image tools on a trained model: DDIM inversion and reconstruction, latent interpolation
(ADM section H), inpainting (replacement, RePaint resampling) and the two-stage cascade
(Improved DDPM section 3). Images go in and come out as uint8 NHWC arrays (what
data.read_image reads and gaussdiff.images writes); latents are float32 [N, C, H, W].
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import to_model_range, to_uint8
from .denoisers import ClipDenoised, pipeline_denoiser
from ..errors import UsageError
from ..rng import image_generators, randn_like, seed_for
from ..validate import task_of
from .pipeline import Pipeline
from .samplers import SAMPLERS, euler, to_d


def _device(pipe: Pipeline) -> torch.device:
    return next(pipe.model.parameters()).device


def _discrete_only(pipe: Pipeline, what: str, runs: str = "the discrete DDIM ODE"):
    _generator_only(pipe, what)
    if pipe.config.get("precond"):
        raise UsageError(f"{pipe.path or 'this model'} was trained in σ-space: {what} runs "
                         f"{runs} and needs a discrete-time model")


def _generator_only(pipe: Pipeline, what: str):
    if pipe.task != "generate":
        raise UsageError(f"{pipe.path or 'this model'} is an upsampler: {what} needs a model that "
                         f"generates images on its own")


def _sigma_space(pipe: Pipeline, skip_last) -> bool:
    """Whether the model was trained in σ-space (inversion by Euler steps in σ, see `invert`);
    skip_last, a discrete-only option, must then be left unset (None)."""
    if not pipe.config.get("precond"):
        return False
    if skip_last is not None:
        raise UsageError(f"{pipe.path or 'this model'} was trained in σ-space: --skip-last applies to "
                         f"discrete-time models (σ-space inversion already ends at σ_max, the level "
                         f"where sampling starts); leave it out")
    return True


def _euler_levels(pipe: Pipeline, steps) -> list:
    """The levels σ_0 > ... > σ_{N-1} > σ_N = 0 of `gaussdiff sample --sampler euler --steps N`
    (the karras schedule of `Pipeline.sigma_steps`), as Python floats."""
    if isinstance(steps, str) and steps.isdigit():
        steps = int(steps)
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"{pipe.path or 'this model'} was trained in σ-space: --steps is a positive "
                         f"number of Euler steps, not a respacing ({steps!r})")
    return [float(s) for s in pipe.sigma_steps(steps)]


def _state_dtype(device: torch.device, x: torch.Tensor) -> torch.dtype:
    """The σ-space ODE state: float64 on CPU (as Pipeline.sample) or for float64 input."""
    return torch.float64 if device.type == "cpu" or x.dtype == torch.float64 else torch.float32


def euler_inversion(denoiser, x: torch.Tensor, sigmas: Sequence[float], model_kwargs=None,
                    progress: bool = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (EDM eq. 4) with
    ASCENDING levels sigmas[0] < ... < sigmas[-1]: x [B, ...] at sigmas[0] -> x at sigmas[-1].
    DDIM with η = 0 is this Euler method run downwards (`samplers.ddim`), so this is DDIM
    inversion in σ-space; `samplers.euler` over the reversed levels is its decoder."""
    for sigma, sigma_next in tqdm(list(zip(sigmas[:-1], sigmas[1:])), disable=not progress,
                                  desc="invert"):
        denoised = denoiser(x, x.new_full((len(x),), sigma), **(model_kwargs or {}))
        x = x + (sigma_next - sigma) * to_d(x, sigma, denoised)
    return x


def _to_model(images, device) -> torch.Tensor:
    """uint8 NHWC (numpy or tensor) -> float NCHW in [-1, 1]; float NCHW passes through."""
    x = torch.as_tensor(images)
    return (to_model_range(x) if x.dtype == torch.uint8 else x).to(device)


def label_kwargs(pipe: Pipeline, labels, n: int, device) -> dict:
    """{"y": labels} for a class-conditional model ([n] ints, or [n, K] float label weights
    over the K rows of its label embedding), {} for an unconditional one."""
    if pipe.num_classes is None:
        if labels is not None:
            raise UsageError(f"{pipe.path or 'this model'} is not class-conditional: it takes no labels")
        return {}
    if labels is None:
        raise UsageError(f"{pipe.path or 'this model'} is class-conditional: give the class labels")
    y = torch.as_tensor(labels)
    y = y.float() if y.is_floating_point() else y.long()
    if y.shape[0] != n:
        raise UsageError(f"{y.shape[0]} labels for {n} images")
    if not y.is_floating_point() and (y.min() < 0 or y.max() >= pipe.num_classes):
        raise UsageError(f"labels must lie in [0, {pipe.num_classes}), got {y.tolist()}")
    return {"y": y.to(device)}


def label_weights(pipe: Pipeline, labels: Sequence[int]) -> torch.Tensor:
    """One-hot rows [n, K] over the K rows of the model's label embedding (K = num_classes,
    + 1 with a null label), to be mixed for label interpolation."""
    K = pipe.num_classes + int(bool(pipe.config["model"].get("null_class")))
    return torch.nn.functional.one_hot(torch.as_tensor(labels).long(), K).double()


@torch.no_grad()
def invert(pipe: Pipeline, images, steps=50, skip_last: Optional[bool] = None, labels=None,
           batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """DDIM inversion x_0 -> x_T (ADM section H): the deterministic DDIM ODE run forwards over
    the `steps` respaced steps (an int or a respacing like "ddim50").

    images: uint8 [N, H, W, C] (or float [N, C, H, W] in [-1, 1]); labels: [N] ints or [N, K]
    label weights for a class-conditional model. Returns latents [N, C, H, W] (float32, float64
    for float64 images), to be decoded by `reconstruct` with the same steps. The reverse step
    from level i lands on ᾱ_{i+1}, so all steps end at ᾱ = 0 (the model's ε); skip_last stops
    one step earlier, on the level ᾱ_{T-1} at which sampling starts (ADM: "reversing the first
    249 steps gives much better reconstructions"). None means False.

    σ-space models (config.json has "precond"): DDIM with η = 0 is Euler's method on
    dx/dσ = (x − D(x; σ))/σ, so the image is taken as the sample at the lowest level σ_min of
    `gaussdiff sample --sampler euler --steps N` and `euler_inversion` climbs those levels
    (`steps`: the integer N) up to σ_max. The latent is x at σ_max, unscaled (std ≈ σ_max, not
    1). skip_last has no σ-space counterpart (no ᾱ = 0 level) and must stay None.
    """
    _generator_only(pipe, "inversion")
    device = _device(pipe)
    x0 = _to_model(images, device)
    kwargs = label_kwargs(pipe, labels, len(x0), device)
    if _sigma_space(pipe, skip_last):
        levels, dtype = _euler_levels(pipe, steps)[-2::-1], _state_dtype(device, x0)   # ascending

        def run(x, kw):
            return euler_inversion(pipe.denoiser, x.to(dtype), levels, kw, progress)
    else:
        diffusion = pipe.respaced(steps)

        def run(x, kw):
            return diffusion.ddim_reverse_sample_loop(pipe.model, x, model_kwargs=kw,
                                                      progress=progress, skip_last=bool(skip_last))
    out = []
    for s in tqdm(range(0, len(x0), batch_size), disable=not progress or len(x0) <= batch_size,
                  desc="invert"):
        out.append(run(x0[s:s + batch_size], {k: v[s:s + batch_size] for k, v in kwargs.items()}))
    return torch.cat(out) if x0.dtype == torch.float64 else torch.cat(out).float()


@torch.no_grad()
def reconstruct(pipe: Pipeline, latents: torch.Tensor, steps=50, labels=None,
                batch_size: int = 64, progress: bool = True, as_uint8: bool = True):
    """Deterministic DDIM sampling (η = 0, x_0 clipped) from latents [N, C, H, W] over the
    `steps` respaced steps: the decoder of `invert`. labels: [N] ints or [N, K] label weights
    (`label_weights`). Returns uint8 [N, H, W, C], or with as_uint8=False the samples
    [N, C, H, W] in [-1, 1] in the latents' dtype. σ-space models: `samplers.euler` (the
    estimate clipped, as in Pipeline.sample) from the latents at σ_max down the levels of
    `invert` to σ = 0: `gaussdiff sample --sampler euler --steps N` started from them."""
    _generator_only(pipe, "reconstruction")
    device = _device(pipe)
    z = torch.as_tensor(latents).to(device)
    kwargs = label_kwargs(pipe, labels, len(z), device)
    if _sigma_space(pipe, None):
        sigmas, dtype = _euler_levels(pipe, steps), _state_dtype(device, z)
        D = ClipDenoised(pipe.denoiser)

        def run(x, kw):
            with tqdm(total=len(sigmas) - 1, disable=not progress, desc="reconstruct") as bar:
                x = euler(D, x.to(dtype), sigmas, model_kwargs=kw, callback=lambda _: bar.update())
            return x.to(z.dtype)
    else:
        diffusion = pipe.respaced(steps)

        def run(x, kw):
            return diffusion.ddim_sample_loop(pipe.model, x.shape, noise=x, model_kwargs=kw,
                                              progress=progress)
    out = []
    for s in range(0, len(z), batch_size):
        x = run(z[s:s + batch_size], {k: v[s:s + batch_size] for k, v in kwargs.items()})
        out.append(to_uint8(x) if as_uint8 else x)
    return np.concatenate(out) if as_uint8 else torch.cat(out)


def reconstruction_error(original: np.ndarray, reconstructed: np.ndarray) -> dict:
    """dict(mse=[N] mean squared error in [-1, 1] units, psnr=[N] in dB for the 8-bit images)."""
    a, b = original.astype(np.float64), reconstructed.astype(np.float64)
    mse8 = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        psnr = 10 * np.log10(255.0 ** 2 / mse8)
    return dict(mse=mse8 / 127.5 ** 2, psnr=psnr)


def slerp_angles(frames: int) -> np.ndarray:
    """θ_k = k/(frames − 1)·π/2, k = 0..frames-1 (ADM section H)."""
    if frames < 2:
        raise UsageError(f"--frames must be at least 2, got {frames}")
    return np.linspace(0.0, math.pi / 2, frames)


@torch.no_grad()
def interpolate(pipe: Pipeline, image_a, image_b, frames: int = 9, steps=50,
                skip_last: Optional[bool] = None, labels: Optional[Sequence[int]] = None,
                progress: bool = True, as_uint8: bool = True):
    """Frames between two real images through the DDIM latent space (ADM section H): both are
    inverted (`invert`), the latents mixed as cos θ·z_a + sin θ·z_b for θ from 0 to π/2 and
    decoded (`reconstruct`). For a class-conditional model, labels = (y_a, y_b) and the label
    embeddings are mixed with the same weights: the network's `y` is then the label-weight
    matrix cos θ·onehot(y_a) + sin θ·onehot(y_b) (UNetModel: y @ label_emb.weight).

    image_a, image_b: uint8 [H, W, C]. Returns uint8 [frames, H, W, C] (as_uint8=False: float
    [frames, C, H, W] in [-1, 1]); frame 0 reconstructs image_a, the last image_b. skip_last:
    see `invert`; None means True for a discrete-time model (ADM) and is required for a σ-space
    one, whose latents (std ≈ σ_max) the same mix handles: it is linear, and for the nearly
    orthogonal latents of two images it keeps their norm.
    """
    theta = torch.from_numpy(slerp_angles(frames))
    if skip_last is None and not pipe.config.get("precond"):
        skip_last = True
    z = invert(pipe, np.stack([image_a, image_b]), steps, skip_last, labels, progress=progress).double()
    c, s = theta.cos().reshape(-1, 1, 1, 1), theta.sin().reshape(-1, 1, 1, 1)
    mixed = (c * z[0] + s * z[1]).float()
    y = None
    if labels is not None:
        w = label_weights(pipe, labels)
        y = (theta.cos()[:, None] * w[0] + theta.sin()[:, None] * w[1]).float()
    return reconstruct(pipe, mixed, steps, y, progress=progress, as_uint8=as_uint8)


class InpaintDenoiser:
    """Inpainting for σ-space samplers: D'(x, σ) = k·x_0 + (1 − k)·D(k·(x_0 + σ·n) + (1 − k)·x, σ),
    k = 1 on the known pixels. The network sees the known region at its noise level (with noise
    n fixed per image: x_0 + σ·n is the probability-flow trajectory of a point mass at x_0), and
    the known region of the estimate is the image itself, so the result keeps it exactly."""

    def __init__(self, denoiser, x0: torch.Tensor, known: torch.Tensor, noise: torch.Tensor):
        self.denoiser, self.x0, self.known, self.noise = denoiser, x0, known, noise

    def __call__(self, x, sigma, **cond):
        k, x0 = self.known.to(x.dtype), self.x0.to(x.dtype)
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        D = self.denoiser(k * (x0 + s * self.noise.to(x.dtype)) + (1 - k) * x, sigma, **cond)
        return k * x0 + (1 - k) * D


def repaint_levels(T: int, resample: int = 1, jump: int = 1):
    """The moves of RePaint's schedule (Lugmayr et al. 2022, jump length `jump`, `resample`
    passes) as a list of (level, direction): level T-1 down to -1 (the clean image) in blocks
    of `jump` denoising steps (direction -1: level -> level-1); after each block but the last
    pass, back up to the block's start (+1: level -> level+1). T·resample denoising steps."""
    if resample < 1 or jump < 1:
        raise UsageError(f"--resample and --jump must be at least 1, got {resample}, {jump}")
    moves, level = [], T - 1
    while level >= 0:
        end = max(level - jump, -1)
        for r in range(resample):
            moves += [(l, -1) for l in range(level, end, -1)]
            if r < resample - 1:
                moves += [(l, +1) for l in range(end, level)]
        level = end
    return moves


def q_step(diffusion, x: torch.Tensor, level: int, generator=None) -> torch.Tensor:
    """One forward step from level `level` (-1: the clean image) to level + 1 of a (possibly
    respaced) diffusion: x ~ q(x_{l+1} | x_l) = N(sqrt(1 − β_{l+1})·x_l, β_{l+1}·I), where
    1 − β_{l+1} = ᾱ_{l+1}/ᾱ_l (RePaint's jump back)."""
    beta = float(diffusion.betas[level + 1])
    return math.sqrt(1 - beta) * x + math.sqrt(beta) * randn_like(x, generator)


@torch.no_grad()
def inpaint(pipe: Pipeline, image, mask, num: int = 1, sampler: str = "ddpm", steps=250,
            resample: int = 1, jump: int = 1, seed: int = 0, labels=None, eta: float = 0.0,
            clip_denoised: bool = True, progress: bool = True) -> np.ndarray:
    """Fill the masked region of `image` (uint8 [H, W, C]); mask: bool [H, W], True where the
    model paints, False where the image is kept. Returns num fillings, uint8 [num, H, W, C],
    image i from seed_for(seed, i).

    sampler "ddpm" (respaced to `steps`): before every step the known region is replaced by
    q_sample(x_0, t), fresh noise each time, and after the last by x_0 itself; with resample
    R > 1 each block of `jump` steps is redone R times, re-noised with q(x_{t+1} | x_t) in
    between (RePaint). A σ-space sampler (heun, euler, ... with `steps` levels of the karras
    schedule): `InpaintDenoiser`, no resampling. labels: [num] for a class-conditional model
    (default: drawn per image from its seed).
    """
    _generator_only(pipe, "inpainting")
    device = _device(pipe)
    x0 = _to_model(np.asarray(image)[None], device).repeat(num, 1, 1, 1)
    m = torch.as_tensor(np.asarray(mask, dtype=bool))
    if m.shape != x0.shape[2:]:
        raise UsageError(f"the mask is {tuple(m.shape)}, the image {tuple(x0.shape[2:])}")
    known = (~m).to(device, x0.dtype)[None, None]
    gens = image_generators(seed, range(num))
    if labels is None and pipe.num_classes is not None:
        labels = [int(torch.randint(pipe.num_classes, (1,), generator=g)) for g in gens]
    kwargs = label_kwargs(pipe, labels, num, device)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
    pipe.model.eval()
    if sampler != "ddpm":
        if sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r} for inpainting: ddpm or one of {', '.join(SAMPLERS)}")
        if resample != 1 or jump != 1:
            raise UsageError("--resample and --jump (RePaint) apply to the ddpm sampler")
        if not str(steps).isdigit() or int(steps) < 1:
            raise UsageError(f"the {sampler} sampler takes a positive integer number of steps, got {steps!r}")
        D = pipeline_denoiser(pipe)
        sigmas = pipe.sigma_steps(int(steps), denoiser=D)
        D = InpaintDenoiser(ClipDenoised(D) if clip_denoised else D, x0.double(), known.double(),
                            noise.double())
        if eta and "eta" not in inspect.signature(SAMPLERS[sampler]).parameters:
            raise UsageError(f"--eta does not apply to the {sampler} sampler")
        options = {"eta": eta} if eta else {}
        x = SAMPLERS[sampler](D, noise.double() * float(sigmas[0]), sigmas, generator=gens,
                              model_kwargs=kwargs, **options)
        return to_uint8(x.float())
    _discrete_only(pipe, "the ddpm sampler")
    diffusion = pipe.respaced(steps)
    x = noise
    moves = repaint_levels(diffusion.num_timesteps, resample, jump)
    for level, direction in tqdm(moves, disable=not progress, desc="inpaint"):
        if direction < 0:   # known region at level `level`, then one ancestral step
            t = torch.full((num,), level, device=device, dtype=torch.long)
            x = known * diffusion.q_sample(x0, t, randn_like(x0, gens)) + (1 - known) * x
            x = diffusion.p_sample(pipe.model, x, t, clip_denoised, kwargs, generator=gens)["sample"]
        else:
            x = q_step(diffusion, x, level, gens)
    return to_uint8(known * x0 + (1 - known) * x)


@torch.no_grad()
def cascade(base: Pipeline, upsampler: Pipeline, num: int, sampler: str = "ddim", steps=50,
            up_sampler: Optional[str] = None, up_steps=None, seed: int = 0, labels=None,
            guidance=None, batch_size: int = 64, progress: bool = True, **options):
    """Two-stage sampling (Improved DDPM section 3): the base model draws low-resolution images
    (with `guidance`, if given), the upsampler p(x_high | x_low, y) refines them, with the same
    labels if it is class-conditional. Its noise comes from a seed derived from `seed`.
    options: further Pipeline.sample options of both stages.
    Returns (high uint8 [num, H, W, C], low uint8 [num, h, w, C], labels or None)."""
    if upsampler.task != "upsample":
        raise UsageError(f"{upsampler.path or 'the second model'} is not an upsampler "
                         f"(train it with --task upsample)")
    low_size = task_of(upsampler.config)["low_res"]
    if base.image_shape[1:] != (low_size, low_size) or base.image_shape[0] != upsampler.image_shape[0]:
        raise UsageError(f"the base model makes {base.image_shape} images, the upsampler takes "
                         f"({upsampler.image_shape[0]}, {low_size}, {low_size})")
    low, y = base.sample(num, sampler, steps, seed=seed, labels=labels, guidance=guidance,
                         batch_size=batch_size, progress=progress, **options)
    if upsampler.num_classes is not None and y is None:
        raise UsageError("the upsampler is class-conditional, the base model is not: no labels to give it")
    high, _ = upsampler.sample(num, up_sampler or sampler, up_steps or steps,
                               seed=seed_for(seed, 1 << 40), batch_size=batch_size,
                               labels=y if upsampler.num_classes is not None else None,
                               low_res=to_model_range(torch.from_numpy(low)), progress=progress,
                               **options)
    return high, low, y

"""The seeds' analyses of a trained model, one function each (`gaussdiff analyze ...`).

Each function takes a loaded Pipeline and returns a JSON-ready dict of numbers, plus (where the
paper shows images) a uint8 NHWC image grid under "grid"; gaussdiff.cli.analyze writes them.

- rate_distortion: DDPM Table 4 / Fig. 5, progressive lossy compression on real images.
- noise_levels: EDM Fig. 1, an image noised at several σ and the model's denoised estimate.
- progressive: DDPM Figs. 6, 10, 14, the x̂_0 predictions along reverse chains.
- shared_latents: DDPM Fig. 7, one reverse chain split at several t into continuations.
- coarse_to_fine: DDPM Fig. 9, interpolation of two images noised to step t, then decoded.
- nearest_neighbours: DDPM Figs. 12, 15 and ADM Fig. 7, with a memorisation check.
- guidance_sweep: ADM Fig. 8, a seed per row, the guidance scale growing along it.

Timesteps are the papers' t = 1..T (the number of noising steps applied: x_t); index t - 1
of the diffusion's tables, as docs/conventions.md fixes. Pixel errors are RMSE on the
[0, 255] scale, as DDPM Table 4 reports them (x in [-1, 1] times 127.5).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import to_model_range, to_uint8
from .errors import UsageError
from .images import make_grid
from .metrics.evaluate import compute_features
from .metrics.inception import get_inception
from .metrics.likelihood import evaluate_nll
from .plot import new_figure, save_figure
from .rng import image_generators, per_sample_generators, randn_like, seed_for
from .sampling.pipeline import Pipeline
from .sampling.denoisers import pipeline_denoiser
from .sampling.editing import _device, _discrete_only, _generator_only, label_kwargs
from .sampling.guidance import Guidance

PIXEL = 127.5   # [-1, 1] -> [0, 255] scale of the RMSE


def _discrete(pipe: Pipeline, what: str):
    _discrete_only(pipe, what, "the discrete reverse process")


def _labels(pipe: Pipeline, labels, n: int, device) -> dict:
    """model_kwargs with y for a class-conditional model: the labels given, or classes
    0..K-1 cycled over the n images (tools.label_kwargs checks them)."""
    if pipe.num_classes is not None and labels is None:
        labels = [i % pipe.num_classes for i in range(n)]
    if labels is not None:
        labels = np.broadcast_to(np.asarray(labels, dtype=np.int64), (n,)).copy()
    return label_kwargs(pipe, labels, n, device)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMSE over everything on the [0, 255] scale."""
    return float(((a.double() - b.double()) ** 2).mean().sqrt()) * PIXEL


# ----------------------------------------------------------------------------- rate-distortion
def rate_distortion(pipe: Pipeline, images: np.ndarray, labels=None, steps=None,
                    batch_size: int = 16, seed: int = 0, progress: bool = True,
                    clip_denoised: bool = True) -> dict:
    """DDPM section 4.3, Table 4 and Fig. 5: progressive lossy compression of uint8 NHWC test
    images. A receiver that holds x_t has been sent L_T + Σ_{s>t} L_{s-1} bits (the prior and
    the KL terms of the steps above t; at t = 0 the decoder term too: the whole VLB) and
    reconstructs x̂_0(x_t). Returns rows over t = T..0: t, rate (bits/dim, cumulative),
    distortion (RMSE of x̂_0 against x_0 on [0, 255]; 0 at t = 0, where x_0 is sent losslessly).

    The terms are those of `gaussdiff nll` (calc_bpd_loop: image i's noise from (seed, i)), so
    the last rate is exactly the VLB that command reports for the same images and seed.
    steps: a respacing (the rate then is the K-step VLB; t are the original indices + 1).
    """
    _discrete(pipe, "rate-distortion")
    result = evaluate_nll(pipe, images, labels, steps=steps, batch_size=batch_size, seed=seed,
                          progress=progress, clip_denoised=clip_denoised)
    per_step = result["per_step"]
    vb = np.asarray(per_step["vb"], dtype=np.float64)              # index k: L_k, k = 0..K-1
    xmse = np.asarray(per_step["xstart_mse"], dtype=np.float64)    # E (x̂_0(x_{k+1}) − x_0)²
    prior = result["terms"]["prior"]["mean"]
    K = len(vb)
    # rate after receiving x_{k+1}, k = K-1..0: prior + Σ_{j ≥ k+1} L_j; x_0: + L_0 ... too
    tail = np.concatenate([np.cumsum(vb[::-1])[::-1], [0.0]])      # tail[k] = Σ_{j ≥ k} L_j
    t = [int(s) + 1 for s in per_step["t"]] + [0]                   # paper t of each x_{k+1}
    rows = [dict(t=t[k], rate=float(prior + tail[k + 1]), distortion=float(np.sqrt(xmse[k]) * PIXEL))
            for k in range(K - 1, -1, -1)]
    rows.append(dict(t=0, rate=float(prior + tail[0]), distortion=0.0))
    return dict(num=result["num"], seed=seed, steps=K, bpd=result["bpd"], prior=prior, rows=rows)


def plot_rate_distortion(result: dict, out: str):
    """DDPM Fig. 5's three panels: distortion and rate against the reverse step, and distortion
    against rate."""
    rows = result["rows"]
    T = rows[0]["t"]
    step = [T - r["t"] for r in rows]
    rate = [r["rate"] for r in rows]
    dist = [r["distortion"] for r in rows]
    fig, axes = new_figure(3)
    axes[0].plot(step, dist)
    axes[0].set(xlabel="reverse process steps (T − t)", ylabel="distortion (RMSE, [0, 255])")
    axes[1].plot(step, rate)
    axes[1].set(xlabel="reverse process steps (T − t)", ylabel="rate (bits/dim)")
    axes[2].plot(rate, dist)
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, [0, 255])")
    axes[0].set_title(f"rate-distortion, {result['num']} images (DDPM Fig. 5)")
    save_figure(fig, out)


# ----------------------------------------------------------------------------- noise levels
OVERSHOOT = 0.05   # margin of noise_levels' out_of_range share, in [-1, 1] units
DEFAULT_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 80.0)


@torch.no_grad()
def noise_levels(pipe: Pipeline, images: np.ndarray, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                 labels=None, seed: int = 0, batch_size: int = 64, show: int = 8) -> dict:
    """EDM Fig. 1: each image noised to x = y + σ·n at every σ and the model's denoised
    estimate D(x; σ) (discrete-time models through their DiscreteDenoiser, unclipped). Image
    i's noise n depends only on (seed, i) and is the same at every σ. Returns per σ the RMSE of
    D against the clean image (mean over images, [0, 255]) and the share of denoised pixels
    more than OVERSHOOT (≈ 6 levels of 255) outside [-1, 1] (an overshooting denoiser, the
    cause of blown-out samples); "grid" shows, for the first `show` images, a row of noisy
    inputs above a row of denoised estimates."""
    _generator_only(pipe, "noise-levels")
    D = pipeline_denoiser(pipe)
    lo, hi = float(getattr(D, "sigma_min", 0.0)), float(getattr(D, "sigma_max", float("inf")))
    bad = [s for s in sigmas if not (s > 0 and lo * (1 - 1e-6) <= s <= hi * (1 + 1e-6))]
    if bad:
        raise UsageError(f"σ {bad}: outside the model's noise range [{lo:.4g}, {hi:.4g}]")
    device = _device(pipe)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    pipe.model.eval()
    rows, noisy_all, den_all = [], [], []
    sq = np.zeros(len(sigmas))
    out_of_range = np.zeros(len(sigmas))
    for start in range(0, len(images), batch_size):
        idx = range(start, min(start + batch_size, len(images)))
        y = to_model_range(torch.from_numpy(images[idx.start:idx.stop])).to(device, dtype)
        gens = image_generators(seed, idx)
        n = randn_like(y, gens)
        kwargs = _labels(pipe, None if labels is None else labels[idx.start:idx.stop], len(idx), device)
        noisy_b, den_b = [], []
        for j, s in enumerate(sigmas):
            x = y + s * n
            d = D(x, torch.full((len(idx),), float(s), device=device, dtype=dtype), **kwargs).to(dtype)
            sq[j] += float(((d - y) ** 2).flatten(1).mean(1).sum())
            out_of_range[j] += float((d.abs() > 1 + OVERSHOOT).double().flatten(1).mean(1).sum())
            noisy_b.append(to_uint8(x.clamp(-1, 1)))
            den_b.append(to_uint8(d.clamp(-1, 1)))
        if start < show:
            noisy_all.append(np.stack(noisy_b, 1)[:show - start])
            den_all.append(np.stack(den_b, 1)[:show - start])
    N = len(images)
    for j, s in enumerate(sigmas):
        rows.append(dict(sigma=float(s), rmse=float(np.sqrt(sq[j] / N)) * PIXEL,
                         out_of_range=float(out_of_range[j] / N)))
    noisy, den = np.concatenate(noisy_all), np.concatenate(den_all)   # [N, S, H, W, C]
    tiles = np.stack([noisy, den], 1).reshape(-1, *noisy.shape[2:])   # per image: noisy row, denoised row
    return dict(num=N, seed=seed, rows=rows, grid=make_grid(tiles, ncols=len(sigmas), scale=2))


# ----------------------------------------------------------------------------- reverse chains
def _index_at(diffusion, t: int) -> int:
    """The index of the (respaced) diffusion step whose x is x_t, t in original units 1..T: the
    largest step whose original timestep + 1 is at most t."""
    original = np.asarray(diffusion.timestep_map) + 1
    at = np.nonzero(original <= t)[0]
    if len(at) == 0:
        raise UsageError(f"t = {t}: below the first step (t = {original[0]}) of this respacing")
    return int(at[-1])


def _reverse(diffusion, model, x: torch.Tensor, start: int, gens, kwargs, clip: bool,
             callback=None) -> torch.Tensor:
    """Ancestral steps from x = x at step `start` (an index of `diffusion`) down to x_0;
    callback(i, state at step i − 1, x̂_0 at step i)."""
    hook = None if callback is None else lambda d: callback(d["i"], d["sample"], d["pred_xstart"])
    return diffusion.p_sample_loop(model, x.shape, noise=x, clip_denoised=clip, model_kwargs=kwargs,
                                   generator=gens, callback=hook, start=start)


def _chain_setup(pipe: Pipeline, steps, what: str):
    _discrete(pipe, what)
    diffusion = pipe.diffusion if steps is None else pipe.respaced(steps)
    device = _device(pipe)
    pipe.model.eval()
    return diffusion, device


def _original_t(diffusion, index: int) -> int:
    return int(diffusion.timestep_map[index]) + 1


@torch.no_grad()
def progressive(pipe: Pipeline, num: int = 8, steps=None, columns: int = 10, seed: int = 0,
                labels=None, clip_denoised: bool = True, progress: bool = True, show: int = 8,
                batch_size: int = 64) -> dict:
    """DDPM Figs. 6, 10 and 14: `num` ancestral reverse chains (image i from seed_for(seed, i),
    as `gaussdiff sample --sampler ddpm` draws it) and their x̂_0 predictions at `columns`
    evenly spaced steps, the last being the final sample. Returns per recorded step t the RMSE
    between x̂_0(x_t) and the final samples ([0, 255]: large-scale features settle first), the
    x̂_0 images themselves under "frames" [columns, num, H, W, C] (for a quality metric per
    step) and "grid" (a row for each of the first `show` chains). Chains run in batches of
    `batch_size`; image i does not depend on the batching."""
    diffusion, device = _chain_setup(pipe, steps, "progressive")
    K = diffusion.num_timesteps
    if not 2 <= columns <= K + 1:
        raise UsageError(f"--columns {columns}: between 2 and {K + 1} (the steps + 1)")
    record = sorted(set(np.linspace(K - 1, 0, columns).round().astype(int).tolist()), reverse=True)
    if pipe.num_classes is None:
        _labels(pipe, labels, num, device)   # an error if labels were given
        labels = None
    elif labels is None:
        labels = [i % pipe.num_classes for i in range(num)]
    frames, finals, ts = [], [], []
    bar = tqdm(total=K * num, desc="progressive (ddpm)", unit="img-step", disable=not progress)
    for start in range(0, num, batch_size):
        idx = range(start, min(start + batch_size, num))
        gens = image_generators(seed, idx)
        x = torch.stack([torch.randn(pipe.image_shape, generator=g) for g in gens]).to(device)
        kwargs = {} if labels is None else \
            _labels(pipe, np.broadcast_to(labels, (num,))[idx.start:idx.stop], len(idx), device)
        kept, kept_t = [], []

        def keep(i, x, pred):
            bar.update(len(idx))
            if i in record:
                kept.append(pred.clone())
                kept_t.append(_original_t(diffusion, i))
        finals.append(_reverse(diffusion, pipe.model, x, K - 1, gens, kwargs, clip_denoised, keep))
        frames.append(kept)
        ts = kept_t
    bar.close()
    final = torch.cat(finals)
    frames = [torch.cat([f[c] for f in frames]) for c in range(len(ts))]
    rows = [dict(t=t, rmse_to_final=_rmse(f, final)) for t, f in zip(ts, frames)]
    u8 = np.stack([to_uint8(f) for f in frames])                     # [columns, num, H, W, C]
    grid = make_grid(u8[:, :show].transpose(1, 0, 2, 3, 4).reshape(-1, *u8.shape[2:]), ncols=len(frames), scale=2)
    return dict(num=num, seed=seed, steps=K, rows=rows, frames=u8, grid=grid)


def plot_progressive_quality(result: dict, out: str):
    """The sample-quality metric of x̂_0 (result["metric"], added by `analyze progressive
    --ref`) and the RMSE to the final sample against the reverse step (DDPM Fig. 6's curves)."""
    name = result["metric"]["name"]
    rows = [r for r in result["rows"] if r.get(name) is not None]
    T = result["rows"][0]["t"]
    fig, axes = new_figure(2)
    axes[0].plot([T - r["t"] for r in rows], [r[name] for r in rows], marker="o")
    axes[0].set(xlabel="reverse process steps (T − t)", ylabel=f"{name.upper()} of x̂0",
                title=f"x̂0 along {result['num']} reverse chains against {result['metric']['ref']}")
    axes[1].plot([T - r["t"] for r in result["rows"]], [r["rmse_to_final"] for r in result["rows"]], marker="o")
    axes[1].set(xlabel="reverse process steps (T − t)", ylabel="RMSE to the final sample, [0, 255]")
    save_figure(fig, out)


@torch.no_grad()
def shared_latents(pipe: Pipeline, split_at: Optional[Sequence[int]] = None, continuations: int = 6,
                   steps=None, seed: int = 0, label=None, clip_denoised: bool = True,
                   progress: bool = True) -> dict:
    """DDPM Fig. 7: one ancestral reverse chain (seed_for(seed, 0)) stopped at each t of
    `split_at` (default T, 3T/4, T/2, T/4), and from each x_t `continuations` chains with their
    own noise (seed_for(seed, 1 + j), the same j at every t). What the continuations share is
    what x_t has already decided. Returns per t the mean over pixels of the continuations'
    standard deviation ([0, 255]) and a grid: per row t, x̂_0(x_t) then the continuations."""
    diffusion, device = _chain_setup(pipe, steps, "shared-latents")
    T = int(diffusion.timestep_map[-1]) + 1
    split_at = [T, 3 * T // 4, T // 2, T // 4] if split_at is None else list(split_at)
    if continuations < 2:
        raise UsageError("--continuations must be at least 2")
    bad = [t for t in split_at if not 1 <= t <= T]
    if bad:
        raise UsageError(f"--split-at {bad}: t must be in 1..{T}")
    index = {_index_at(diffusion, t): t for t in split_at}
    g0 = per_sample_generators([seed_for(seed, 0)])
    x = torch.randn(pipe.image_shape, generator=g0[0])[None].to(device)
    kwargs = _labels(pipe, None if label is None else [label], 1, device)
    states = {}
    K = diffusion.num_timesteps
    if K - 1 in index:
        states[K - 1] = x.clone()

    def keep(i, x, pred):   # x is now the state at step i - 1
        if i - 1 in index:
            states[i - 1] = x.clone()
    _reverse(diffusion, pipe.model, x, K - 1, g0, kwargs, clip_denoised, keep)
    rows, tiles = [], []
    ckw = {k: v.expand(continuations) for k, v in kwargs.items()}
    for i in tqdm(sorted(index, reverse=True), desc="shared latents", disable=not progress):
        xt = states[i]
        tt = torch.full((1,), i, device=device, dtype=torch.long)
        pred = diffusion.p_mean_variance(pipe.model, xt, tt, clip_denoised, kwargs)["pred_xstart"]
        gens = per_sample_generators([seed_for(seed, 1 + j) for j in range(continuations)])
        out = _reverse(diffusion, pipe.model, xt.expand(continuations, *xt.shape[1:]).clone(), i,
                       gens, ckw, clip_denoised)
        spread = float(out.double().std(0, unbiased=True).mean()) * PIXEL
        rows.append(dict(t=_original_t(diffusion, i), requested=index[i], spread=spread))
        tiles.append(np.concatenate([to_uint8(pred), to_uint8(out)]))
    grid = make_grid(np.concatenate(tiles), ncols=continuations + 1, scale=2)
    return dict(seed=seed, continuations=continuations, steps=K, rows=rows, grid=grid)


@torch.no_grad()
def coarse_to_fine(pipe: Pipeline, image_a: np.ndarray, image_b: np.ndarray,
                   ts: Optional[Sequence[int]] = None, frames: int = 9, steps=None,
                   labels=None, seed: int = 0, clip_denoised: bool = True,
                   progress: bool = True) -> dict:
    """DDPM Fig. 9: noise two uint8 HWC images to x_t and x'_t with q (noise from seed_for(seed,
    0) and seed_for(seed, 1)), mix x̄_t = (1 − λ)·x_t + λ·x'_t for `frames` λ from 0 to 1, and
    decode each with the reverse process; the reverse noise is seed_for(seed, 2 + row), the same
    for every λ of a row, as DDPM fixes it. At t = 0 the row is the pixel-space mix. Returns per
    row t: the RMSE ([0, 255]) of the λ = 0 and λ = 1 decodes to the source images (how much of
    them survives t steps of noise), the decodes under "decoded" [rows, frames, H, W, C] and the
    grid (a row per t: image A, the frames, image B)."""
    diffusion, device = _chain_setup(pipe, steps, "coarse-to-fine")
    T = int(diffusion.timestep_map[-1]) + 1
    ts = [round(T * k / 10) for k in range(11)] if ts is None else list(ts)
    bad = [t for t in ts if not 0 <= t <= T]
    if bad:
        raise UsageError(f"--t {bad}: t must be in 0..{T}")
    if frames < 2:
        raise UsageError("--frames must be at least 2")
    dtype = torch.float32   # the discrete engine's state, as `sample --sampler ddpm` keeps it
    a, b = (to_model_range(torch.from_numpy(np.asarray(im)[None])).to(device, dtype) for im in (image_a, image_b))
    na, nb = (torch.randn(a.shape[1:], generator=g, dtype=dtype)[None].to(device)
              for g in per_sample_generators([seed_for(seed, 0), seed_for(seed, 1)]))
    lam = torch.linspace(0, 1, frames, dtype=dtype, device=device).reshape(-1, 1, 1, 1)
    kwargs = _labels(pipe, None if labels is None else [labels[0]], 1, device)
    rows, tiles, decoded = [], [], []
    for r, t in enumerate(tqdm(ts, desc="coarse-to-fine", disable=not progress)):
        if t == 0:
            out, actual = (1 - lam) * a + lam * b, 0
        else:
            i = _index_at(diffusion, t)
            tt = torch.full((1,), i, device=device, dtype=torch.long)
            xa, xb = diffusion.q_sample(a, tt, na), diffusion.q_sample(b, tt, nb)
            mix = (1 - lam) * xa + lam * xb
            gens = per_sample_generators([seed_for(seed, 2 + r)] * frames)
            fk = {k: v.expand(frames) for k, v in kwargs.items()}
            out, actual = _reverse(diffusion, pipe.model, mix, i, gens, fk, clip_denoised), _original_t(diffusion, i)
        rows.append(dict(t=actual, requested=t, rmse_a=_rmse(out[:1], a), rmse_b=_rmse(out[-1:], b)))
        decoded.append(to_uint8(out))
        tiles.append(np.concatenate([to_uint8(a), decoded[-1], to_uint8(b)]))
    grid = make_grid(np.concatenate(tiles), ncols=frames + 2, scale=2)
    return dict(seed=seed, frames=frames, steps=diffusion.num_timesteps, rows=rows,
                decoded=np.stack(decoded), grid=grid)


# ----------------------------------------------------------------------------- nearest neighbours
def centre_crop(images: np.ndarray, fraction: float) -> np.ndarray:
    """The central round(fraction·H) x round(fraction·W) pixels of uint8 NHWC images."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--crop {fraction}: a fraction in (0, 1]")
    H, W = images.shape[1:3]
    h, w = max(1, round(fraction * H)), max(1, round(fraction * W))
    top, left = (H - h) // 2, (W - w) // 2
    return images[:, top:top + h, left:left + w]


def _features(images: np.ndarray, space: str, network=None, progress: bool = False) -> torch.Tensor:
    """Vectors whose L2 distance is the NN distance: pixel RMSE on [0, 255] scale (so divided
    by sqrt(dims)), or Inception pool3 features."""
    if space == "pixel":
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float64))
        return x / np.sqrt(x.shape[1])
    return torch.from_numpy(compute_features(network, images, progress=progress)["pool"].astype(np.float64))


def _knn(queries: torch.Tensor, base: torch.Tensor, k: int, exclude_self: bool = False,
         chunk: int = 256):
    """(distances [Q, k], indices [Q, k]) of the k nearest rows of `base`, nearest first."""
    dists, idx = [], []
    for s in range(0, len(queries), chunk):
        d = torch.cdist(queries[s:s + chunk], base)
        if exclude_self:
            d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        v, i = d.topk(k, dim=1, largest=False)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def _quantiles(v: np.ndarray) -> dict:
    q = np.quantile(v, [0.0, 0.01, 0.1, 0.5, 0.9]) if len(v) else [None] * 5
    return dict(num=int(len(v)), mean=float(np.mean(v)) if len(v) else None,
                **{f"q{p}": (None if x is None else float(x)) for p, x in zip((0, 1, 10, 50, 90), q)})


def nearest_neighbours(samples: np.ndarray, train: np.ndarray, k: int = 5, space: str = "pixel",
                       crop: float = 1.0, heldout: Optional[np.ndarray] = None, network=None,
                       show: int = 8, progress: bool = True) -> dict:
    """DDPM Figs. 12 and 15, ADM Fig. 7: for each uint8 NHWC sample its k nearest training
    images, in pixel space (RMSE on [0, 255]) or Inception pool3 space (L2), on the central
    `crop` fraction of each image. With `heldout` (test images), the distribution of their
    nearest-training-image distances too: samples much closer to the training set than
    held-out images are (a median ratio well below 1) are a sign of memorisation.
    Returns rows (per sample: nn, distance), the summaries and "grid" (per row one of the first
    `show` samples, then its neighbours, nearest first)."""
    if space not in ("pixel", "inception"):
        raise UsageError(f"--space {space}: pixel or inception")
    if not 1 <= k <= len(train):
        raise UsageError(f"--k {k}: between 1 and the {len(train)} training images")
    if samples.shape[1:] != train.shape[1:]:
        raise UsageError(f"the samples are {samples.shape[1:]} (HWC), the training images "
                         f"{train.shape[1:]}: they must match")
    if space == "inception" and network is None:
        network = get_inception()
    feats = {}
    for name, images in (("samples", samples), ("train", train), ("heldout", heldout)):
        if images is not None:
            feats[name] = _features(centre_crop(images, crop), space, network, progress)
    d, i = _knn(feats["samples"], feats["train"], k)
    rows = [dict(sample=n, nn=i[n].tolist(), distance=d[n].tolist()) for n in range(len(samples))]
    out = dict(space=space, crop=crop, k=k, num_train=len(train), rows=rows,
               samples_nn=_quantiles(d[:, 0]))
    if heldout is not None:
        hd, _ = _knn(feats["heldout"], feats["train"], 1)
        out["heldout_nn"] = _quantiles(hd[:, 0])
        out["median_ratio"] = float(np.median(d[:, 0]) / np.median(hd[:, 0])) if np.median(hd[:, 0]) > 0 else None
        out["_heldout_distances"] = hd[:, 0]
    out["_sample_distances"] = d[:, 0]
    tiles = np.concatenate([np.concatenate([samples[n:n + 1], train[i[n]]])
                            for n in range(min(show, len(samples)))])
    out["grid"] = make_grid(tiles, ncols=k + 1, scale=2)
    return out


def plot_nn_distances(result: dict, out: str):
    """Histograms of the nearest-training-image distance of the samples and the held-out images."""
    fig, (ax,) = new_figure(1)
    unit = "RMSE, [0, 255]" if result["space"] == "pixel" else "Inception pool3 L2"
    series = [("samples", result["_sample_distances"])]
    if "_heldout_distances" in result:
        series.append(("held-out test images", result["_heldout_distances"]))
    hi = max(float(np.max(v)) for _, v in series)
    for name, v in series:
        ax.hist(v, bins=30, range=(0, hi), density=True, alpha=0.5, label=f"{name} ({len(v)})")
    ax.set(xlabel=f"distance to the nearest training image ({unit})", ylabel="density",
           title="nearest-neighbour distances (memorisation check)")
    ax.legend()
    save_figure(fig, out)


# ----------------------------------------------------------------------------- guidance sweeps
def classifier_accuracy(classifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Share of uint8 NHWC images whose class under a noisy classifier at t = 0 (clean images)
    is the label they were drawn for."""
    param = next(classifier.model.parameters())
    hits = 0
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = to_model_range(torch.from_numpy(images[s:s + batch_size])).to(param.device, param.dtype)
            logits = classifier.model(x, torch.zeros(len(x), device=param.device))
            hits += int((logits.argmax(1).cpu().numpy() == labels[s:s + batch_size]).sum())
    return hits / len(images)


def guidance_sweep(pipe: Pipeline, scales: Sequence[float], guide: str = "cfg", classifier=None,
                   num: int = 4, labels=None, sampler: str = "heun", steps=35, seed: int = 0,
                   progress: bool = True, **sample_options) -> dict:
    """ADM Fig. 8: a fixed seed per row (image i from (seed, i), as `gaussdiff sample` draws it)
    and the guidance scale increasing along the row: classifier guidance (guide "classifier",
    scale s) or classifier-free guidance (guide "cfg", scale w; a model trained with
    --label-dropout). Row i's label is labels[i] (default i mod K). Per scale: the mean over
    pixels of the standard deviation across the rows ([0, 255], a diversity measure) and, with
    a classifier, the share of samples it puts in their row's class (at t = 0); the samples
    under "images" [num, scales, H, W, C] and "grid"."""
    if guide not in ("cfg", "classifier"):
        raise UsageError(f"--guide {guide}: cfg or classifier")
    if guide == "classifier" and classifier is None:
        raise UsageError("--guide classifier needs --classifier DIR")
    K = pipe.num_classes if pipe.num_classes is not None else (classifier.num_classes if classifier else None)
    if K is None:
        raise UsageError(f"{pipe.path or 'this model'} is unconditional: a guidance sweep needs "
                         f"classes (--guide classifier with --classifier DIR)")
    labels = [i % K for i in range(num)] if labels is None else list(labels)
    if len(labels) == 1:
        labels = labels * num
    if len(labels) != num:
        raise UsageError(f"--labels: {len(labels)} labels for {num} rows")
    columns, rows = [], []
    for s in tqdm(scales, desc=f"guidance sweep ({guide})", disable=not progress):
        g = (Guidance(classifier=classifier, classifier_scale=float(s)) if guide == "classifier"
             else Guidance(cfg_scale=float(s)))
        images, _ = pipe.sample(num, sampler, steps, seed=seed, labels=labels, guidance=g,
                                progress=False, **sample_options)
        row = dict(scale=float(s), pixel_std=float(images.astype(np.float64).std(0, ddof=1).mean()))
        if classifier is not None:
            row["accuracy"] = classifier_accuracy(classifier, images, np.asarray(labels))
        rows.append(row)
        columns.append(images)
    images = np.stack(columns, 1)   # [num, scales, H, W, C]: row = seed, column = scale
    return dict(guide=guide, sampler=sampler, steps=steps, seed=seed, labels=labels, rows=rows,
                images=images, grid=make_grid(images.reshape(-1, *images.shape[2:]), ncols=len(scales), scale=2))

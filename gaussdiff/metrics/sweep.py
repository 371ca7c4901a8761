"""`gaussdiff sweep`: a sample-quality metric against the number of network evaluations (NFE).

For each sampler and NFE target the step count N is the largest whose NFE does not exceed the
target. ddpm, ddim, euler, euler_ancestral, ddim_sigma and dpmpp_2m make one network call per
step (N = NFE); heun and heun_vp make 2N - 1 (EDM Algorithm 1: the last step, to σ = 0, is an
Euler step), so N = (NFE + 1) // 2. A σ-space sampler missing from that table has its formula
counted with a stub denoiser. The NFE recorded is the one Pipeline.sample reports.

Every point draws the same --num images from the same seeds (image i from (seed, i)), saved as
OUT/samples_{sampler}_{nfe}.npz (ADM layout: arr_0, arr_1 labels; the point's settings as JSON
under "gaussdiff_sweep"). OUT/sweep.json holds the sweep's settings and results, OUT/sweep.csv
is its table, both rewritten atomically after every point, so an interrupted sweep resumes where
it stopped: a point whose .npz holds the same settings is not sampled again, and a metric that
sweep.json already has for it is not computed again. Results of other settings (another model,
seed, --num or reference) are dropped from sweep.json when a sweep starts.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from typing import Optional, Tuple

import numpy as np
import torch

import gaussdiff
from ..data import first_images, load_images
from ..diffusion.schedules import karras_sigmas
from ..errors import UsageError
from .classifier import load_feature_net
from .evaluate import CACHE_ENV, METRICS, evaluate, images_sha1, needs_networks, parse_metrics
from ..modeldir import atomic_write_bytes, atomic_write_json, num_timesteps, read_config, weights_path
from ..plot import new_figure, save_figure
from ..sampling.samplers import REGISTRY, SAMPLER_NAMES, SAMPLERS

META_KEY = "gaussdiff_sweep"
STATE_NAME, CSV_NAME, PLOT_NAME = "sweep.json", "sweep.csv", "sweep.png"
CSV_COLUMNS = ("sampler", "steps", "nfe", "metric", "value", "num", "seconds")


# ------------------------------------------------------------------------------ samplers and NFE
def check_sampler_steps(sampler: str, steps: int, T: Optional[int], sigma_space: bool, flag: str):
    """A UsageError naming `flag` if `sampler` with `steps` steps cannot run on a model with T
    diffusion steps (None in σ-space), trained in σ-space or not (an unknown sampler, ddpm/ddim on a σ-space
    model, more ddpm/ddim steps than T)."""
    if sampler not in SAMPLER_NAMES:
        raise UsageError(f"{flag}: unknown sampler {sampler!r}: choose from {', '.join(SAMPLER_NAMES)}")
    if steps < 1:
        raise UsageError(f"{flag}: {sampler} needs at least one step, got {steps}")
    if REGISTRY[sampler].discrete:
        if sigma_space:
            raise UsageError(f"{flag}: the model was trained in σ-space: {sampler} does not apply; "
                             f"use a σ-space sampler such as heun")
        if steps > T:
            raise UsageError(f"{flag}: {sampler} takes at most the model's T = {T} steps "
                             f"({T} network evaluations), got {steps}")


def measure_nfe_formula(sampler: str) -> Tuple[int, int]:
    """(a, b) with NFE = a·N + b of a σ-space sampler, counted with a stub denoiser at N = 1, 2,
    3 (karras levels); a UsageError if the count does not grow linearly with N."""
    counts = []
    for n in (1, 2, 3):
        stats: dict = {}
        SAMPLERS[sampler](lambda x, sigma, **_: torch.zeros_like(x), torch.zeros(1, 1, dtype=torch.float64),
                          karras_sigmas(n), stats=stats)
        counts.append(stats["nfe"])
    a, b = counts[1] - counts[0], 2 * counts[0] - counts[1]
    if a < 1 or counts[2] != 3 * a + b:
        raise UsageError(f"--samplers: the NFE of {sampler} is not set by its number of steps "
                         f"(counted {counts} for 1, 2, 3 steps)")
    return a, b


def nfe_formula(sampler: str) -> Tuple[int, int]:
    """(a, b) with NFE = a·N + b for N steps of `sampler` (its registry entry)."""
    if sampler not in SAMPLER_NAMES:
        raise UsageError(f"--samplers: unknown sampler {sampler!r}: choose from {', '.join(SAMPLER_NAMES)}")
    if REGISTRY[sampler].nfe is None:
        raise UsageError(f"--samplers: {sampler} chooses its own steps (--rtol, --atol): its NFE "
                         f"cannot be set; leave it out of the sweep")
    return REGISTRY[sampler].nfe


def steps_for_nfe(config: dict, sampler: str, nfe: int) -> Tuple[int, int]:
    """(N, the NFE of N steps): the most steps of `sampler` whose NFE is at most `nfe`."""
    a, b = nfe_formula(sampler)
    steps = (nfe - b) // a
    if steps < 1:
        raise UsageError(f"--nfe {nfe}: {sampler} makes at least {a + b} network evaluations (one step)")
    check_sampler_steps(sampler, steps, num_timesteps(config), bool(config.get("precond")),
                        f"--nfe {nfe}")
    return steps, a * steps + b


def parse_sampler_spec(spec: str, T: Optional[int], sigma_space: bool, flag: str) -> Tuple[str, int]:
    """"sampler[:steps]" -> (sampler, steps), checked for a model with T diffusion steps. Without
    steps: 18 for heun (EDM's 35 NFE), else 50 (at most T for ddpm and ddim)."""
    name, _, steps = str(spec).strip().partition(":")
    if steps and not steps.isdigit():
        raise UsageError(f"{flag} {spec}: expected SAMPLER[:STEPS] with a positive integer STEPS")
    n = int(steps) if steps else 18 if name == "heun" else min(50, T or 50) if name in ("ddpm", "ddim") else 50
    check_sampler_steps(name, n, T, sigma_space, f"{flag} {spec}")
    return name, n


def generate(pipe, sampler: str, steps: int, num: int, seed: int = 0, batch_size: int = 64,
             progress: bool = True, start_index: int = 0) -> dict:
    """`num` images of `pipe`, image i from (seed, start_index + i): dict(images uint8 NHWC,
    labels or None, nfe per image as Pipeline.sample counts it, seconds)."""
    stats: dict = {}
    start = time.perf_counter()
    images, labels = pipe.sample(num, sampler, steps, seed=seed, batch_size=batch_size,
                                 progress=progress, start_index=start_index, stats=stats)
    return dict(images=images, labels=labels, nfe=int(stats["nfe"]),
                seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------ files
def file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def samples_path(out_dir: str, sampler: str, nfe: int) -> str:
    return os.path.join(out_dir, f"samples_{sampler}_{nfe}.npz")


def read_samples(path: str, settings: dict) -> Optional[dict]:
    """The point's metadata ({"settings", "nfe", "seconds"}) and images of an .npz written for
    `settings`, else None (missing, unreadable or written for other settings)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f[META_KEY]))
            if meta.get("settings") != settings:
                return None
            return meta | {"images": f["arr_0"]}
    except Exception:
        return None


def write_samples(path: str, images, labels, meta: dict):
    """ADM layout (arr_0 images, arr_1 labels) plus the point's metadata, atomically."""
    arrays = {"arr_0": images} | ({"arr_1": labels} if labels is not None else {})
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{META_KEY: np.array(json.dumps(meta))})
    atomic_write_bytes(path, buf.getvalue())


def csv_rows(points) -> list:
    """One row per point and metric (not the *_std spreads), in the columns CSV_COLUMNS, by
    sampler (in order of appearance) and NFE."""
    order = {s: i for i, s in enumerate(dict.fromkeys(p["sampler"] for p in points))}
    points = sorted(points, key=lambda p: (order[p["sampler"]], p["nfe"], p["steps"]))
    return [dict(sampler=p["sampler"], steps=p["steps"], nfe=p["nfe"], metric=k, value=v,
                 num=p["num"], seconds=round(p["seconds"], 3))
            for p in points for k, v in sorted(p["metrics"].items()) if not k.endswith("_std")]


def write_results(out_dir: str, state: dict):
    """sweep.json, then sweep.csv (a view of it), each atomically."""
    atomic_write_json(os.path.join(out_dir, STATE_NAME), state)
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(csv_rows(state["points"]))
    atomic_write_bytes(os.path.join(out_dir, CSV_NAME), buf.getvalue().encode())


def thin_ticks(values, min_ratio: float = 1.15) -> list:
    """The sorted values, dropping each that lies within a factor min_ratio of the last kept
    one, so that tick labels on a log axis do not run into each other (19 and 20 would print
    as "1920")."""
    kept = []
    for v in sorted(set(values)):
        if not kept or v >= kept[-1] * min_ratio:
            kept.append(v)
    return kept


def _legend_label(sampler: str) -> str:
    a, b = REGISTRY[sampler].nfe if sampler in REGISTRY and REGISTRY[sampler].nfe else (1, 0)
    return f"{sampler} (NFE = 2N−1: odd only)" if (a, b) == (2, -1) else sampler


def plot_sweep(points, out: str, title: str = ""):
    """Each metric against NFE (log x axis), one line per sampler, one panel per metric. Points
    sit at the NFE a sampler actually used (heun cannot make an even NFE: its legend says so)."""
    rows = csv_rows(points)
    metrics = sorted({r["metric"] for r in rows})
    fig, axes = new_figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["nfe"], r["value"]) for r in rows
                         if r["metric"] == metric and r["sampler"] == sampler)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=_legend_label(sampler))
        ax.set_xscale("log")
        nfes = thin_ticks(r["nfe"] for r in rows if r["metric"] == metric)
        ax.set_xticks(nfes, [str(n) for n in nfes])   # the NFE values, not powers of ten
        ax.minorticks_off()
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_title(title)
    save_figure(fig, out)


def format_table(points) -> str:
    rows = [[str(r[c]) if c != "value" else f"{r[c]:.4g}" for c in CSV_COLUMNS] for r in csv_rows(points)]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(CSV_COLUMNS)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [list(CSV_COLUMNS)] + rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the sweep
def run_sweep(pipe, grid, reference, reference_name: str, metrics, out_dir: str, settings: dict,
              feature_net=None, seed: int = 0, batch_size: int = 64, cache_dir=None, device=None,
              progress: bool = True) -> list:
    """Sample and score every point of `grid` ([(sampler, steps, nfe)]) in `out_dir`, skipping
    what sweep.json and the .npz files already hold for `settings` (see the module docstring):
    {"samples": {..., "num"}, ...}; an .npz is reused when its settings equal "samples" plus
    its sampler and steps, the scores when all of `settings` equal sweep.json's.
    `reference`: uint8 NHWC images; `metrics`: names of metrics.evaluate. Returns the points."""
    state_path = os.path.join(out_dir, STATE_NAME)
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("settings") != settings:
        if state is not None:
            print(f"{state_path}: other settings: its results are dropped")
        state = {"settings": settings, "points": []}
        write_results(out_dir, state)
    points = state["points"]
    for sampler, steps, nfe in grid:
        point_settings = dict(settings["samples"], sampler=sampler, steps=steps)
        path = samples_path(out_dir, sampler, nfe)
        old = next((p for p in points if (p["sampler"], p["steps"]) == (sampler, steps)), None)
        saved = read_samples(path, point_settings)
        if saved is not None and old is not None and set(metrics) <= set(old["done"]):
            print(f"{sampler}, {steps} steps ({old['nfe']} NFE): done")
            continue
        if saved is None:
            out = generate(pipe, sampler, steps, settings["samples"]["num"], seed, batch_size, progress)
            saved = dict(settings=point_settings, nfe=out["nfe"], seconds=out["seconds"])
            write_samples(path, out["images"], out["labels"], saved)
            saved["images"], old = out["images"], None   # new samples: earlier scores are void
        point = old or dict(sampler=sampler, steps=steps, nfe=saved["nfe"], num=settings["samples"]["num"],
                            seconds=saved["seconds"], metrics={}, done=[])
        todo = [m for m in metrics if m not in point["done"]]
        result = evaluate(saved["images"], reference, todo, reference_name=reference_name,
                          feature_net=feature_net, cache_dir=cache_dir, batch_size=batch_size,
                          device=device, progress=progress)
        point["metrics"].update(result["metrics"])
        point["done"] = sorted(set(point["done"]) | set(todo))
        if old is None:
            points[:] = [p for p in points if (p["sampler"], p["steps"]) != (sampler, steps)] + [point]
        write_results(out_dir, state)
        scores = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items() if not k.endswith("_std"))
        print(f"{sampler}, {steps} steps ({point['nfe']} NFE): {scores}; sampling {point['seconds']:.1f} s")
    return points


# ------------------------------------------------------------------------------ CLI
def add_sweep_parser(sub):
    p = sub.add_parser(
        "sweep", help="a sample-quality metric against the number of network evaluations",
        description="For each sampler and NFE target: sample --num images with the step count "
                    "that gives that NFE (heun: N = (NFE + 1) // 2, as its N steps make 2N - 1 "
                    "network evaluations; the other samplers one per step), score them against "
                    "the reference, and write OUT/samples_SAMPLER_NFE.npz, OUT/sweep.csv "
                    "(sampler, steps, nfe, metric, value, num, seconds) and OUT/sweep.png. "
                    "Every point uses the same seeds. Rerunning skips the points already done.")
    a = p.add_argument
    a("model", help="model or run directory (config.json + *.safetensors)")
    a("--samplers", required=True,
      help=f"comma-separated, from {','.join(s for s in SAMPLER_NAMES if REGISTRY[s].nfe is not None)}")
    a("--nfe", required=True, help="comma-separated NFE targets, e.g. 10,20,35,50,100,250,1000")
    a("--metric", default="fid", help=f"comma-separated, from {','.join(METRICS)} (default fid; "
                                      f"fd and is need --feature-net)")
    a("--num", type=int, default=1000, help="images per point (1000)")
    a("--ref", required=True, help="reference: fashion-mnist[:DIR], mnist5k, an .npz or an image folder")
    a("--ref-split", default="train", choices=("train", "test"), help="split of a named reference (train)")
    a("--ref-num", type=int, help="use the first M reference images (default: --num)")
    a("--out", required=True, help="directory for the samples and results (created)")
    a("--seed", type=int, default=0, help="image i depends only on (seed, i), at every point")
    a("--batch-size", type=int, default=64, help="images per batch, sampling and features (64)")
    a("--feature-net", help="feature classifier directory (for fd, is)")
    a("--cache-dir", help=f"reference statistics cache (default ${CACHE_ENV} or ~/.cache/gaussdiff)")
    a("--ema", default="auto", help="which weights: auto, raw, or an EMA rate like 0.9999")
    a("--device")
    a("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)


def _parse_list(text: str, flag: str) -> list:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise UsageError(f"{flag}: give a comma-separated list")
    return list(dict.fromkeys(items))


def cmd_sweep(args):
    metrics = parse_metrics(args.metric)
    samplers = _parse_list(args.samplers, "--samplers")
    nfes = []
    for text in _parse_list(args.nfe, "--nfe"):
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"--nfe {text}: NFE targets must be positive integers")
        nfes.append(int(text))
    if args.num < 2 or args.batch_size < 1:
        raise UsageError("--num must be at least 2 and --batch-size positive")
    if needs_networks(metrics)[1] and not args.feature_net:
        raise UsageError(f"--metric {args.metric}: fd and is need --feature-net DIR "
                         f"(train one with `gaussdiff train-feature-net`)")
    config = read_config(args.model)
    grid = {}
    for sampler in samplers:   # (sampler, steps) once, whatever targets lead to it
        for nfe in nfes:
            steps, actual = steps_for_nfe(config, sampler, nfe)
            grid.setdefault((sampler, steps), actual)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: not a directory")
    net = None
    if args.feature_net:
        net = load_feature_net(args.feature_net, args.device)
        net.path = os.path.abspath(args.feature_net)
    reference = load_images(args.ref, args.ref_split)
    ref_num = args.ref_num if args.ref_num is not None else min(args.num, len(reference))
    reference = first_images(reference, ref_num, args.ref, "--ref-num")
    pipe = gaussdiff.load(args.model, device=args.device, ema=None if args.ema == "raw" else args.ema)
    weights = weights_path(args.model, config, None if args.ema == "raw" else args.ema)
    settings = dict(samples=dict(model=os.path.abspath(args.model), weights_sha1=file_sha1(weights),
                                 seed=args.seed, num=args.num),
                    reference=dict(spec=args.ref, split=args.ref_split, num=len(reference),
                                   sha1=images_sha1(reference)),
                    feature_net=net.sha1 if net is not None else None)
    name = args.ref if not os.path.exists(args.ref) else os.path.basename(os.path.normpath(args.ref))
    os.makedirs(args.out, exist_ok=True)
    points = run_sweep(pipe, [(s, n, nfe) for (s, n), nfe in grid.items()], reference,
                       f"{name}-{args.ref_split}", metrics, args.out, settings, feature_net=net,
                       seed=args.seed, batch_size=args.batch_size, cache_dir=args.cache_dir,
                       device=args.device, progress=not args.no_progress)
    plot_sweep(points, os.path.join(args.out, PLOT_NAME), os.path.basename(os.path.normpath(args.model)))
    print(format_table(points))
    print(f"wrote {os.path.join(args.out, CSV_NAME)} and {os.path.join(args.out, PLOT_NAME)}")

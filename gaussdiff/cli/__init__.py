"""The `gaussdiff` command line. Each subcommand is a small function; errors in user input
become one line on stderr and exit status 2.

Here: `main`, `build_parser` and train, sample, export, plot. The other subcommands:
metrics.py (eval, nll, train-feature-net, sweep), tools.py (train-classifier, invert,
interpolate, inpaint; guidance and cascade options), interop.py (convert-openai, dataset,
export-torchscript), analyze.py (analyze); common.py: the shared argument helpers."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import torch

import gaussdiff
from .analyze import add_analyze_parser
from .common import _bool
from ..diffusion.precond import OBJECTIVES, PRECONDS
from ..diffusion.process import FIXED_VAR_TYPES, LOSS_TYPES, MEAN_TYPES, VAR_TYPES
from ..diffusion.schedules import SCHEDULES, SIGMA_SCHEDULES
from ..diffusion.timesteps import SCHEDULE_SAMPLERS
from ..distributed import all_gather_cat, cleanup, setup, shard
from ..errors import UsageError
from ..images import save_grid, save_npz
from .interop import add_interop_parsers
from .metrics import add_metrics_parsers
from ..modeldir import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_json, check_output_file, read_config,
                        save_tensors, weights_path)
from ..plot import plot_log
from ..sampling.ensemble import ENSEMBLE_HELP, load_model_or_ensemble
from ..sampling.samplers import get_spec, sampler_help
from ..sampling.sharded import finish, sample_in_shards
from .tools import add_guidance_arguments, add_tools_parsers, guidance_from_args, sample_cascade
from ..training.batch_size import autotune_batch_size
from ..training.classifier import load_classifier
from .serve import add_serve_parser
from ..training.evaluation import inherit_run_options
from ..training.precision import resolve_precision
from ..training.presets import PRESETS, get_preset
from ..training.trainer import DEFAULTS, Trainer
from ..version import __version__


# ------------------------------------------------------------------------------------- train
def add_train_parser(sub):
    p = sub.add_parser("train", help="train a diffusion model",
                       description="Train a diffusion model. A --preset fills the options; any "
                                   "flag given overrides it. Defaults are listed in "
                                   "gaussdiff/training/trainer.py.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="named settings (papers' and small CPU ones)")
    a("--out", required=True, help="run directory (created; holds checkpoints, log.jsonl, samples/)")
    a("--resume", nargs="?", const="auto", metavar="auto|CHECKPOINT",
      help="continue the run in --out: from the newest checkpoint whose checksums verify "
           "(auto, the default), or from the one named (stepNNNNNNN or its path)")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="fashion-mnist[:DIR], mnist5k, an image folder, an .npz, or a "
                                  "directory of IDX files (default fashion-mnist)")
    g.add_argument("--image-size", type=int, help="image side in pixels (default: the data's)")
    g.add_argument("--channels", type=int, help="1 or 3 (default: the data's)")
    g.add_argument("--class-cond", type=_bool, help="condition on class labels (true/false)")
    g.add_argument("--label-dropout", type=float, metavar="P",
                   help="replace the label by a null label with probability P, so that the model "
                        "is also its own unconditional model (classifier-free guidance; 0: off)")
    g.add_argument("--task", choices=("generate", "upsample"),
                   help="upsample: a super-resolution model p(x | x_low, y), the second stage of "
                        "a cascade, conditioned on the image area-downsampled to --low-res")
    g.add_argument("--low-res", type=int, help="side of the low-resolution input of --task upsample")
    g.add_argument("--flip", type=_bool, help="random horizontal flips (true/false)")
    g.add_argument("--augment", type=float, metavar="P",
                   help="EDM's non-leaky augmentation with probability P (EDM: 0.12-0.15; 0: off); "
                        "the network is conditioned on the 9 augmentation parameters")
    g.add_argument("--skip-bad-images", type=_bool, help="skip unreadable images instead of failing")
    g = p.add_argument_group("network (the ADM UNet)")
    g.add_argument("--model-channels", type=int)
    g.add_argument("--channel-mult", help="e.g. 1,2,2,2")
    g.add_argument("--num-res-blocks", type=int)
    g.add_argument("--attention-resolutions", help="resolutions in pixels, e.g. 16,8")
    g.add_argument("--num-heads", type=int)
    g.add_argument("--num-head-channels", type=int, help="channels per head (overrides --num-heads)")
    g.add_argument("--num-heads-upsample", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--use-scale-shift-norm", type=_bool, help="AdaGN (true) or addition (false)")
    g.add_argument("--resblock-updown", type=_bool, help="BigGAN-style residual up/down sampling")
    g.add_argument("--norm-groups", type=int)
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--diffusion-steps", type=int, help="T")
    g.add_argument("--mean-type", choices=MEAN_TYPES)
    g.add_argument("--var-type", choices=VAR_TYPES)
    g.add_argument("--loss", choices=LOSS_TYPES)
    g.add_argument("--hybrid-lambda", type=float, help="λ of L_hybrid (0.001)")
    g.add_argument("--vb-stop-grad", type=_bool, help="stop-gradient on the mean in the VLB term")
    g.add_argument("--schedule-sampler", choices=SCHEDULE_SAMPLERS,
                   help="timestep sampling: uniform, or importance sampling with p_t ∝ "
                        "sqrt(E[L_t²]) (Improved DDPM, for --loss kl)")
    g.add_argument("--p2-gamma", type=float,
                   help="P2 weighting of L_simple, 1/(k + SNR)^γ (Choi et al.: 1; 0: off)")
    g.add_argument("--p2-k", type=float, help="k of P2 weighting (1)")
    g.add_argument("--min-snr-gamma", type=float,
                   help="Min-SNR-γ weighting of L_simple (Hang et al.: 5; 0: off)")
    g = p.add_argument_group("objective (EDM Table 1)")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help="ddpm: the discrete diffusion above (default); edm, vp, ve, iddpm: a "
                        "preconditioned denoiser trained in σ-space with that column's c_skip, "
                        "c_out, c_in, c_noise, λ(σ) and σ distribution (the diffusion options "
                        "are then not used)")
    g.add_argument("--precond", choices=PRECONDS,
                   help="another column's preconditioning (c_skip, c_out, c_in, c_noise) than "
                        "--objective's, whose loss and σ distribution stay (EDM Table 2, config "
                        "E: --objective vp --precond edm)")
    g.add_argument("--sigma-data", type=float, help="σ_data of the edm objective and preconditioning (0.5)")
    g.add_argument("--p-mean", type=float, help="P_mean of --objective edm: ln σ ~ N(P_mean, P_std²) (-1.2)")
    g.add_argument("--p-std", type=float, help="P_std of --objective edm (1.2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps")
    g.add_argument("--lr-anneal-steps", type=int, metavar="N",
                   help="decay the learning rate linearly to 0 at step N (improved-diffusion's "
                        "lr_anneal_steps; 0, the default: constant)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm (0: off)")
    g.add_argument("--ema", help="EMA rates, comma-separated, e.g. 0.9999,0.999")
    g.add_argument("--ema-warmup", type=_bool, metavar="BOOL",
                   help="EMA rate min(r, (1+n)/(10+n)) at step n, so that short runs do not "
                        "average in the random initial weights (false, as DDPM/ADM)")
    g.add_argument("--steps", type=int, help="total optimisation steps")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("logging")
    g.add_argument("--save-every", type=int)
    g.add_argument("--keep", type=int, help="checkpoint directories kept in OUT/checkpoints/, the "
                                            "newest (3; 0: all)")
    g.add_argument("--max-bad-steps", type=int,
                   help="stop after this many consecutive steps with a non-finite loss or "
                        "gradient, which are skipped (20; 0: never stop)")
    g.add_argument("--sample-every", type=int, help="write a sample grid every N steps (0: never)")
    g.add_argument("--sample-steps", type=int, help="DDIM steps for the sample grids (Heun steps "
                                                    "for σ-space objectives)")
    g.add_argument("--sample-num", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--tensorboard", nargs="?", const=True, metavar="DIR",
                   help="also write the log (loss terms, lr, gradient norm, images/s, eval_*) and "
                        "the sample grids as TensorBoard event files, to DIR or OUT/tensorboard "
                        "(needs the tensorboard package); `tensorboard --logdir OUT` shows them")
    g = p.add_argument_group("sample quality during training (log.jsonl: eval_<metric>, eval_nfe, "
                             "eval_seconds; kept by --resume)")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="every N steps and at the end, score samples of the first EMA weights "
                        "against training images (0: never, the default)")
    g.add_argument("--eval-samples", type=int, metavar="M",
                   help="samples per evaluation, from fixed seeds; also the number of training "
                        "images they are compared with (256)")
    g.add_argument("--eval-sampler", metavar="SAMPLER[:STEPS]",
                   help="heun:18 for σ-space objectives, ddim:50 (at most T) otherwise")
    g.add_argument("--eval-metric", choices=("fd", "fid"),
                   help="fd (with --eval-feature-net, the default then) or fid (Inception, slow on a CPU)")
    g.add_argument("--eval-feature-net", metavar="DIR", help="feature classifier for fd "
                                                             "(gaussdiff train-feature-net)")
    g = p.add_argument_group("performance and memory (docs/performance.md); under torchrun "
                             "--batch-size is the global batch")
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16", "auto"),
                   help="fp16: autocast with ADM's dynamic loss scaling (2^20, halved on overflow, "
                        "the step skipped); bf16: autocast. Weights, optimizer and EMA stay fp32. "
                        "On a CPU without instructions for it, half precision falls back to fp32 "
                        "unless --force-precision")
    g.add_argument("--force-precision", action="store_true", default=None,
                   help="use --precision fp16/bf16 even on a CPU that would emulate it (slow)")
    g.add_argument("--microbatch", type=int, metavar="M",
                   help="run the batch in chunks of M rows, accumulating gradients (same step as "
                        "the whole batch; 0: off)")
    g.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="recompute block activations in the backward pass (less memory, ~30%% "
                        "more compute)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC memory format for the network")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network (minutes of start-up on a CPU)")
    p.set_defaults(func=cmd_train)


def cmd_train(args):
    opts = dict(DEFAULTS)
    if args.preset:
        opts.update(get_preset(args.preset))
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    opts.update(given)
    if args.resume:   # the run's --eval-* options, unless given again
        inherit_run_options(opts, given, args.out)
    dist, device = setup(args.device)   # torchrun: a process group; else one process
    created = not os.path.exists(args.out)
    try:
        try:
            trainer = Trainer(opts, args.out, resume=args.resume, device=device,
                              progress=not args.no_progress, dist=dist)
        except BaseException:   # a set-up error leaves no empty run directory behind
            if created and dist.is_main and os.path.isdir(args.out):
                shutil.rmtree(args.out, ignore_errors=True)
            raise
        trainer.run()
    finally:
        cleanup()
    if dist.is_main:
        print(f"trained to step {trainer.step}; model directory: {args.out}")


# ------------------------------------------------------------------------------------- sample
def add_sample_parser(sub):
    p = sub.add_parser("sample", help="draw images from a model directory")
    a = p.add_argument
    a("model", nargs="?", help="model or run directory (config.json + *.safetensors)")
    a("--ensemble", metavar="MODEL_A:MODEL_B:K", help=ENSEMBLE_HELP)
    a("--cascade", nargs=2, metavar=("BASE_DIR", "UPSAMPLER_DIR"),
      help="instead of MODEL: sample the base model, then refine its images with the upsampler "
           "(gaussdiff train --task upsample); guidance applies to the base model; --grid also "
           "writes the base images as GRID.low.png")
    a("--num", "--num-samples", dest="num", type=int, default=64,
      help="number of images (64); under torchrun write --num-samples (torchrun itself takes "
           "--num as an abbreviation of its --numa-binding)")
    a("--sampler", default="ddim", help=f"{sampler_help()} (default ddim)")
    a("--steps", default="50", help="ddpm, ddim: respacing: 250, ddim50, or per-section counts like "
                                    "10,15,20; σ-space samplers: the number of steps N (50)")
    a("--eta", type=float, help="η of ddim and ddim_sigma (default 0: deterministic) and of "
                                "euler_ancestral (default 1)")
    a("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    a("--batch-size", type=_batch_size, default=64,
      help="images per batch (64), or auto: the fastest on a quick probe (CPU) or the largest "
           "that fits in memory (CUDA)")
    a("--channels-last", action="store_true", help="NHWC memory format for the network")
    a("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
      help="autocast precision of the network evaluations (fp32); the sampler's state and "
           "arithmetic stay float64 on a CPU. auto: bf16 where the device runs it natively. A "
           "half precision the CPU would emulate falls back to fp32 unless --force-precision")
    a("--force-precision", action="store_true", help="use --precision bf16/fp16 even if emulated")
    a("--label", type=int, help="class label for every image (class-conditional models, or an "
                                "unconditional one guided by --classifier)")
    a("--ema", default="auto", help="which weights: auto, raw, or an EMA rate like 0.9999")
    a("--out", help="write an ADM-compatible .npz (uint8 NHWC arr_0, labels arr_1); more than "
                    "--shard-size images are sampled in shards kept in OUT.parts/, so that an "
                    "interrupted run continues where it stopped when rerun with the same options")
    a("--shard-size", type=int, default=1000,
      help="images per shard of a long --out run (1000)")
    a("--grid", help="write a PNG grid")
    a("--device")
    a("--no-progress", action="store_true")
    add_guidance_arguments(p)
    g = p.add_argument_group("σ-space samplers (EDM, Karras et al. 2022)")
    g.add_argument("--schedule", choices=SIGMA_SCHEDULES,
                   help="noise levels (EDM Table 1): karras (default; ρ-spaced in [0.002, 80] "
                        "clipped to the model's range), vp, ve, or iddpm (the model's own levels, j0=8)")
    g.add_argument("--rho", type=float, help="ρ of the karras schedule (7)")
    g.add_argument("--sigma-min", type=float, help="lowest nonzero σ (karras, ve)")
    g.add_argument("--sigma-max", type=float, help="highest σ (karras, ve)")
    g.add_argument("--churn", type=float, help="S_churn of EDM Algorithm 2 (heun, euler; default 0)")
    g.add_argument("--tmin", type=float, help="S_tmin: add noise only for σ >= tmin (default 0)")
    g.add_argument("--tmax", type=float, help="S_tmax: add noise only for σ <= tmax (default inf)")
    g.add_argument("--snoise", type=float, help="S_noise, the std of the added noise (default 1)")
    g.add_argument("--rtol", type=float, help="relative tolerance of the adaptive sampler (0.05)")
    g.add_argument("--atol", type=float, help="absolute tolerance of the adaptive sampler (0.0078)")
    g.add_argument("--quantize", action="store_true",
                   help="give a discrete-time model the nearest timestep, not a fractional one")
    g.add_argument("--var-type", choices=FIXED_VAR_TYPES,
                   help="ddpm: fixed reverse variances (β̃_t or β_t) instead of the model's own, "
                        "e.g. learned ones (Improved DDPM Fig. 8)")
    p.set_defaults(func=cmd_sample)


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def cmd_sample(args):
    if args.num < 1 or (args.batch_size != "auto" and args.batch_size < 1) or args.shard_size < 1:
        raise UsageError("--num, --batch-size and --shard-size must be positive")
    get_spec(args.sampler)
    if not args.out and not args.grid:
        raise UsageError("give --out SAMPLES.npz and/or --grid GRID.png")
    if [args.model, args.cascade, args.ensemble].count(None) != 2:
        raise UsageError("give a MODEL directory, --ensemble MODEL_A:MODEL_B:K or --cascade "
                         "BASE_DIR UPSAMPLER_DIR (one of them)")
    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path:
            check_output_file(path, flag)
    if args.out and args.grid and os.path.abspath(args.out) == os.path.abspath(args.grid):
        raise UsageError(f"--out and --grid name the same file {args.out}")
    dist, device = setup(args.device)   # torchrun: rank r draws its share of the indices
    try:
        _sample(args, dist, device)
    finally:
        cleanup()


def _sample(args, dist, device):
    guidance = guidance_from_args(args, device)
    if args.cascade:
        if args.var_type:
            raise UsageError("--var-type applies to one model's ddpm sampler, not to --cascade")
        if dist.enabled:
            raise UsageError("--cascade runs in one process (not under torchrun)")
        return sample_cascade(args, device, guidance)
    pipe = load_model_or_ensemble(args.model, args.ensemble, device=device,
                                  ema=None if args.ema == "raw" else args.ema)
    if args.channels_last:
        pipe.model.to(memory_format=torch.channels_last)
    precision = resolve_precision(args.precision, device, args.force_precision, "sampling")
    steps = int(args.steps) if args.steps.isdigit() else args.steps
    labels = None
    if args.label is not None:
        nc = pipe.num_classes or (guidance and guidance.num_classes)   # or the classifier's
        if not nc or not 0 <= args.label < nc:
            raise UsageError(f"--label {args.label}: the model has {nc or 'no'} classes")
        labels = [args.label] * args.num
    if args.num < dist.world_size:
        raise UsageError(f"--num-samples {args.num} is less than the number of processes "
                         f"({dist.world_size})")
    part = shard(args.num, dist)   # image i depends only on (seed, i): any split gives the same
    count = part.stop - part.start
    batch_size = args.batch_size
    if batch_size == "auto":
        batch_size = autotune_batch_size(pipe, count)
        if dist.is_main:
            print(f"--batch-size auto: {batch_size}")
    stats = {}

    def draw(start, stop, progress):
        return pipe.sample(stop - start, args.sampler, steps, eta=args.eta, seed=args.seed,
                           batch_size=batch_size, labels=labels and labels[start:stop],
                           progress=progress, start_index=start, sigma_schedule=args.schedule,
                           rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                           churn=args.churn, tmin=args.tmin, tmax=args.tmax,
                           snoise=args.snoise, rtol=args.rtol, atol=args.atol,
                           quantize=args.quantize, stats=stats, guidance=guidance,
                           precision=precision, var_type=args.var_type)
    sharded = bool(args.out) and not dist.enabled and args.num > args.shard_size
    if sharded:
        images, y = sample_in_shards(args, draw, stats)
    else:
        images, y = draw(part.start, part.stop, not args.no_progress and dist.is_main)
    if dist.enabled:   # rank 0 gathers the parts in index order
        on = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else torch.device("cpu")
        images = all_gather_cat(torch.from_numpy(images).to(on), dist).cpu().numpy()
        if y is not None:
            y = all_gather_cat(torch.from_numpy(y).to(on), dist).cpu().numpy()
        nfe = all_gather_cat(torch.tensor([stats["nfe"]], device=on), dist)
        stats["nfe"] = int(nfe.max())
        if not dist.is_main:
            return
    print(f"{args.sampler}: {stats['nfe']} network evaluations per image")
    if args.grid:   # first: a failure here leaves no .npz behind
        save_grid(args.grid, images[:256])
        print(f"wrote {args.grid}")
    if args.out:
        print(f"wrote {save_npz(args.out, images, y)} ({len(images)} images)")
        if sharded:
            finish(args)


# ------------------------------------------------------------------------------------- export
def add_export_parser(sub):
    p = sub.add_parser("export", help="copy a run's config and one set of weights into a model directory")
    p.add_argument("run", help="training run directory")
    p.add_argument("out", help="new model directory")
    p.add_argument("--ema", default="auto", help="auto, raw, or an EMA rate like 0.999")
    p.set_defaults(func=cmd_export)


def cmd_export(args):
    ema = None if args.ema == "raw" else args.ema
    if read_config(args.run).get("kind") == "classifier":   # a noisy classifier's run
        pipe = load_classifier(args.run, device="cpu", ema=ema)
    else:
        pipe = gaussdiff.load(args.run, device="cpu", ema=ema)
    os.makedirs(args.out, exist_ok=True)
    cfg = dict(pipe.config)
    cfg["training"] = dict(cfg.get("training", {}), sample_ema=None,
                           exported_from=os.path.basename(os.path.normpath(args.run)),
                           exported_weights=args.ema)
    save_tensors(os.path.join(args.out, WEIGHTS_NAME), pipe.model.state_dict())
    atomic_write_json(os.path.join(args.out, CONFIG_NAME), cfg)
    print(f"wrote {args.out}")
    warning = ema_init_share_warning(args.run, pipe.config, ema)
    if warning:
        print(warning, file=sys.stderr)


def ema_init_share_warning(run: str, cfg: dict, ema) -> str:
    """A warning when the exported EMA still holds more than 1% of the random initial
    weights (r^steps, without --ema-warmup): the exported model would be partly untrained.
    cfg: the run's config.json."""
    path = weights_path(run, cfg, ema)
    name = os.path.basename(path)
    if not name.startswith("ema_") or not os.path.exists(os.path.join(run, "state.json")):
        return ""
    with open(os.path.join(run, "state.json")) as f:
        steps = int(json.load(f).get("step", 0))
    rate = float(name[len("ema_"):-len(".safetensors")])
    if cfg.get("training", {}).get("ema_warmup"):
        return ""
    share = rate ** steps
    if share <= 0.01:
        return ""
    needed = math.ceil(math.log(0.01) / math.log(rate))
    return (f"warning: the EMA {rate:g} of step {steps} still holds {share:.0%} of the random "
            f"initial weights ({rate:g}^{steps}); train to step {needed:,} for 1%, export "
            f"--ema raw, or train with --ema-warmup true")


# ------------------------------------------------------------------------------------- plot
def add_plot_parser(sub):
    p = sub.add_parser("plot", help="plot a run's training curve (log.jsonl) to a PNG")
    p.add_argument("run", help="training run directory or log.jsonl")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args):
    plot_log(args.run, args.out)
    print(f"wrote {args.out}")


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaussdiff", description="Gaussian diffusion image models")
    parser.add_argument("--version", action="version", version=f"gaussdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_export_parser(sub)
    add_metrics_parsers(sub)   # eval, nll, train-feature-net
    add_tools_parsers(sub)   # train-classifier, invert, interpolate, inpaint
    add_interop_parsers(sub)   # convert-openai, dataset, export-torchscript
    add_plot_parser(sub)
    add_analyze_parser(sub)   # rate-distortion, noise-levels, progressive, ...
    add_serve_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        print(f"gaussdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # disk full, unwritable or vanished paths: the system's one-line reason
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"gaussdiff {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

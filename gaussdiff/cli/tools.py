"""The command line of gaussdiff.training.classifier, gaussdiff.sampling.guidance and
gaussdiff.sampling.editing: `gaussdiff train-classifier`, `invert`, `interpolate`, `inpaint`,
and the guidance and cascade options of `gaussdiff sample`."""
from __future__ import annotations

import io
import os

import numpy as np

import gaussdiff
from .common import _bool
from ..data import read_image
from ..errors import UsageError
from ..images import make_grid, save_grid, save_npz, save_png
from ..modeldir import atomic_write_bytes
from ..nn.encoder import POOLS
from ..sampling.editing import cascade, inpaint, interpolate, invert, reconstruct, reconstruction_error
from ..sampling.guidance import GRAD_AT, TEMPERATURE_MODES, Guidance
from ..sampling.samplers import SAMPLERS
from ..training.classifier import CLASSIFIER_DEFAULTS, ClassifierTrainer, load_classifier, schedule_of
from ..training.trainer import parse_floats, parse_ints


def _check_out_dir(*paths):
    for path in paths:
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")


def _parse_ints(text, what):
    return parse_ints(text, what) if text is not None else None


# ------------------------------------------------------------------------------- guidance
def add_guidance_arguments(p):
    g = p.add_argument_group("guidance (ADM appendices D and I; classifier-free guidance)")
    g.add_argument("--classifier", metavar="DIR",
                   help="classifier guidance with this noisy classifier (gaussdiff train-classifier): "
                        "ddpm shifts the mean by s·Σ·∇log p(y|x_t), ddim and σ-space samplers use "
                        "ε̂ = ε − s·sqrt(1−ᾱ)·∇log p(y|x_t)")
    g.add_argument("--classifier-scale", type=float, metavar="S", help="s of classifier guidance (1)")
    g.add_argument("--classifier-grad-at", choices=GRAD_AT,
                   help="take the classifier gradient at x_t (default, as ADM) or at the predicted "
                        "mean (ddpm only)")
    g.add_argument("--classifier-clip", choices=("guided", "adm"),
                   help="guided (default): clamp the classifier-guided x̂0 to [-1, 1] as well; adm: "
                        "clamp only before the shift, ADM's Algorithm 2 as published (breaks DDIM on "
                        "cosine schedules, where the first shift is ≈ 2·10⁴·s·∇log p)")
    g.add_argument("--cfg-scale", type=float, metavar="W",
                   help="classifier-free guidance D_u + W·(D_c − D_u) for a model trained with "
                        "--label-dropout (1: conditional, 0: unconditional)")
    g.add_argument("--cfg-interval", metavar="LO,HI",
                   help="apply classifier-free guidance only for noise levels σ in [LO, HI]")
    g.add_argument("--temperature", type=float, metavar="T",
                   help="sampling temperature τ (1: off; ADM section I)")
    g.add_argument("--temperature-mode", choices=TEMPERATURE_MODES,
                   help="noise: scale the noise each step adds by τ (default); eps: divide ε by τ")


def guidance_from_args(args, device):
    """A gaussdiff.sampling.guidance.Guidance from the options of add_guidance_arguments, or None."""
    if args.classifier is None and (args.classifier_scale is not None or args.classifier_grad_at
                                    or args.classifier_clip):
        raise UsageError("--classifier-scale, --classifier-grad-at and --classifier-clip apply "
                         "with --classifier DIR")
    given = (args.classifier, args.cfg_scale, args.cfg_interval, args.temperature,
             args.temperature_mode)
    if all(v is None for v in given):
        return None
    interval = None
    if args.cfg_interval is not None:
        interval = parse_floats(args.cfg_interval, "cfg-interval")
        if len(interval) != 2:
            raise UsageError(f"--cfg-interval: expected LO,HI, got {args.cfg_interval!r}")
    classifier = None
    if args.classifier:
        classifier = load_classifier(args.classifier, device=device)
    return Guidance(classifier=classifier,
                    classifier_scale=1.0 if args.classifier_scale is None else args.classifier_scale,
                    grad_at=args.classifier_grad_at or "x_t", cfg_scale=args.cfg_scale,
                    cfg_interval=None if interval is None else tuple(interval),
                    temperature=1.0 if args.temperature is None else args.temperature,
                    temperature_mode=args.temperature_mode or "noise",
                    clip_guided=args.classifier_clip != "adm")


def sample_cascade(args, device, guidance):
    """`gaussdiff sample --cascade BASE UPSAMPLER`: writes --out (the upsampled images) and
    --grid, plus the base model's images as <grid>.low.png."""
    ema = None if args.ema == "raw" else args.ema
    base, up = (gaussdiff.load(d, device=device, ema=ema) for d in args.cascade)
    labels = None
    if args.label is not None:
        if base.num_classes is None or not 0 <= args.label < base.num_classes:
            raise UsageError(f"--label {args.label}: the base model has {base.num_classes or 'no'} classes")
        labels = [args.label] * args.num
    steps = int(args.steps) if args.steps.isdigit() else args.steps
    options = dict(eta=args.eta, sigma_schedule=args.schedule, rho=args.rho,
                   sigma_min=args.sigma_min, sigma_max=args.sigma_max, churn=args.churn,
                   tmin=args.tmin, tmax=args.tmax, snoise=args.snoise, rtol=args.rtol,
                   atol=args.atol, quantize=args.quantize)
    high, low, y = cascade(base, up, args.num, args.sampler, steps, seed=args.seed, labels=labels,
                           guidance=guidance, batch_size=args.batch_size,
                           progress=not args.no_progress, **options)
    if args.out:
        print(f"wrote {save_npz(args.out, high, y)} ({len(high)} images, {high.shape[1]}x{high.shape[2]})")
    if args.grid:
        low_grid = os.path.splitext(args.grid)[0] + ".low.png"
        save_grid(args.grid, high[:256])
        save_grid(low_grid, low[:256], scale=2 * high.shape[1] // low.shape[1])
        print(f"wrote {args.grid} and {low_grid} (the base model's images)")


# ------------------------------------------------------------------------- train-classifier
def add_train_classifier_parser(sub):
    train_parser = sub.choices["train"]
    p = sub.add_parser("train-classifier", help="train a noisy classifier for classifier guidance",
                       description="Train ADM's noisy classifier (the UNet's downsampling half with "
                                   "attention pooling) on q_sample(x_0, t) at uniform t. The run "
                                   "directory works like train's (EMA, checkpoints, --resume); "
                                   "log.jsonl has loss and accuracy, overall and by quarter of "
                                   "the process (acc_q0: t in [0, T/4), ...). Defaults: "
                                   "CLASSIFIER_DEFAULTS in gaussdiff/training/classifier.py.")
    shared = ("out", "resume", "device", "no_progress", "data", "image_size", "channels", "flip",
              "skip_bad_images", "schedule", "diffusion_steps", "model_channels", "channel_mult",
              "num_res_blocks", "attention_resolutions", "num_heads", "num_head_channels",
              "dropout", "use_scale_shift_norm", "resblock_updown", "norm_groups", "batch_size",
              "lr", "weight_decay", "warmup", "lr_anneal_steps", "grad_clip", "ema", "ema_warmup",
              "steps", "seed", "save_every", "keep", "log_every", "tensorboard", "microbatch",
              "precision", "force_precision")
    for action in train_parser._actions:   # the same options as `gaussdiff train`
        if action.dest in shared:
            p._add_action(action)
    p.add_argument("--pool", choices=POOLS, help="the head: attention pooling (ADM) or average pooling")
    p.add_argument("--schedule-from", metavar="MODEL_DIR",
                   help="take --schedule and --diffusion-steps from this diffusion model (the "
                        "classifier then sees the model's own timesteps)")
    p.set_defaults(func=cmd_train_classifier)


def cmd_train_classifier(args):
    opts = dict(CLASSIFIER_DEFAULTS)
    if args.schedule_from:
        opts.update(schedule_of(args.schedule_from))
    opts.update({k: v for k, v in vars(args).items() if k in CLASSIFIER_DEFAULTS and v is not None})
    trainer = ClassifierTrainer(opts, args.out, resume=args.resume, device=args.device,
                                progress=not args.no_progress).run()
    print(f"trained to step {trainer.step}; classifier directory: {args.out}")


# ------------------------------------------------------------------------------- tools
def _add_model_arguments(p):
    p.add_argument("--model", required=True, help="model directory (config.json + *.safetensors)")
    p.add_argument("--ema", default="auto", help="which weights: auto, raw, or an EMA rate")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")


def _load(args):
    return gaussdiff.load(args.model, device=args.device, ema=None if args.ema == "raw" else args.ema)


def _read_images(pipe, paths):
    """uint8 [N, H, W, C] at the model's size and channels (data.read_image)."""
    C, H, _ = pipe.image_shape
    return np.stack([read_image(p, C, H) for p in paths])


def _steps(text):
    return int(text) if str(text).isdigit() else text


def add_tools_parsers(sub):
    """train-classifier (after train, whose options it shares), invert, interpolate, inpaint."""
    add_train_classifier_parser(sub)
    p = sub.add_parser("invert", help="DDIM inversion of images to latents x_T (ADM section H; "
                                      "σ-space models: Euler steps up to σ_max)")
    p.add_argument("images", nargs="+", metavar="IMG", help="PNG/JPEG images")
    _add_model_arguments(p)
    p.add_argument("--out", required=True, help="latents .npz (latents [N, C, H, W], labels, files)")
    p.add_argument("--steps", default="50",
                   help="DDIM steps (a respacing: 50, ddim50 ...; σ-space models: N Euler steps) (50)")
    p.add_argument("--skip-last", action="store_true",
                   help="reverse all steps but the last (ADM: better reconstructions; discrete-time "
                        "models only)")
    p.add_argument("--labels", help="class labels, comma-separated, one per image (or one for all)")
    p.add_argument("--reconstruct", metavar="PNG",
                   help="decode the latents again, write originals (top) and reconstructions "
                        "(bottom) and print the reconstruction error")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("interpolate", help="interpolate two images through DDIM latents (ADM section H)")
    p.add_argument("image_a", metavar="IMG_A")
    p.add_argument("image_b", metavar="IMG_B")
    _add_model_arguments(p)
    p.add_argument("--out", required=True, help="PNG strip: IMG_A, the frames, IMG_B")
    p.add_argument("--frames", type=int, default=9, help="frames, θ from 0 to π/2 (9)")
    p.add_argument("--steps", default="50", help="DDIM steps (σ-space models: Euler steps) (50)")
    p.add_argument("--skip-last", type=_bool,
                   help="reverse all steps but the last (default true; discrete-time models only)")
    p.add_argument("--labels", metavar="A,B", help="the two class labels (class-conditional models)")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("inpaint", help="fill a masked region of an image")
    p.add_argument("image", metavar="IMG")
    p.add_argument("--mask", required=True,
                   help="mask image of the same size: white (>= 128) is filled, black is kept")
    _add_model_arguments(p)
    p.add_argument("--out", required=True,
                   help="PNG: the masked input, then the fillings (and --npz for the arrays)")
    p.add_argument("--npz", help="also write the fillings as an ADM-style .npz")
    p.add_argument("--num", type=int, default=4, help="fillings (4)")
    p.add_argument("--sampler", default="ddpm",
                   help=f"ddpm (with replacement and --resample), or a σ-space sampler: "
                        f"{', '.join(SAMPLERS)}")
    p.add_argument("--steps", default="250", help="ddpm: a respacing (250); σ-space: N steps")
    p.add_argument("--resample", type=int, default=1,
                   help="RePaint: redo each block of --jump steps R times (1: plain replacement)")
    p.add_argument("--jump", type=int, default=1, help="RePaint's jump length (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, help="class label (class-conditional models; default random)")
    p.set_defaults(func=cmd_inpaint)


def _labels_for(pipe, text, n):
    labels = _parse_ints(text, "labels")
    if labels is not None and len(labels) == 1:
        labels = labels * n
    if labels is not None and len(labels) != n:
        raise UsageError(f"--labels: {len(labels)} labels for {n} images")
    if pipe.num_classes is not None and labels is None:
        raise UsageError(f"{pipe.path} is class-conditional: give the images' classes with --labels")
    return labels


def cmd_invert(args):
    _check_out_dir(args.out, args.reconstruct)
    pipe = _load(args)
    images = _read_images(pipe, args.images)
    labels = _labels_for(pipe, args.labels, len(images))
    steps = _steps(args.steps)
    z = invert(pipe, images, steps, args.skip_last or None, labels, progress=not args.no_progress)
    buf = io.BytesIO()
    np.savez(buf, latents=z.cpu().numpy(), labels=np.asarray(labels if labels else [], np.int64),
             files=np.asarray(args.images), steps=np.asarray(str(args.steps)),
             skip_last=np.asarray(args.skip_last))
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {out} ({len(z)} latents, {steps} steps{', last step skipped' if args.skip_last else ''})")
    if args.reconstruct:
        recon = reconstruct(pipe, z, steps, labels, progress=not args.no_progress)
        err = reconstruction_error(images, recon)
        save_png(args.reconstruct, make_grid(np.concatenate([images, recon]), ncols=len(images), scale=2))
        print(f"reconstruction: mse {err['mse'].mean():.5f} (images in [-1, 1]), "
              f"psnr {err['psnr'].mean():.2f} dB; wrote {args.reconstruct}")


def cmd_interpolate(args):
    _check_out_dir(args.out)
    pipe = _load(args)
    a, b = _read_images(pipe, [args.image_a, args.image_b])
    labels = _labels_for(pipe, args.labels, 2)
    frames = interpolate(pipe, a, b, args.frames, _steps(args.steps), args.skip_last, labels,
                         progress=not args.no_progress)
    save_png(args.out, make_grid(np.concatenate([a[None], frames, b[None]]),
                                 ncols=len(frames) + 2, scale=2))
    print(f"wrote {args.out} (IMG_A, {len(frames)} frames, IMG_B)")


def cmd_inpaint(args):
    _check_out_dir(args.out, args.npz)
    if args.num < 1:
        raise UsageError("--num must be positive")
    pipe = _load(args)
    image = _read_images(pipe, [args.image])[0]
    mask = read_image(args.mask, 1, pipe.image_shape[1])[..., 0] >= 128
    if not mask.any():
        raise UsageError(f"{args.mask}: the mask is all black: nothing to fill (white marks the region)")
    labels = None
    if args.label is not None:
        if pipe.num_classes is None or not 0 <= args.label < pipe.num_classes:
            raise UsageError(f"--label {args.label}: the model has {pipe.num_classes or 'no'} classes")
        labels = [args.label] * args.num
    steps = _steps(args.steps)
    filled = inpaint(pipe, image, mask, args.num, args.sampler, steps, args.resample, args.jump,
                     args.seed, labels, progress=not args.no_progress)
    shown = np.where(mask[..., None], np.uint8(128), image)   # the region to fill in grey
    save_png(args.out, make_grid(np.concatenate([shown[None], filled]), ncols=len(filled) + 1, scale=2))
    if args.npz:
        save_npz(args.npz, filled)
    print(f"wrote {args.out} (masked input, {len(filled)} fillings)")

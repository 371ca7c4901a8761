"""Metric subcommands of the `gaussdiff` CLI: eval, nll, train-feature-net, sweep (gaussdiff/metrics/sweep.py)."""
from __future__ import annotations

import json
import os
import sys

from ..data import first_images, load_dataset, load_images
from ..distributed import cleanup, setup
from ..errors import UsageError
from ..metrics.classifier import accuracy, load_feature_net, save_feature_net, train_feature_classifier
from ..metrics.evaluate import CACHE_ENV, METRICS, evaluate, parse_metrics
from ..metrics.likelihood import evaluate_nll
from ..metrics.ode_likelihood import evaluate_ode_nll
from ..modeldir import atomic_write_bytes
from ..sampling.ensemble import ENSEMBLE_HELP, load_model_or_ensemble
from ..metrics.sweep import add_sweep_parser


def _check_out(path):
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f"{path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")


def _write_json(obj, out):
    text = json.dumps(obj, indent=2) + "\n"
    sys.stdout.write(text)
    if out:
        atomic_write_bytes(out, text.encode())
        print(f"wrote {out}", file=sys.stderr)


# ------------------------------------------------------------------------------------- eval
def add_eval_parser(sub):
    p = sub.add_parser(
        "eval", help="sample-quality metrics (FID, sFID, KID, precision/recall, IS/FD of a data classifier)",
        description="Compare generated images with a reference set. fid, sfid and (by default) kid, "
                    "prec, rec use Inception-V3 (about 0.4 s per image on a CPU); fd and is use a "
                    "classifier trained on the data (--feature-net) and are reported as fd_NAME, "
                    "is_NAME. Reference statistics are cached, so a second evaluation against the "
                    "same reference only costs the samples. Prints JSON.")
    a = p.add_argument
    a("samples", help="generated images: an .npz (uint8 NHWC arr_0, as `gaussdiff sample --out`) or an image folder")
    a("--ref", required=True, help="reference: fashion-mnist[:DIR], mnist5k, an .npz or an image folder")
    a("--ref-split", default="train", choices=("train", "test"),
      help="split of a named reference dataset (train, as ADM)")
    a("--metrics", default="fid", help=f"comma-separated, from {','.join(METRICS)} (default fid)")
    a("--num", type=int, help="use the first N samples (default: all)")
    a("--ref-num", type=int, help="use the first M reference images (default: as many as samples)")
    a("--space", default="inception", choices=("inception", "net"),
      help="feature space of kid, prec and rec: inception (default) or net (the --feature-net; "
           "keys get its name as suffix)")
    a("--feature-net", help="feature classifier directory (for fd, is, --space net)")
    a("--cache-dir", help=f"reference statistics cache (default ${CACHE_ENV} or ~/.cache/gaussdiff)")
    a("--batch-size", type=int, default=50)
    a("--kid-subset-size", type=int, default=1000, help="KID subset size (1000; lowered to the sample count)")
    a("--kid-subsets", type=int, default=100, help="number of KID subsets (100)")
    a("--is-splits", type=int, default=10, help="splits for the Inception Score formula (10)")
    a("--seed", type=int, default=0, help="seed of the KID subsets")
    a("--out", help="also write the JSON to this file")
    a("--device")
    a("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args):
    """Under torchrun the ranks share the feature extraction; rank 0 writes the JSON."""
    dist, device = setup(args.device)
    try:
        _eval(args, dist, device)
    finally:
        cleanup()


def _eval(args, dist, device):
    metrics = parse_metrics(args.metrics)
    _check_out(args.out)
    if args.batch_size < 1 or args.kid_subsets < 1 or args.kid_subset_size < 2 or args.is_splits < 1:
        raise UsageError("--batch-size, --kid-subsets and --is-splits must be positive, --kid-subset-size >= 2")
    net = None
    if args.feature_net:
        net = load_feature_net(args.feature_net, device)
        net.path = os.path.abspath(args.feature_net)
    samples = first_images(load_images(args.samples, "train"), args.num, args.samples, "--num")
    reference = load_images(args.ref, args.ref_split)
    ref_num = args.ref_num if args.ref_num is not None else min(len(samples), len(reference))
    reference = first_images(reference, ref_num, args.ref, "--ref-num")
    name = args.ref if not os.path.exists(args.ref) else os.path.basename(os.path.normpath(args.ref))
    result = evaluate(samples, reference, metrics, reference_name=f"{name}-{args.ref_split}",
                      space=args.space, feature_net=net, cache_dir=args.cache_dir,
                      batch_size=args.batch_size, kid_subset_size=args.kid_subset_size,
                      kid_subsets=args.kid_subsets, is_splits=args.is_splits, seed=args.seed,
                      device=device, progress=not args.no_progress)
    result = {"samples": os.path.abspath(args.samples), **result}
    result["reference"].update(spec=args.ref, split=args.ref_split)
    if dist.is_main:
        _write_json(result, args.out)


# ------------------------------------------------------------------------------------- nll
def add_nll_parser(sub):
    p = sub.add_parser("nll", help="negative log-likelihood (the VLB) in bits/dim with its terms",
                       description="The variational bound L_prior + Σ L_t + L_0 in bits/dim on "
                                   "a dataset, with mean and standard error, optionally with "
                                   "the diffusion respaced to K evaluation steps; or with --ode "
                                   "the probability-flow ODE's likelihood. Prints JSON.")
    a = p.add_argument
    a("model", nargs="?", help="model or run directory (config.json + *.safetensors); omit it "
                               "with --ensemble")
    a("--ensemble", metavar="MODEL_A:MODEL_B:K", help=ENSEMBLE_HELP)
    a("--data", default="fashion-mnist", help="dataset: fashion-mnist[:DIR], an .npz, an image folder")
    a("--split", default="test", choices=("train", "test"), help="split of a named dataset (test)")
    a("--num", type=int, help="evaluate the first N images (default: all)")
    a("--steps", help="evaluation steps: K (evenly respaced), ddimK or per-section counts "
                      "(default: the model's own T); with --ode: N Heun steps instead of RK45")
    a("--batch-size", type=int, default=16)
    a("--seed", type=int, default=0, help="image i's noise depends only on (seed, i)")
    a("--ema", default="auto", help="which weights: auto, raw, or an EMA rate like 0.9999")
    a("--out", help="write the whole record as JSON to this file (with per-step and per-image "
                    "values; stdout gets the summary)")
    a("--device")
    a("--no-progress", action="store_true")
    g = p.add_argument_group(
        "ODE likelihood (--ode)",
        "The exact likelihood of the probability-flow ODE (Song et al. 2021), for σ-space and "
        "discrete-time models: pixels k are dequantized to z = 2(k+u)/256 - 1, u ~ U(0,1), and "
        "bpd = -log p(z)/(D ln 2) + 7. Integrated in log σ by RK45, or Heun with --steps.")
    g.add_argument("--ode", action="store_true", help="the ODE likelihood instead of the VLB")
    g.add_argument("--hutchinson-samples", type=int, metavar="K",
                   help="Hutchinson probes per image for the divergence (1)")
    g.add_argument("--probe", choices=("rademacher", "gaussian"), help="probe distribution (rademacher)")
    g.add_argument("--exact-trace", action="store_true",
                   help="exact divergence: one backward pass per dimension (tiny images only)")
    g.add_argument("--rtol", type=float, help="RK45 relative tolerance (1e-5, Song et al.)")
    g.add_argument("--atol", type=float, help="RK45 absolute tolerance (1e-5)")
    g.add_argument("--sigma-min", type=float,
                   help="σ the integration starts from: the data point is a sample of p_σmin "
                        "(max(0.002, the model's smallest σ))")
    g.add_argument("--sigma-max", type=float,
                   help="σ of the prior N(0, σ² I) (the model's largest σ; 80 for EDM)")
    p.set_defaults(func=cmd_nll)


def _nll_ode_options(args) -> dict:
    """The evaluate_ode_nll options of `nll --ode`, checked before anything loads (without
    --ode, an error if any ODE flag is given)."""
    flags = dict(hutchinson_samples="--hutchinson-samples", probe="--probe", exact_trace="--exact-trace",
                 rtol="--rtol", atol="--atol", sigma_min="--sigma-min", sigma_max="--sigma-max")
    given = [flag for key, flag in flags.items() if getattr(args, key) not in (None, False)]
    if not args.ode:
        if given:
            raise UsageError(f"{given[0]} applies only to the ODE likelihood: add --ode")
        return {}
    steps = args.steps
    if steps is not None:
        if not steps.isdigit() or int(steps) < 1:
            raise UsageError(f"--steps {steps}: with --ode, give a positive number of Heun steps")
        steps = int(steps)
        if args.rtol is not None or args.atol is not None:
            raise UsageError("--rtol and --atol apply to the RK45 solver, not to --steps (Heun)")
    if args.exact_trace and (args.hutchinson_samples is not None or args.probe is not None):
        raise UsageError("--exact-trace computes the divergence exactly: drop --hutchinson-samples and --probe")
    return dict(steps=steps, rtol=1e-5 if args.rtol is None else args.rtol,
                atol=1e-5 if args.atol is None else args.atol,
                hutchinson_samples=1 if args.hutchinson_samples is None else args.hutchinson_samples,
                probe=args.probe or "rademacher",
                exact_trace=args.exact_trace, sigma_min=args.sigma_min, sigma_max=args.sigma_max)


def cmd_nll(args):
    _check_out(args.out)
    ode = _nll_ode_options(args)
    pipe = load_model_or_ensemble(args.model, args.ensemble, device=args.device,
                                  ema=None if args.ema == "raw" else args.ema)
    C, H, _ = pipe.image_shape
    data = load_dataset(args.data, args.split, channels=C, image_size=H,
                        class_cond=pipe.num_classes is not None)
    images = first_images(data.images, args.num, args.data, "--num")
    labels = None if data.labels is None else data.labels[:len(images)]
    if args.ode:
        result = evaluate_ode_nll(pipe, images, labels, batch_size=args.batch_size, seed=args.seed,
                                  progress=not args.no_progress, **ode)
    else:
        steps = args.steps
        if steps is not None:
            steps = int(steps) if steps.isdigit() else steps
            if steps == 0:
                raise UsageError("--steps must be positive")
        result = evaluate_nll(pipe, images, labels, steps=steps, batch_size=args.batch_size,
                              seed=args.seed, progress=not args.no_progress)
    which = {"model": os.path.abspath(args.model)} if args.model else {"ensemble": pipe.config["ensemble"]}
    result = {**which, "data": args.data, "split": args.split, "seed": args.seed,
              "steps": args.steps, "method": "ode" if args.ode else "vlb", **result}
    if args.out:   # the whole record (per step, per image) to the file; a summary to stdout
        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    summary = {k: v for k, v in result.items() if k not in ("per_step", "per_image")}
    if isinstance(summary.get("nfe"), dict):
        summary["nfe"] = {k: v for k, v in summary["nfe"].items() if k != "per_batch"}
    _write_json(summary, None)
    bpd = result["bpd"]
    spread = "" if bpd["stderr"] is None else f" ± {bpd['stderr']:.4f}"
    where = f"in {args.out}" if args.out else "kept by --out FILE"
    print(f"nll ({'ODE' if args.ode else 'VLB'}, {result['num']} images): {bpd['mean']:.4f}{spread} "
          f"bits/dim; per-step and per-image values {where}", file=sys.stderr)


# ------------------------------------------------------------------------------------- feature net
def add_train_feature_net_parser(sub):
    p = sub.add_parser("train-feature-net", help="train the small classifier behind fd_NAME / is_NAME",
                       description="Train a small CNN classifier on a labelled dataset; `gaussdiff "
                                   "eval --feature-net DIR` then reports fd_NAME (Fréchet distance "
                                   "in its features) and is_NAME (Inception Score formula on its "
                                   "class probabilities). Not comparable with FID or ImageNet IS.")
    a = p.add_argument
    a("--data", default="fashion-mnist", help="labelled dataset (fashion-mnist, mnist5k, an .npz with arr_1, "
                                              "a folder with one subfolder per class)")
    a("--out", required=True, help="directory to write (config.json + model.safetensors)")
    a("--steps", type=int, default=2000)
    a("--batch-size", type=int, default=128)
    a("--lr", type=float, default=1e-3)
    a("--seed", type=int, default=0)
    a("--name", help="metric suffix (default: from the dataset, e.g. fashion)")
    a("--device")
    a("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_feature_net)


def cmd_train_feature_net(args):
    data = load_dataset(args.data, "train", class_cond=True)
    named = args.data.startswith("fashion-mnist") or (
        os.path.isdir(args.data) and any("idx3-ubyte" in f for f in os.listdir(args.data)))
    held_out = load_dataset(args.data, "test", class_cond=True) if named else None
    net = train_feature_classifier(data, args.steps, args.batch_size, args.lr, args.seed,
                                   name=args.name, device=args.device,
                                   progress=not args.no_progress, eval_data=held_out)
    if held_out is None:   # no test split: say so rather than pass training accuracy off as one
        net.config["train_accuracy"] = accuracy(net, data)
    save_feature_net(net, args.out)
    acc = net.config.get("eval_accuracy", net.config.get("train_accuracy"))
    which = "test" if held_out is not None else "training"
    print(f"wrote {args.out} (name {net.config['name']}; {which} accuracy {acc:.4f})")


def add_metrics_parsers(sub):
    add_eval_parser(sub)
    add_nll_parser(sub)
    add_train_feature_net_parser(sub)
    add_sweep_parser(sub)   # metric against NFE, per sampler

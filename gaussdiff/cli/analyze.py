"""The command line of gaussdiff.analyze: `gaussdiff analyze WHAT --model DIR --out FIG.png`.

Each analysis writes its figure to FIG.png and the numbers behind it to FIG.json (and the
table to FIG.csv); both are written whole or not at all.
"""
from __future__ import annotations

import csv
import io
import json

import numpy as np

from .. import analyze
from ..data import load_dataset
from ..errors import UsageError
from ..images import save_png
from ..metrics.classifier import load_feature_net
from ..metrics.evaluate import evaluate
from ..modeldir import atomic_write_bytes, check_output_file
from .tools import _add_model_arguments, _load, _steps
from ..training.classifier import load_classifier
from ..training.trainer import parse_floats, parse_ints


def _outputs(out: str):
    if not out.endswith(".png"):
        raise UsageError(f"--out {out}: give the figure's path, ending in .png (the numbers go "
                         f"beside it as .json and .csv)")
    stem = out[:-4]
    for path in (out, stem + ".json", stem + ".csv"):
        check_output_file(path, "--out")
    return stem


def _write_numbers(stem: str, result: dict, command: str):
    rows = result.get("rows", [])
    record = {k: v for k, v in result.items() if k not in ("grid", "frames", "decoded", "images")}
    atomic_write_bytes(stem + ".json", (json.dumps(dict(record, command=command), indent=2) + "\n").encode())
    if rows:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(stem + ".csv", buf.getvalue().encode())


def _finish(args, stem: str, result: dict, what: str):
    """Write the grid figure and the numbers of `result`; say what was written."""
    save_png(args.out, result["grid"])
    _write_numbers(stem, result, _command(args))
    print(f"{what}: wrote {args.out}, {stem}.json, {stem}.csv")


def _data(pipe, args):
    C, H, _ = pipe.image_shape
    data = load_dataset(args.data, args.split, channels=C, image_size=H,
                        class_cond=pipe.num_classes is not None)
    if args.num < 1 or args.num > len(data.images):
        raise UsageError(f"--num {args.num}: between 1 and {len(data.images)} ({args.data} {args.split})")
    labels = None if data.labels is None or pipe.num_classes is None else data.labels[:args.num]
    return data, labels


def _add_common(p, data: bool = False, num: int = 8):
    _add_model_arguments(p)
    p.add_argument("--out", required=True, metavar="FIG.png",
                   help="the figure; the numbers are written beside it as .json and .csv")
    p.add_argument("--seed", type=int, default=0)
    if data:
        p.add_argument("--data", default="fashion-mnist",
                       help="images: fashion-mnist, mnist5k, an .npz or an image folder (fashion-mnist)")
        p.add_argument("--split", default="test", help="train or test (test)")
        p.add_argument("--num", type=int, default=num, help=f"images, the first of the split ({num})")


def add_analyze_parser(sub):
    p = sub.add_parser("analyze", help="the seeds' analyses of a model, each a figure plus its numbers")
    what = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    q = what.add_parser("rate-distortion", help="DDPM Table 4 / Fig. 5: progressive lossy compression")
    _add_common(q, data=True, num=100)
    q.add_argument("--steps", help="a respacing of the VLB (default: the model's own T steps)")
    q.add_argument("--batch-size", type=int, default=16)
    q.set_defaults(func=cmd_rate_distortion)

    q = what.add_parser("noise-levels", help="EDM Fig. 1: images noised at several σ and denoised")
    _add_common(q, data=True, num=4)
    q.add_argument("--sigmas", help=f"noise levels σ, comma-separated "
                                    f"({','.join(f'{s:g}' for s in analyze.DEFAULT_SIGMAS)})")
    q.set_defaults(func=cmd_noise_levels)

    q = what.add_parser("progressive", help="DDPM Figs. 6, 10, 14: x̂0 along reverse chains")
    _add_common(q)
    q.add_argument("--num", type=int, default=8, help="reverse chains (8)")
    q.add_argument("--steps", help="a respacing of the ancestral sampler (default: all T steps)")
    q.add_argument("--columns", type=int, default=10, help="recorded steps, the last is the sample (10)")
    q.add_argument("--show", type=int, default=8, help="chains shown in the grid (8)")
    q.add_argument("--ref", help="also the Fréchet distance of x̂0 at each recorded step against "
                                 "these images (fashion-mnist, an .npz, ...; its --ref-split), "
                                 "plotted against the step in FIG.quality.png")
    q.add_argument("--ref-split", default="test")
    q.add_argument("--feature-net", metavar="DIR",
                   help="with --ref: use this feature network (fd) instead of Inception (fid)")
    q.add_argument("--labels", help="class labels, comma-separated, one per chain or one for all")
    q.set_defaults(func=cmd_progressive)

    q = what.add_parser("shared-latents", help="DDPM Fig. 7: one chain split into continuations")
    _add_common(q)
    q.add_argument("--split-at", help="t values, comma-separated (T, 3T/4, T/2, T/4)")
    q.add_argument("--continuations", type=int, default=6, help="continuations per t (6)")
    q.add_argument("--steps", help="a respacing of the ancestral sampler (default: all T steps)")
    q.add_argument("--label", type=int, help="class label (class-conditional models; default 0)")
    q.set_defaults(func=cmd_shared_latents)

    q = what.add_parser("coarse-to-fine", help="DDPM Fig. 9: interpolation after t steps of noise")
    _add_common(q, data=True, num=2)
    q.add_argument("--pair", default="0,1", metavar="I,J", help="which two images of the split (0,1)")
    q.add_argument("--t", dest="ts", help="t values, comma-separated (0, T/10, ..., T)")
    q.add_argument("--frames", type=int, default=9, help="λ from 0 to 1 (9)")
    q.add_argument("--steps", help="a respacing of the ancestral sampler (default: all T steps)")
    q.set_defaults(func=cmd_coarse_to_fine)

    q = what.add_parser("nearest-neighbours", help="DDPM Figs. 12, 15, ADM Fig. 7: nearest training "
                                                   "images of samples, and a memorisation check")
    q.add_argument("samples", metavar="SAMPLES", help="samples: an .npz (gaussdiff sample --out) or an image folder")
    q.add_argument("--out", required=True, metavar="FIG.png",
                   help="the grid; the numbers go beside it as .json and .csv, the histogram as .hist.png")
    q.add_argument("--train", default="fashion-mnist", help="the training images (fashion-mnist)")
    q.add_argument("--train-split", default="train")
    q.add_argument("--train-num", type=int, help="only the first N training images (default all)")
    q.add_argument("--heldout-split", default="test",
                   help="held-out images of the same dataset for the memorisation check (test; "
                        "'none' to skip)")
    q.add_argument("--heldout-num", type=int, default=1000, help="held-out images (1000)")
    q.add_argument("--k", type=int, default=5, help="neighbours per sample (5)")
    q.add_argument("--space", default="pixel", choices=("pixel", "inception"),
                   help="pixel (RMSE on [0, 255]) or inception (pool3 L2; slow on CPU)")
    q.add_argument("--crop", type=float, default=1.0, help="compare the central fraction of each image (1)")
    q.add_argument("--show", type=int, default=8, help="samples shown in the grid (8)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_nearest_neighbours)

    q = what.add_parser("guidance-sweep", help="ADM Fig. 8: a seed per row, the guidance scale along it")
    _add_common(q)
    q.add_argument("--guide", default="cfg", choices=("cfg", "classifier"),
                   help="classifier-free guidance (a --label-dropout model) or classifier guidance")
    q.add_argument("--classifier", metavar="DIR",
                   help="a noisy classifier: guides with --guide classifier; always measures accuracy")
    q.add_argument("--scales", default="0,1,2,4", help="scales, comma-separated (0,1,2,4)")
    q.add_argument("--num", type=int, default=6, help="rows (seeds) (6)")
    q.add_argument("--labels", help="class labels, comma-separated, one per row or one for all "
                                    "(default row i: class i mod K)")
    q.add_argument("--sampler", default="heun", help="any sampler of gaussdiff sample (heun)")
    q.add_argument("--steps", default="35", help="its steps (35)")
    q.set_defaults(func=cmd_guidance_sweep)


def _command(args) -> str:
    return "gaussdiff analyze " + args.analysis + " " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
        if k not in ("func", "command", "analysis", "no_progress") and v is not None)


def _steps_or_none(text):
    return None if text is None else _steps(text)


def cmd_rate_distortion(args):
    stem = _outputs(args.out)
    pipe = _load(args)
    data, labels = _data(pipe, args)
    result = analyze.rate_distortion(pipe, data.images[:args.num], labels, _steps_or_none(args.steps),
                                     args.batch_size, args.seed, not args.no_progress)
    _write_numbers(stem, result, _command(args))
    analyze.plot_rate_distortion(result, args.out)
    last = result["rows"][-1]
    print(f"rate-distortion ({result['num']} images, {result['steps']} steps): total rate "
          f"{last['rate']:.4f} bits/dim (the VLB); wrote {args.out}, {stem}.json, {stem}.csv")


def cmd_noise_levels(args):
    stem = _outputs(args.out)
    pipe = _load(args)
    data, labels = _data(pipe, args)
    sigmas = analyze.DEFAULT_SIGMAS if args.sigmas is None else parse_floats(args.sigmas, "sigmas")
    result = analyze.noise_levels(pipe, data.images[:args.num], sigmas, labels, args.seed)
    _finish(args, stem, result, f"noise-levels ({result['num']} images, {len(sigmas)} σ)")


def cmd_progressive(args):
    stem = _outputs(args.out)
    if args.ref is not None:
        check_output_file(stem + ".quality.png", "--out")
    if args.num < 2:
        raise UsageError("--num must be at least 2")
    pipe = _load(args)
    labels = None if args.labels is None else parse_ints(args.labels, "labels")
    if labels is not None and len(labels) not in (1, args.num):
        raise UsageError(f"--labels: {len(labels)} labels for {args.num} chains")
    reference, net = None, None
    if args.ref is not None:
        reference = load_dataset(args.ref, args.ref_split).images
        if args.feature_net:
            net = load_feature_net(args.feature_net)
    result = analyze.progressive(pipe, args.num, _steps_or_none(args.steps), args.columns, args.seed,
                                 labels, progress=not args.no_progress, show=args.show)
    if reference is not None:
        metric = "fd" if net is not None else "fid"
        for row, frames in zip(result["rows"], result["frames"]):
            if np.ptp(frames) == 0:   # a constant x̂0 (early steps of a clipped model) has no FD
                row[metric] = None
                continue
            m = evaluate(frames, reference, [metric], reference_name=f"{args.ref}-{args.ref_split}",
                         feature_net=net, progress=False)["metrics"]
            row[metric] = next(v for k, v in m.items() if k.startswith(metric))
        result["metric"] = dict(name=metric, ref=args.ref, ref_split=args.ref_split, num=args.num)
        analyze.plot_progressive_quality(result, stem + ".quality.png")
    _finish(args, stem, result, f"progressive ({args.num} chains, {result['steps']} steps)")


def cmd_shared_latents(args):
    stem = _outputs(args.out)
    pipe = _load(args)
    split = None if args.split_at is None else parse_ints(args.split_at, "split-at")
    result = analyze.shared_latents(pipe, split, args.continuations, _steps_or_none(args.steps),
                                    args.seed, args.label, progress=not args.no_progress)
    _finish(args, stem, result, f"shared-latents ({len(result['rows'])} splits x {args.continuations})")


def cmd_coarse_to_fine(args):
    stem = _outputs(args.out)
    pipe = _load(args)
    pair = parse_ints(args.pair, "pair")
    if len(pair) != 2:
        raise UsageError(f"--pair {args.pair}: two indices I,J")
    args.num = max(pair) + 1
    data, labels = _data(pipe, args)
    ts = None if args.ts is None else parse_ints(args.ts, "t")
    result = analyze.coarse_to_fine(pipe, data.images[pair[0]], data.images[pair[1]], ts, args.frames,
                                    _steps_or_none(args.steps),
                                    None if labels is None else [int(labels[pair[0]])], args.seed,
                                    progress=not args.no_progress)
    _finish(args, stem, result, f"coarse-to-fine ({len(result['rows'])} rows x {args.frames} frames)")



def cmd_nearest_neighbours(args):
    stem = _outputs(args.out)
    check_output_file(stem + ".hist.png", "--out")
    samples = load_dataset(args.samples, "train").images
    train = load_dataset(args.train, args.train_split).images
    if args.train_num is not None:
        if args.train_num < 1:
            raise UsageError("--train-num must be positive")
        train = train[:args.train_num]
    heldout = None
    if args.heldout_split != "none":
        if args.heldout_split == args.train_split:
            raise UsageError(f"--heldout-split {args.heldout_split}: the held-out images must not be "
                             f"the training split ({args.train_split})")
        if args.heldout_num < 2:
            raise UsageError(f"--heldout-num {args.heldout_num}: at least 2 (or --heldout-split none)")
        heldout = load_dataset(args.train, args.heldout_split).images[:args.heldout_num]
    result = analyze.nearest_neighbours(samples, train, args.k, args.space, args.crop, heldout,
                                        show=args.show, progress=not args.no_progress)
    save_png(args.out, result.pop("grid"))
    analyze.plot_nn_distances(result, stem + ".hist.png")
    result = {k: v for k, v in result.items() if not k.startswith("_")}
    result["rows"] = [dict(sample=r["sample"], nn=r["nn"][0], distance=r["distance"][0],
                           neighbours=" ".join(map(str, r["nn"]))) for r in result["rows"]]
    _write_numbers(stem, result, _command(args))
    ratio = result.get("median_ratio")
    note = "" if ratio is None else f"; median NN distance of samples / held-out images: {ratio:.3f}"
    print(f"nearest-neighbours ({len(samples)} samples, {len(train)} training images, {args.space}){note}; "
          f"wrote {args.out}, {stem}.hist.png, {stem}.json, {stem}.csv")


def cmd_guidance_sweep(args):
    stem = _outputs(args.out)
    pipe = _load(args)
    classifier = None
    if args.classifier:
        classifier = load_classifier(args.classifier, device=next(pipe.model.parameters()).device)
    labels = None if args.labels is None else parse_ints(args.labels, "labels")
    result = analyze.guidance_sweep(pipe, parse_floats(args.scales, "scales"), args.guide, classifier,
                                    args.num, labels, args.sampler, _steps(args.steps), args.seed,
                                    progress=not args.no_progress)
    _finish(args, stem, result, f"guidance-sweep ({args.guide}, {len(result['rows'])} scales x {args.num} rows)")

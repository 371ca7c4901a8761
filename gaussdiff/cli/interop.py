"""The command line of interoperability: `gaussdiff convert-openai`, `dataset` and
`export-torchscript`."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..interop.openai import CODEBASES, README, convert
from ..data import ImageDataset, NoLabelsError, load_dataset, read_idx
from ..data.edm import write_edm
from ..errors import UsageError
from ..interop.torchscript import export_torchscript


def add_interop_parsers(sub):
    p = sub.add_parser(
        "convert-openai", help="import an improved-diffusion / guided-diffusion checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=README,
        description="Convert a UNetModel, SuperResModel or EncoderUNetModel (noisy classifier)\n"
                    "checkpoint of openai/improved-diffusion or openai/guided-diffusion into a\n"
                    "gaussdiff model directory. The checkpoint is read with\n"
                    "torch.load(weights_only=True): tensors only.")
    p.add_argument("checkpoint", help="the .pt state dict (e.g. 64x64_diffusion.pt)")
    p.add_argument("--flags", required=True,
                   help='e.g. "--image_size 64 --num_channels 192 --learn_sigma True ..."')
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--codebase", default="auto", choices=("auto",) + CODEBASES,
                   help="whose defaults fill the keys not given (auto: told by the flags)")
    p.set_defaults(func=cmd_convert_openai)

    p = sub.add_parser(
        "dataset", help="write a dataset in NVlabs/edm's layout (zip or folder + dataset.json)",
        description="Convert an image folder (labels from subfolder names), an .npz (arr_0, "
                    "arr_1), IDX files, fashion-mnist[:DIR] or mnist5k into EDM's layout: PNGs "
                    "named 00000/img00000000.png and dataset.json labels, in a .zip or a folder.")
    p.add_argument("source", help="image folder, .npz, IDX images file or directory, EDM zip, "
                                  "fashion-mnist[:DIR], mnist5k")
    p.add_argument("--out", required=True, help="DEST.zip or a new folder")
    p.add_argument("--labels", help="IDX labels file, when SOURCE is an IDX images file")
    p.add_argument("--split", default="train", help="train or test (fashion-mnist, IDX directories)")
    p.add_argument("--image-size", type=int, help="centre-crop and resize image folders to this size")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: the data's)")
    p.add_argument("--class-cond", default="auto", choices=("auto", "true", "false"),
                   help="write labels: auto (when the source has them), true, false")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser(
        "export-torchscript", help="write a model's network as a standalone TorchScript file",
        description="Trace the network of a model directory into a TorchScript file that needs "
                    "only torch: torch.jit.load(FILE)(x, t[, y][, low_res]) with t the original "
                    "timestep index; a σ-space model (trained with --objective edm|vp|ve|iddpm) "
                    "becomes its denoiser, preconditioning included: FILE(x, sigma[, y][, low_res]) "
                    "= D(x; σ). The file carries config.json as an extra file.")
    p.add_argument("model", help="model directory (or a classifier directory)")
    p.add_argument("--out", required=True, help="FILE.pt to write")
    p.add_argument("--ema", default="auto", help="which weights: auto, raw, or an EMA rate")
    p.set_defaults(func=cmd_export_torchscript)


def cmd_convert_openai(args):
    convert(args.checkpoint, args.flags, args.out, args.codebase)


def _read_idx_pair(images_path: str, labels_path):
    images = read_idx(images_path)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UsageError(f"{images_path}: expected IDX images [N, H, W] or [N, H, W, 1|3], "
                         f"got shape {list(images.shape)}")
    labels = None
    if labels_path:
        labels = read_idx(labels_path)
        if labels.ndim != 1 or len(labels) != len(images):
            raise UsageError(f"{labels_path}: expected {len(images)} labels, got shape {list(labels.shape)}")
        labels = labels.astype(np.int64)
    return ImageDataset(np.ascontiguousarray(images), labels, None, os.path.basename(images_path))


def load_for_conversion(args):
    """The dataset of `gaussdiff dataset`, labels as --class-cond says."""
    src = args.source
    if os.path.isfile(src) and not src.lower().endswith((".npz", ".zip")):
        ds = _read_idx_pair(src, args.labels)   # an IDX images file (+ --labels)
        if args.class_cond == "true" and ds.labels is None:
            raise UsageError(f"{src}: --class-cond true needs --labels LABELS_IDX_FILE")
        if args.class_cond == "false":
            ds.labels = None
        if args.channels and ds.images.shape[-1] != args.channels:
            raise UsageError(f"{src} has {ds.images.shape[-1]} channels, --channels says {args.channels}")
        if args.image_size and ds.images.shape[1:3] != (args.image_size,) * 2:
            raise UsageError(f"{src} has {ds.images.shape[1]}x{ds.images.shape[2]} images; "
                             f"--image-size resizes image folders only")
        return ds
    if args.labels:
        raise UsageError("--labels applies to an IDX images file given as SOURCE")
    kw = dict(split=args.split, channels=args.channels, image_size=args.image_size,
              skip_bad=args.skip_bad_images)
    if args.class_cond == "false":
        return load_dataset(src, class_cond=False, **kw)
    try:
        ds = load_dataset(src, class_cond=True, **kw)
    except NoLabelsError:
        if args.class_cond == "true":
            raise
        return load_dataset(src, class_cond=False, **kw)
    if args.class_cond == "auto" and ds.class_names == ["."]:   # a flat image folder: no classes
        ds.labels = ds.class_names = None
    return ds


def cmd_dataset(args):
    if os.path.exists(args.out):
        raise UsageError(f"--out {args.out} already exists: choose a new path")
    ds = load_for_conversion(args)
    if getattr(ds, "skipped", 0):
        print(f"--skip-bad-images: skipped {ds.skipped} unreadable images "
              f"(first: {ds.skipped_files[0]})", file=sys.stderr)
    write_edm(ds, args.out)
    n, h, w, c = ds.images.shape
    classes = "unlabelled" if ds.labels is None else f"{int(ds.labels.max()) + 1} classes"
    print(f"wrote {args.out}: {n} images of {h}x{w}x{c}, {classes}")


def cmd_export_torchscript(args):
    export_torchscript(args.model, args.out, None if args.ema == "raw" else args.ema)
    print(f"wrote {args.out}")

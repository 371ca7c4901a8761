"""Invert-then-reconstruct error on real test images (ADM section H): each image is inverted to
a latent (gaussdiff.sampling.editing.invert) and decoded again (editing.reconstruct). Prints
JSON.

    .venv/bin/python bench/reconstruction.py --model models/fashion-small [--num 100]
                                             [--steps 50,100] [--batch-size 64] [--device cpu]

Images: the first --num images of the Fashion-MNIST test split (--data: another dataset), with
their labels for a class-conditional model. Discrete-time models: DDIM inversion without and
with skip_last (ADM: reverse all steps but the last); σ-space models (--objective
edm|vp|ve|iddpm): Euler steps in σ up to σ_max and the Euler sampler back down. Per setting:
mse (mean squared error in [-1, 1] units) and psnr (dB, 8-bit images; over the images not
reconstructed exactly, `exact` counts those), each as the mean and its standard error over the
images, and the seconds of inversion plus reconstruction.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gaussdiff  # noqa: E402
from gaussdiff.sampling import editing as tools  # noqa: E402
from gaussdiff.data import load_dataset  # noqa: E402


def mean_stderr(values):
    v = np.asarray(values, dtype=np.float64)
    return dict(mean=float(v.mean()) if len(v) else None,
                stderr=float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def measure(pipe, images, labels, steps, skip_last, batch_size):
    start = time.perf_counter()
    z = tools.invert(pipe, images, steps, skip_last, labels, batch_size, progress=False)
    recon = tools.reconstruct(pipe, z, steps, labels, batch_size, progress=False)
    seconds = time.perf_counter() - start
    err = tools.reconstruction_error(images, recon)
    finite = np.isfinite(err["psnr"])
    return dict(mse=mean_stderr(err["mse"]), psnr=mean_stderr(err["psnr"][finite]),
                exact=int((~finite).sum()), seconds=round(seconds, 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--num", type=int, default=100, help="test images (100)")
    p.add_argument("--steps", default="50", help="comma-separated step counts (50)")
    p.add_argument("--data", default="fashion-mnist", help="dataset (its test split) (fashion-mnist)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device")
    args = p.parse_args(argv)
    pipe = gaussdiff.load(args.model, device=args.device)
    C, H, _ = pipe.image_shape
    conditional = pipe.num_classes is not None
    ds = load_dataset(args.data, "test", channels=C, image_size=H, class_cond=conditional)
    images = ds.images[:args.num]
    labels = ds.labels[:args.num] if conditional else None
    precond = pipe.config.get("precond")
    settings = [("euler", None)] if precond else [("ddim", False), ("ddim", True)]
    results = []
    for steps in (int(s) for s in args.steps.split(",")):
        for method, skip_last in settings:
            r = measure(pipe, images, labels, steps, skip_last, args.batch_size)
            results.append(dict(steps=steps, method=method, skip_last=skip_last, **r))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)   # progress
    print(json.dumps(dict(model=args.model, objective=precond["type"] if precond else "discrete",
                          data=f"{args.data} test", num=len(images),
                          class_conditional=labels is not None, results=results), indent=2))


if __name__ == "__main__":
    main()

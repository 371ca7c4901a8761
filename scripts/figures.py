"""The README's figures of guided sampling, interpolation and the two-stage cascade.

    .venv/bin/python scripts/figures.py [--out docs] [--only NAME,...]

Each figure is drawn with gaussdiff's public API from the bundled models; every grid has one
row per Fashion-MNIST class (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
Sneaker, Bag, Ankle boot) and the same seeds in every panel, so panels differ only by the
guidance. Printed: what each figure is and how long it took.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import gaussdiff
from gaussdiff.training.classifier import load_classifier
from gaussdiff.sampling.guidance import Guidance
from gaussdiff.images import make_grid, save_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
PER_CLASS, CLASSES = 8, 10


def side_by_side(*grids: np.ndarray, gap: int = 8) -> np.ndarray:
    h = max(g.shape[0] for g in grids)
    parts = []
    for i, g in enumerate(grids):
        parts.append(np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255))
        if i < len(grids) - 1:
            parts.append(np.full((h, gap, g.shape[2]), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def class_rows(pipe, sampler, steps, guidance=None, seed=0):
    """PER_CLASS images of each class, row by row (image i of every panel from seed (seed, i))."""
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    images, _ = pipe.sample(len(labels), sampler, steps, seed=seed, labels=labels.tolist(),
                            guidance=guidance, progress=False)
    return make_grid(images, ncols=PER_CLASS, scale=2)


def guided_classifier(out):
    """The unconditional bundled model steered by the noisy classifier (ADM Algorithm 1)."""
    pipe = gaussdiff.load(os.path.join(MODELS, "fashion-small"))
    cls = load_classifier(os.path.join(MODELS, "fashion-classifier"))
    panels = [class_rows(pipe, "ddpm", 100, Guidance(classifier=cls, classifier_scale=s))
              for s in (1.0, 4.0)]
    save_png(os.path.join(out, "guided-classifier.png"), side_by_side(*panels))
    return "models/fashion-small + models/fashion-classifier, DDPM 100 steps: scale 1 | scale 4"


def guided_cfg(out):
    """The class-conditional EDM model with classifier-free guidance."""
    pipe = gaussdiff.load(os.path.join(MODELS, "fashion-cond-edm"))
    panels = [class_rows(pipe, "heun", 18, Guidance(cfg_scale=w)) for w in (1.0, 3.0)]
    save_png(os.path.join(out, "guided-cfg.png"), side_by_side(*panels))
    return "models/fashion-cond-edm, Heun 35 NFE: w = 1 (conditional) | w = 3"


def cascade(out):
    """14x14 base model, then the 14 -> 28 upsampler, with the same labels."""
    from gaussdiff.sampling.editing import cascade as run
    base = gaussdiff.load(os.path.join(MODELS, "fashion-base14"))
    up = gaussdiff.load(os.path.join(MODELS, "fashion-up28"))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS).tolist()
    high, low, _ = run(base, up, len(labels), "ddpm", 100, seed=0, labels=labels, progress=False)
    low_up = low.repeat(2, 1).repeat(2, 2)   # nearest 2x, to show them at the same size
    save_png(os.path.join(out, "cascade.png"),
             side_by_side(make_grid(low_up, ncols=PER_CLASS, scale=2),
                          make_grid(high, ncols=PER_CLASS, scale=2)))
    return "models/fashion-base14 (14x14) | + models/fashion-up28 (28x28), DDPM 100 steps each"


FIGURES = {"guided-classifier": guided_classifier, "guided-cfg": guided_cfg, "cascade": cascade}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs"))
    p.add_argument("--only", help=f"comma-separated, from {','.join(FIGURES)}")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(FIGURES)
    for name in names:
        if name not in FIGURES:
            sys.exit(f"--only: unknown figure {name!r}: choose from {', '.join(FIGURES)}")
    for name in names:
        start = time.perf_counter()
        what = FIGURES[name](args.out)
        print(f"{name}.png: {what} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

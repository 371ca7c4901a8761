"""Classifier-guided DDIM with and without clamping the guided x̂0, as JSON.

    python bench/guided_ddim.py [--model models/fashion-small] [--classifier models/fashion-classifier]

For each (clip mode, scale): 40 images, labels 0..9 in turn, seed 0, DDIM with --steps steps;
"accuracy" is the classifier's own argmax at t = 0 against the asked label (a fooled classifier
also counts, so look at the grids too: --grids DIR writes one PNG per row), "saturated" the
fraction of pixels >= 250, "brightness" the mean pixel value in [0, 1].
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import gaussdiff
from gaussdiff.training.classifier import load_classifier
from gaussdiff.sampling.guidance import Guidance
from gaussdiff.images import save_grid
import saturation   # bench/saturation.py: the share of pixels >= 250 and the brightness


def run(model, classifier, steps="50", num=40, rows=(("adm", 1.0), ("guided", 0.0), ("guided", 1.0),
                                                     ("guided", 4.0)), grids=None):
    pipe = gaussdiff.load(model, device="cpu")
    clf = load_classifier(classifier, device="cpu")
    labels = [i % clf.num_classes for i in range(num)]
    out = []
    for mode, scale in rows:
        g = Guidance(classifier=clf, classifier_scale=scale, clip_guided=mode == "guided")
        images, _ = pipe.sample(num, sampler="ddim", steps=steps, seed=0, labels=labels,
                                guidance=g, progress=False)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            t0 = torch.zeros(num, dtype=torch.long)
            lp = torch.stack([clf.log_prob(x, t0, torch.full((num,), c)) for c in range(clf.num_classes)], 1)
        out.append({"clip": mode, "scale": scale, "steps": steps,
                    "accuracy": float((lp.argmax(1).numpy() == np.array(labels)).mean()),
                    **saturation.figures(images)})
        if grids:
            save_grid(os.path.join(grids, f"ddim-{mode}-{scale:g}.png"), images, ncols=10)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/fashion-small")
    p.add_argument("--classifier", default="models/fashion-classifier")
    p.add_argument("--steps", default="50")
    p.add_argument("--grids", help="directory for one PNG grid per row")
    args = p.parse_args(argv)
    json.dump(run(args.model, args.classifier, args.steps, grids=args.grids), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

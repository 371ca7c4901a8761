"""Issue 11's acceptance check for blown-out samples, as JSON: per model and sampler, the share
of pixels >= 250 and the mean brightness (pixel/255) of `--num` samples (seed 0), next to the
same figures for the Fashion-MNIST test set. The criterion: at most 3x the data's share of
saturated pixels and a brightness within 0.05 of the data's.

    python bench/saturation.py models/fashion-small wip/run/checkpoints/step0002000@raw \
        --samplers heun:18,dpmpp_2m:20 --num 64

MODEL@EMA picks the weights (auto, the default, raw or a rate such as 0.999). heun:18 is
35 network evaluations (2N - 1), dpmpp_2m:20 is 20.
"""
import argparse
import json

import numpy as np

import gaussdiff
from gaussdiff.data import load_dataset


def figures(images: np.ndarray) -> dict:
    u = images.astype(np.float64)
    return {"saturated": float((u >= 250).mean()), "brightness": float((u / 255).mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--samplers", default="heun:18,dpmpp_2m:20", help="SAMPLER:STEPS, comma-separated")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = figures(load_dataset("fashion-mnist", "test").images)
    rows = []
    for spec in args.models:
        path, _, ema = spec.partition("@")
        pipe = gaussdiff.load(path, device="cpu", ema=None if ema == "raw" else (ema or "auto"))
        for item in args.samplers.split(","):
            sampler, steps = item.split(":")
            stats = {}
            images, _ = pipe.sample(args.num, sampler, int(steps), seed=args.seed, progress=False,
                                    stats=stats)
            f = figures(images)
            rows.append({"model": spec, "sampler": sampler, "steps": int(steps), "nfe": stats["nfe"], **f,
                         "passes": f["saturated"] <= 3 * data["saturated"]
                         and abs(f["brightness"] - data["brightness"]) <= 0.05})
    print(json.dumps({"data": {"split": "fashion-mnist test", **data}, "num": args.num, "seed": args.seed,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

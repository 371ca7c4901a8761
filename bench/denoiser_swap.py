"""Where on the noise axis does a model's probability-flow ODE go wrong? Sample with Heun using
model A's denoiser above σ_c and model B's below, and report the over-saturation, as JSON.

    python bench/denoiser_swap.py --low models/fashion-small --high models/fashion-cond-edm

B (--low) alone is σ_c = inf, A (--high) alone σ_c = 0. A class-conditional A trained with
label dropout runs unconditionally with its null label. 64 images of seed 0 (per-image noise
as `gaussdiff sample`), Heun with 18 steps (35 NFE) on the Karras levels of B, x̂0 clipped.
"""
import argparse
import json
import sys

import torch

import gaussdiff
from gaussdiff.sampling.denoisers import ClipDenoised, pipeline_denoiser
from gaussdiff.modeldir import seed_for
from gaussdiff.rng import per_sample_generators
from gaussdiff.sampling.samplers import heun


def unconditional(pipe):
    D = pipeline_denoiser(pipe)
    if pipe.num_classes is None:
        return D
    null = pipe.num_classes   # the label-dropout null label
    return lambda x, s: D(x, s, y=torch.full((len(x),), null, dtype=torch.long))


@torch.no_grad()
def swap(low: str, high: str, cuts=(float("inf"), 20.0, 5.0, 1.0, 0.0), num=64, steps=18):
    lo, hi = gaussdiff.load(low, device="cpu"), gaussdiff.load(high, device="cpu")
    D_lo, D_hi = unconditional(lo), unconditional(hi)
    sigmas = lo.sigma_steps(steps)
    gens = per_sample_generators([seed_for(0, i) for i in range(num)])
    noise = torch.stack([torch.randn(lo.image_shape, generator=g) for g in gens]).double()
    rows = []
    for cut in cuts:
        def D(x, s):
            return D_hi(x, s) if float(s[0]) > cut else D_lo(x, s)
        x = heun(ClipDenoised(D), noise * float(sigmas[0]), sigmas).clamp(-1, 1)
        u = ((x + 1) * 127.5).round()
        rows.append({"sigma_c": cut if cut != float("inf") else "inf", "saturated": float((u >= 250).double().mean()),
                     "brightness": float(u.mean() / 255)})
    return {"low": low, "high": high, "num": num, "nfe": 2 * steps - 1, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--low", default="models/fashion-small")
    p.add_argument("--high", default="models/fashion-cond-edm")
    args = p.parse_args(argv)
    json.dump(swap(args.low, args.high), sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()

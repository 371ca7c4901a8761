"""Per-noise-level error of a model's denoiser D(x; σ) on held-out data, as JSON.

For the ideal denoiser D*(x; σ) = E[x_0 | x_σ] two identities hold whatever the data:
  (1) E[D*(x_σ)] = E[x_0]                       (the tower rule)  -> "mean_bias" = 0
  (2) E[(x_0 − D*)·D*] = 0                      (orthogonality)   -> "overshoot" = E|D|²/E[D·x_0] = 1
An under-fitted regressor shrinks towards the mean (overshoot < 1); a network whose x̂_0 error
grows with σ, as an ε-prediction network's does (x̂_0 = x − σ·ε̂), carries noise into D
(overshoot > 1), which the probability-flow ODE integrates into over-saturated images. "mse" is
E|D − x_0|² per pixel (in [-1, 1] units); the data variance bounds the ideal one.

    python bench/denoiser_error.py models/fashion-small [MODEL ...] --num 256

MODEL@EMA picks the weights (auto, the default, raw or a rate such as 0.999).
"""
import argparse
import json
import sys

import torch

import gaussdiff
from gaussdiff.data import load_dataset, to_model_range
from gaussdiff.sampling.denoisers import pipeline_denoiser

SIGMAS = (80, 40, 20, 10, 5, 2, 1, 0.5, 0.2, 0.05)


@torch.no_grad()
def denoiser_error(path: str, num: int = 256, seed: int = 0, data: str = "fashion-mnist",
                   sigmas=SIGMAS, batch_size: int = 128) -> dict:
    spec = path
    path, _, ema = path.partition("@")
    pipe = gaussdiff.load(path, device="cpu", ema=None if ema == "raw" else (ema or "auto"))
    D = pipeline_denoiser(pipe)
    C, H, _ = pipe.image_shape
    ds = load_dataset(data, "test", C, H, pipe.num_classes is not None)
    x0 = to_model_range(torch.from_numpy(ds.images[:num])).double()
    y = None if pipe.num_classes is None else torch.from_numpy(ds.labels[:num]).long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = []
    for s in sigmas:
        d = torch.cat([D(x0[i:i + batch_size] + s * noise[i:i + batch_size],
                         torch.full((len(x0[i:i + batch_size]),), float(s), dtype=torch.float64),
                         **({} if y is None else {"y": y[i:i + batch_size]})).double()
                       for i in range(0, num, batch_size)])
        rows.append({"sigma": s, "mean_bias": float(d.mean() - x0.mean()),
                     "overshoot": float((d * d).sum() / (d * x0).sum()),
                     "mse": float(((d - x0) ** 2).mean())})
    return {"model": spec, "num": num, "seed": seed, "data_variance": float(x0.var()), "levels": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="fashion-mnist")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = [denoiser_error(m, args.num, args.seed, args.data) for m in args.models]
    json.dump(out if len(out) > 1 else out[0], sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

"""ε-prediction error E|ε̂(x_t, t) − ε|² by timestep on test images, as JSON: is a model
under-trained (its EMA included) or is something wrong with its conditioning?

    python bench/eps_error.py models/fashion-small models/fashion-up28 RUN/checkpoints/stepN@raw

MODEL@EMA picks the weights (auto, raw or a rate). An upsampler (task "upsample") is given the
test images area-downsampled to its low_res, and also zeros instead ("eps_mse_zero_low_res");
a class-conditional model the test labels. 128 images, noise of seed 0.
"""
import json
import sys

import torch

import gaussdiff
from gaussdiff.data import load_dataset, to_model_range

TIMESTEPS = (50, 300, 600, 900, 990)


@torch.no_grad()
def eps_error(spec: str, num: int = 128):
    path, _, ema = spec.partition("@")
    pipe = gaussdiff.load(path, device="cpu", ema=None if ema == "raw" else (ema or "auto"))
    C, H, _ = pipe.image_shape
    ds = load_dataset("fashion-mnist", "test", C, H, True)
    x0 = to_model_range(torch.from_numpy(ds.images[:num]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    kw = {} if pipe.num_classes is None else {"y": torch.from_numpy(ds.labels[:num]).long()}
    task = pipe.config.get("task") or {}
    out = {"model": spec, "t": list(TIMESTEPS), "eps_mse": []}
    if task.get("type") == "upsample":
        low = torch.nn.functional.interpolate(x0, size=task["low_res"], mode="area")
        out["eps_mse_zero_low_res"] = []
    for tt in TIMESTEPS:
        t = torch.full((num,), tt)
        x_t = pipe.diffusion.q_sample(x0, t, noise)
        if task.get("type") == "upsample":
            e = pipe.model(x_t, t, low_res=low, **kw)[:, :C]
            z = pipe.model(x_t, t, low_res=torch.zeros_like(low), **kw)[:, :C]
            out["eps_mse_zero_low_res"].append(float(((z - noise) ** 2).mean()))
        else:
            e = pipe.model(x_t, t, **kw)[:, :C]
        out["eps_mse"].append(float(((e - noise) ** 2).mean()))
    return out


if __name__ == "__main__":
    json.dump([eps_error(s) for s in sys.argv[1:]], sys.stdout, indent=1)
    print()

"""The optimizer step and the EMA update alone, per implementation, as JSON (ratios in one run).

    python bench/optimizer.py [--configs fashion-small,ddpm-cifar10] [--rounds 7]

For each network (built from a preset, gradients filled with noise): AdamW with PyTorch's
per-tensor loop (foreach=False), its foreach kernels (the default before), and the fused kernel
gaussdiff uses now (`train.make_adamw`); the EMA update as a per-tensor mul_/add_ loop (before)
and as one _foreach_lerp_ (`train.EMA`). Rounds are interleaved and the median is reported, with
the load average, since other processes move absolute times.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from gaussdiff.nn.unet import UNetModel
from gaussdiff.training.presets import get_preset
from gaussdiff.training.trainer import EMA, make_adamw, unet_config


def network(preset: str) -> torch.nn.Module:
    o = get_preset(preset)
    o.setdefault("num_classes", None)
    o.update(norm_groups=32, num_heads_upsample=-1, resblock_updown=o.get("resblock_updown", False))
    out = o["channels"] * (2 if o["var_type"].startswith("learned") else 1)
    return UNetModel(unet_config(o, out))


def loop_ema_update(shadows, model, r):
    """The EMA update as it was: one mul_ and one add_ per tensor."""
    for k, v in model.state_dict().items():
        shadows[k].mul_(r).add_(v.detach().float(), alpha=1 - r)


def bench(preset: str, rounds: int) -> dict:
    model = network(preset)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opts = {"adamw_loop": torch.optim.AdamW(params, lr=1e-4, foreach=False),
            "adamw_foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True),
            "adamw_fused": make_adamw(params, 1e-4, 0.0)}
    ema = EMA(model, [0.9999])
    shadows = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    cases = {**{k: (lambda o=o: o.step()) for k, o in opts.items()},
             "ema_loop": lambda: loop_ema_update(shadows, model, 0.9999),
             "ema_foreach_lerp": lambda: ema.update(model)}
    for fn in cases.values():   # warm-up (optimizer state allocation)
        fn()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"config": preset, "parameters": sum(p.numel() for p in params),
            "tensors": len(params), "median_ms": ms,
            "speedup": {"adamw_fused_vs_loop": ms["adamw_loop"] / ms["adamw_fused"],
                        "adamw_fused_vs_foreach": ms["adamw_foreach"] / ms["adamw_fused"],
                        "ema_lerp_vs_loop": ms["ema_loop"] / ms["ema_foreach_lerp"]}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="fashion-small,ddpm-cifar10")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    results = [bench(c, args.rounds) for c in args.configs.split(",")]
    json.dump({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "load_average_before": load_before,
               "load_average_after": os.getloadavg()[0], "results": results}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

"""Throughput of the bundled model's configuration: training images/s and sampling images/s per
network evaluation, NCHW and channels_last side by side. Prints JSON.

    .venv/bin/python bench/throughput.py [--model models/fashion-small] [--batch 64] [--repeats 5]

Benchmark on an idle machine: timings swing several-fold when another process loads the cores.
Each figure is the best of --repeats timed runs after a warm-up.
"""
import argparse
import json
import os
import platform
import time

import torch

import gaussdiff
from gaussdiff.modeldir import build_model, read_config


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "models", "fashion-small"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = read_config(args.model)
    C, S = cfg["data"]["channels"], cfg["data"]["image_size"]
    diffusion = gaussdiff.make_diffusion(**cfg["diffusion"])
    results = {"model": os.path.basename(os.path.normpath(args.model)), "batch": args.batch,
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine()}
    for fmt in ("nchw", "channels_last"):
        torch.manual_seed(0)
        model = build_model(cfg)
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=mf)
        x = torch.randn(args.batch, C, S, S).to(memory_format=mf)
        t = torch.randint(0, diffusion.num_timesteps, (args.batch,))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            loss = diffusion.training_losses(model, x, t)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def forward():
            with torch.inference_mode():
                model(x, t)

        model.train()
        tt = best_time(train_step, args.repeats)
        model.eval()
        tf = best_time(forward, args.repeats)
        results[fmt] = {"train_images_per_s": args.batch / tt,
                        "sample_images_per_s_per_nfe": args.batch / tf,
                        "train_step_s": tt, "forward_s": tf}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

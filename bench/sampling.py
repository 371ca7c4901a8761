"""Sampling throughput: images/s per sampler at a fixed number of network evaluations (NFE),
next to the cost of one network evaluation, so the sampler's own overhead shows. Prints JSON.

    .venv/bin/python bench/sampling.py [--model models/fashion-small | --config iddpm-cifar10]
                                       [--nfe 20] [--num 64] [--batch 64] [--repeats 2]
                                       [--samplers ddim,ddpm,euler,heun,dpmpp_2m,euler_ancestral]

Per sampler: the steps that give --nfe evaluations (heun: 2N - 1 = NFE rounded down to odd),
the NFE it used, the best time of --repeats runs, images/s, and `overhead_fraction`: the share
of the time not spent in the network (1 - NFE x batches x one evaluation / total). Also: one
network evaluation under torch.no_grad vs torch.inference_mode, and what `--batch-size auto`
picks (images/s of one evaluation per probed batch size).

Benchmark on an idle machine: timings swing several-fold when another process loads the cores.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gaussdiff  # noqa: E402
from gaussdiff.modeldir import Pipeline, make_config  # noqa: E402
from gaussdiff.nn.unet import UNetModel  # noqa: E402
from gaussdiff.training.batch_size import autotune_batch_size, forward_seconds  # noqa: E402

SAMPLERS = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m", "euler_ancestral")
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "fashion-small")


def random_pipeline(config_name):
    """A Pipeline with random weights for a throughput.py configuration (no training needed)."""
    from throughput import CONFIGS
    from gaussdiff.diffusion import make_diffusion
    from gaussdiff.training.presets import get_preset
    from gaussdiff.training.trainer import DEFAULTS, diffusion_config, unet_config
    opts = dict(DEFAULTS, **get_preset(CONFIGS[config_name]))
    dcfg = diffusion_config(opts)
    diffusion = make_diffusion(**dcfg)
    cfg = unet_config(opts, opts["channels"] * (2 if diffusion.learns_variance else 1))
    torch.manual_seed(0)
    model = UNetModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    config = make_config(cfg, dcfg, dict(dataset=config_name, image_size=opts["image_size"],
                                         channels=opts["channels"], class_names=None))
    return Pipeline(model.eval(), diffusion, config, config_name)


def steps_for(sampler, nfe):
    return (nfe + 1) // 2 if sampler in ("heun", "heun_vp") else nfe


def forward_mode_seconds(pipe, batch, mode, repeats):
    from gaussdiff.training.batch_size import _probe_input
    x, t, kwargs = _probe_input(pipe, batch, torch.device("cpu"))
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    best = float("inf")
    with ctx():
        pipe.model(x, t, **kwargs)
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe.model(x, t, **kwargs)
            best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model directory")
    ap.add_argument("--config", help="instead of --model: random weights of a throughput.py "
                                     "configuration (fashion-small, iddpm-cifar10)")
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = random_pipeline(args.config) if args.config else gaussdiff.load(args.model, device="cpu")
    batch = min(args.batch, args.num)
    eval_s = forward_seconds(pipe, batch, repeats=args.repeats)
    out = {"model": args.config or os.path.basename(os.path.normpath(args.model)),
           "num": args.num, "batch": batch, "nfe_target": args.nfe, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_average_at_start": os.getloadavg(),
           "network_eval": {"seconds": eval_s, "images_per_s": batch / eval_s,
                            "no_grad_s": forward_mode_seconds(pipe, batch, "no_grad", args.repeats),
                            "inference_mode_s": forward_mode_seconds(pipe, batch, "inference_mode", args.repeats)},
           "samplers": {}}
    batches = -(-args.num // batch)
    from throughput import OtherLoad
    load = OtherLoad().__enter__()
    for name in args.samplers.split(","):
        steps = steps_for(name, args.nfe)
        best, stats = float("inf"), {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe.sample(args.num, name, steps, seed=0, batch_size=batch, progress=False, stats=stats)
            best = min(best, time.perf_counter() - t0)
        network = stats["nfe"] * batches * eval_s
        out["samplers"][name] = {"steps": steps, "nfe": stats["nfe"], "seconds": best,
                                 "images_per_s": args.num / best,
                                 "overhead_fraction": max(0.0, 1 - network / best)}
    load.__exit__()
    out["other_processes_cpu_fraction"] = load.fraction   # near 0: the machine was idle
    rates = {}
    out["batch_size_auto"] = {"chosen": autotune_batch_size(pipe, args.num, report=rates),
                              "images_per_s_per_eval": rates}
    out["load_average_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""gaussdiff's UNet against the networks users would otherwise pick, side by side, as JSON.

    pip install diffusers; pip install --no-deps guided-diffusion-sdk==1.0.0   (bench extra)
    python bench/peers.py [--configs fashion-small,ddpm-cifar10,iddpm-cifar10-hybrid]
                          [--batch 64] [--rounds 5] [--threads N]

Per config: guided-diffusion's `UNetModel` (PyPI guided-diffusion-sdk, openai/guided-diffusion)
built with the same arguments and gaussdiff's weights loaded into it (the module names are
guided-diffusion's), outputs compared; for DDPM's CIFAR-10 network also diffusers'
`UNet2DModel` with that architecture (its own weights: the parameter count is checked, the
function is not the same). Timed: one forward pass (no_grad) and one training step (forward,
MSE to noise, backward, AdamW step) per model, each with its defaults (fp32, NCHW) and, for
gaussdiff, also its training defaults (fused AdamW) and `--precision auto` / channels_last where
they apply. Rounds are interleaved (every model sees the same machine state), the best of the
rounds is kept, and the load average before and after is recorded.
"""
import argparse
import json
import os
import sys
import time

import torch

from gaussdiff.training.precision import autocast, cpu_description, native_bf16
from gaussdiff.nn.unet import UNetModel
from gaussdiff.training.presets import get_preset
from gaussdiff.training.trainer import make_adamw, unet_config


def gaussdiff_unet(preset):
    o = get_preset(preset)
    o.update(num_classes=None, norm_groups=32, num_heads_upsample=-1)
    out = o["channels"] * (2 if o["var_type"].startswith("learned") else 1)
    return UNetModel(unet_config(o, out)), o, out


def guided_unet(o, out):
    from guided_diffusion.unet import UNetModel as GD
    size = o["image_size"]
    attn = tuple(size // int(r) for r in str(o["attention_resolutions"]).split(",") if r)
    return GD(image_size=size, in_channels=o["channels"], model_channels=o["model_channels"],
              out_channels=out, num_res_blocks=o["num_res_blocks"], attention_resolutions=attn,
              dropout=o["dropout"], channel_mult=tuple(int(c) for c in o["channel_mult"].split(",")),
              num_heads=o["num_heads"], num_head_channels=o["num_head_channels"],
              use_scale_shift_norm=o["use_scale_shift_norm"], resblock_updown=o["resblock_updown"])


def diffusers_ddpm_cifar10():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


class Case:
    def __init__(self, name, model, x, t, fused=False, precision="fp32", channels_last=False,
                 call=None):
        self.name, self.model, self.x, self.t = name, model, x, t
        self.precision = precision
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.x = x.contiguous(memory_format=torch.channels_last)
        params = list(model.parameters())
        self.opt = make_adamw(params, 1e-4, 0.0) if fused else torch.optim.AdamW(params, lr=1e-4)
        self.call = call or (lambda m, x, t: m(x, t))
        self.noise = torch.randn_like(x)

    def forward(self):
        self.model.eval()
        with torch.no_grad(), autocast(self.precision, torch.device("cpu")):
            self.call(self.model, self.x, self.t)

    def train_step(self):
        self.model.train()
        with autocast(self.precision, torch.device("cpu")):
            out = self.call(self.model, self.x, self.t)
        loss = ((out.float()[:, :self.x.shape[1]] - self.noise) ** 2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(preset, batch, rounds):
    ours, o, out = gaussdiff_unet(preset)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():   # no zero-initialised output layers: a real comparison
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    theirs = guided_unet(o, out)
    theirs.load_state_dict(ours.state_dict())
    size, C = o["image_size"], o["channels"]
    x = torch.randn(batch, C, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        a, b = ours.eval()(x, t), theirs.eval()(x, t)
    result = {"config": preset, "batch": batch,
              "parameters": {"gaussdiff": sum(p.numel() for p in ours.parameters()),
                             "guided_diffusion": sum(p.numel() for p in theirs.parameters())},
              "output_max_abs_difference_vs_guided_diffusion": float((a - b).abs().max()),
              "output_scale": float(a.abs().max())}
    clone = lambda: gaussdiff_unet(preset)[0].requires_grad_(True)   # noqa: E731
    cases = [Case("guided_diffusion (defaults)", theirs, x, t),
             Case("gaussdiff (fp32 NCHW, torch AdamW)", ours, x, t),
             Case("gaussdiff (training defaults: fused AdamW)", clone(), x, t, fused=True)]
    if native_bf16(torch.device("cpu")):
        cases.append(Case("gaussdiff (--precision auto = bf16)", clone(), x, t, fused=True,
                          precision="bf16"))
    if C == 3:
        cases.append(Case("gaussdiff (fused AdamW, channels_last)", clone(), x, t, fused=True,
                          channels_last=True))
        if native_bf16(torch.device("cpu")):
            cases.append(Case("gaussdiff (bf16, channels_last)", clone(), x, t, fused=True,
                              precision="bf16", channels_last=True))
    if preset == "ddpm-cifar10":
        d = diffusers_ddpm_cifar10()
        result["parameters"]["diffusers"] = sum(p.numel() for p in d.parameters())
        cases.append(Case("diffusers UNet2DModel (defaults)", d, x, t,
                          call=lambda m, x, t: m(x, t).sample))
    for c in cases:   # warm-up
        c.forward()
        c.train_step()
    best = {c.name: {"forward_s": float("inf"), "train_step_s": float("inf")} for c in cases}
    for _ in range(rounds):
        for c in cases:
            best[c.name]["forward_s"] = min(best[c.name]["forward_s"], timed(c.forward))
            best[c.name]["train_step_s"] = min(best[c.name]["train_step_s"], timed(c.train_step))
    ref = best["guided_diffusion (defaults)"]
    for name, r in best.items():
        r["forward_images_per_s"] = batch / r["forward_s"]
        r["train_images_per_s"] = batch / r["train_step_s"]
        r["forward_speedup_vs_guided_diffusion"] = ref["forward_s"] / r["forward_s"]
        r["train_speedup_vs_guided_diffusion"] = ref["train_step_s"] / r["train_step_s"]
    result["timings"] = best
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="fashion-small,ddpm-cifar10,iddpm-cifar10-hybrid")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    results = [bench(c, args.batch, args.rounds) for c in args.configs.split(",")]
    json.dump({"cpu": cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "native_bf16": native_bf16(torch.device("cpu")), "load_average_before": load,
               "load_average_after": os.getloadavg()[0], "results": results}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

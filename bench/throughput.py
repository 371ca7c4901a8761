"""Throughput of gaussdiff's UNet next to a plain reference UNet, in one process and one run, so
every speed-up is a ratio of numbers taken side by side. Prints JSON.

    .venv/bin/python bench/throughput.py [--batch 64] [--repeats 5] [--configs fashion-small,iddpm-cifar10]
                                         [--variants gaussdiff,channels_last,reference] [--compile] [--profile]

Per configuration and variant: forward-only images/s (eval mode, no_grad: one network
evaluation of sampling) and training-step images/s (forward, backward and AdamW step on the
configuration's own loss); GFLOP/s achieved and their fraction of the measured fp32 matmul
peak; peak resident memory of a training step. FLOPs are counted by
torch.utils.flop_counter.FlopCounterMode on the plain reference (every matmul explicit); the
gaussdiff network's count (with its fused CPU attention kernel registered) is reported as a
check that both do the same work.

Variants: "gaussdiff" (gaussdiff.nn.unet: SDPA attention, NCHW), "channels_last" (the same
network and input in NHWC memory format), "reference" (bench/reference_unet.py: NCHW,
softmax(QK^T)V by hand, no fusion), "bf16" (gaussdiff under bfloat16 autocast, as
`train --precision bf16 --force-precision`), "fused_norm" (every ResBlock's GroupNorm, AdaGN
and SiLU as one kernel compiled by torch.compile; compile time included in nothing, the first
call excluded as a warm-up), "grad_checkpoint" (as `train --grad-checkpoint`: less memory, more
compute) -- these three are not in the default list -- and with --compile
"compile" (torch.compile of the gaussdiff network; compile time and break-even reported).

Configurations: fashion-small (the bundled Fashion-MNIST model: 28x28x1, 32 channels, 1,2,2,
1 block, attention at 14 and 7) and iddpm-cifar10 (Improved DDPM's CIFAR-10 network: 32x32x3,
128 channels, 1,2,2,2, 3 blocks, attention at 16 and 8 with 4 heads, L_hybrid).

Benchmark on an idle machine: timings swing several-fold when another process loads the cores;
"other_processes_cpu_fraction" (the share of the cores' time other processes used while the
timings ran) says whether it was idle. Variants run round-robin, `--repeats` rounds after a warm-up, and each figure is the best round.
"""
import argparse
import ctypes
import gc
import json
import os
import sys
import time

import torch
from torch.utils import flop_counter as fc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_unet import ReferenceUNet  # noqa: E402

from gaussdiff.training.precision import Autocast, cpu_description  # noqa: E402
from gaussdiff.diffusion import make_diffusion  # noqa: E402
from gaussdiff.nn.unet import UNetModel  # noqa: E402
from gaussdiff.training.presets import get_preset  # noqa: E402
from gaussdiff.training.trainer import DEFAULTS, diffusion_config, unet_config  # noqa: E402

CONFIGS = {"fashion-small": "fashion-small", "iddpm-cifar10": "iddpm-cifar10-hybrid"}
aten = torch.ops.aten


# FlopCounterMode has no formula for the CPU flash-attention kernel behind
# scaled_dot_product_attention: register the generic SDPA ones so gaussdiff's work is counted.
@fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs):
    return fc.sdpa_flop_count(query, key, value)


@fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return fc.sdpa_backward_flop_count(grad_out, query, key, value)


# ------------------------------------------------------------------------ machine
def conv1x1_peak_gflops(n=4096, repeats=5, dtype=torch.float32):
    """Best throughput of a product through oneDNN: a 1x1 convolution of an [1, n, 1, n] input
    with n output channels (2n^3 FLOPs), GFLOP/s. On AMD CPUs MKL's torch.mm runs an AVX2
    kernel while oneDNN (which the UNet's convolutions use) does not, so this peak can be
    higher than torch.mm's; the larger of the two is the honest denominator."""
    x = torch.randn(1, n, 1, n).to(dtype)
    w = torch.randn(n, n, 1, 1).to(dtype)
    with torch.no_grad():
        torch.nn.functional.conv2d(x, w)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.nn.functional.conv2d(x, w)
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def matmul_peak_gflops(n=2048, repeats=10, dtype=torch.float32):
    """Best throughput of an n x n matrix product (2n^3 FLOPs), GFLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class OtherLoad:
    """CPU time used by OTHER processes while a block runs, as a fraction of all cores' time:
    near 0 when the machine was idle apart from this benchmark (Linux /proc/stat)."""

    @staticmethod
    def _busy_seconds():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # all but idle, iowait

    def __enter__(self):
        r = os.times()
        self.t0, self.own0, self.busy0 = time.perf_counter(), r.user + r.system, self._busy_seconds()
        return self

    def __exit__(self, *exc):
        r = os.times()
        wall = time.perf_counter() - self.t0
        others = (self._busy_seconds() - self.busy0) - (r.user + r.system - self.own0)
        self.fraction = max(0.0, others / (wall * os.cpu_count()))


def reset_peak_rss():
    """Reset the kernel's resident-set high-water mark (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field="VmHWM"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------ GroupNorm+SiLU fusion
def fuse_norm_silu(model):
    """Run every ResBlock's GroupNorm -> (AdaGN) -> SiLU as one fused kernel (torch.compile of
    just that function; PyTorch has no eager fused GroupNorm+SiLU). Returns the model."""
    import types
    import torch.nn.functional as F
    import torch._dynamo
    from gaussdiff.nn.unet import ResBlock
    torch._dynamo.config.cache_size_limit = 64   # one graph per activation shape

    @torch.compile(dynamic=False)
    def gn_silu(x, w, b, groups: int, eps: float):
        return F.silu(F.group_norm(x, groups, w, b, eps))

    @torch.compile(dynamic=False)
    def adagn_silu(x, w, b, groups: int, eps: float, scale, shift):
        return F.silu(F.group_norm(x, groups, w, b, eps) * (1 + scale) + shift)

    def forward(self, x, emb):   # ResBlock.forward (without up/down-sampling), fused
        n = self.in_layers[0]
        h = self.in_layers[2](gn_silu(x, n.weight, n.bias, n.num_groups, n.eps))
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        n = self.out_layers[0]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = adagn_silu(h, n.weight, n.bias, n.num_groups, n.eps, scale, shift)
        else:
            h = gn_silu(h + emb_out, n.weight, n.bias, n.num_groups, n.eps)
        return self.skip_connection(x) + self.out_layers[3](self.out_layers[2](h))

    for m in model.modules():
        if isinstance(m, ResBlock) and not m.updown:
            m.forward = types.MethodType(forward, m)
    return model


# ------------------------------------------------------------------------ one configuration
class Case:
    """A network variant with its fixed inputs, optimizer and the two timed functions."""

    def __init__(self, name, model, cfg, diffusion, batch, channels_last=False, compile=False,
                 precision="fp32"):
        c = cfg
        self.name, self.model, self.diffusion = name, model, diffusion
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
        self.noise = torch.randn(self.x.shape, generator=g)
        self.t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
            self.noise = self.noise.contiguous(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if compile else self.model
        if precision != "fp32":   # autocast, fp32 weights: what `train --precision` does
            self.net = Autocast(self.net, precision, torch.device("cpu"))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.first_call_s = {}

    def forward(self):
        self.model.eval()
        with torch.no_grad():
            self.net(self.x, self.t)

    def train_step(self):
        self.model.train()
        loss = self.diffusion.training_losses(self.net, self.x, self.t, self.noise)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def count_flops(fn):
    with fc.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_config(name, args, peak):
    opts = dict(DEFAULTS, **get_preset(CONFIGS[name]))
    diffusion = make_diffusion(**diffusion_config(opts))
    out_ch = opts["channels"] * (2 if diffusion.learns_variance else 1)
    cfg = unet_config(opts, out_ch)
    torch.manual_seed(0)
    base = UNetModel(cfg)
    for p in base.parameters():   # no zero-initialised layers: realistic values everywhere
        torch.nn.init.normal_(p, std=0.02)
    state = base.state_dict()

    def build(variant):
        if variant == "reference":
            m = ReferenceUNet(cfg)
        else:
            m = UNetModel(cfg)
        m.load_state_dict(state)
        if variant == "fused_norm":
            fuse_norm_silu(m)
        if variant == "grad_checkpoint":
            m.set_grad_checkpointing(True)
        return Case(variant, m, cfg, diffusion, args.batch, channels_last=variant == "channels_last",
                    compile=variant == "compile", precision="bf16" if variant == "bf16" else "fp32")

    variants = [v for v in args.variants.split(",") if v] + (["compile"] if args.compile else [])
    result = {"image_size": cfg.image_size, "channels": cfg.in_channels,
              "model_channels": cfg.model_channels, "channel_mult": list(cfg.channel_mult),
              "num_res_blocks": cfg.num_res_blocks, "attention_resolutions": list(cfg.attention_resolutions),
              "num_heads": cfg.num_heads, "params_M": sum(p.numel() for p in base.parameters()) / 1e6,
              "variants": {}}

    # the two networks compute the same function: compared on the same weights, BEFORE the
    # FLOP-counting pass below (its train_step applies an AdamW step to the reference)
    ref, gd = build("reference"), build("gaussdiff")
    with torch.no_grad():
        ref.model.eval(), gd.model.eval()
        out_ref, out_gd = ref.model(ref.x, ref.t), gd.model(gd.x, gd.t)
        result["output_difference_vs_reference"] = float(
            (out_ref - out_gd).abs().max() / out_ref.abs().max())
    ref.model.train(), gd.model.train()
    # FLOPs of one forward pass and one training step, counted on the plain reference
    # (FlopCounterMode counts the convolutions' zero padding too: ~7% of their FLOPs here)
    flops_fwd = count_flops(ref.forward) / args.batch
    flops_train = count_flops(ref.train_step) / args.batch
    result["flops_per_image"] = {"forward_G": flops_fwd / 1e9, "train_step_G": flops_train / 1e9,
                                 "gaussdiff_forward_G_counted": count_flops(gd.forward) / args.batch / 1e9}
    del ref, gd
    _trim()

    cases = {}
    for v in variants:   # memory first, one variant at a time, then warm-up (and compilation)
        _trim()
        before = rss_mb("VmRSS")
        reset_peak_rss()
        case = build(v)
        case.first_call_s["train"] = timed(case.train_step)
        case.first_call_s["forward"] = timed(case.forward)
        result["variants"][v] = {"peak_rss_mb": rss_mb("VmHWM"), "rss_before_mb": before}
        cases[v] = case
    best = {v: {"forward": float("inf"), "train": float("inf")} for v in variants}
    with OtherLoad() as load:
        for _ in range(args.repeats):   # round-robin: every variant sees the same machine state
            for v, case in cases.items():
                best[v]["forward"] = min(best[v]["forward"], timed(case.forward))
                best[v]["train"] = min(best[v]["train"], timed(case.train_step))
    result["other_processes_cpu_fraction"] = load.fraction
    for v in variants:
        tf, tt = best[v]["forward"], best[v]["train"]
        r = result["variants"][v]
        r.update(forward_images_per_s=args.batch / tf, train_images_per_s=args.batch / tt,
                 forward_s=tf, train_step_s=tt,
                 forward_gflops=flops_fwd * args.batch / tf / 1e9,
                 train_gflops=flops_train * args.batch / tt / 1e9)
        r["forward_fraction_of_peak"] = r["forward_gflops"] / peak
        r["train_fraction_of_peak"] = r["train_gflops"] / peak
        if v == "compile":
            eager = best.get("gaussdiff")
            # first calls compile (the training graph, then the eval-mode forward graph)
            r["compile_seconds"] = compile_s = sum(cases[v].first_call_s.values()) - tt - tf
            if eager and eager["train"] > tt:
                r["break_even_train_steps"] = compile_s / (eager["train"] - tt)
            else:
                r["break_even_train_steps"] = None   # never: not faster than eager
    if "reference" in variants:
        ref_r = result["variants"]["reference"]
        result["speedup_vs_reference"] = {
            v: {"forward": result["variants"][v]["forward_images_per_s"] / ref_r["forward_images_per_s"],
                "train": result["variants"][v]["train_images_per_s"] / ref_r["train_images_per_s"]}
            for v in variants if v != "reference"}
    if args.profile:
        result["profile_train_step"] = profile(cases.get("gaussdiff") or next(iter(cases.values())))
    return result


def profile(case, top=15):
    """Where a gaussdiff training step spends its time: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            case.train_step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 2e3,
             "fraction": e.self_cpu_time_total / total, "calls_per_step": e.count // 2}
            for e in events[:top]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default="fashion-small,iddpm-cifar10",
                    help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--variants", default="gaussdiff,channels_last,reference",
                    help="comma-separated, of gaussdiff, channels_last, reference, bf16, "
                         "fused_norm, grad_checkpoint")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile variant (slow to start)")
    ap.add_argument("--profile", action="store_true", help="add a per-op profile of the training step")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    for c in args.configs.split(","):
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}: choose from {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    mm_peak = matmul_peak_gflops(4096, 5)
    conv_peak = conv1x1_peak_gflops()
    peak = max(mm_peak, conv_peak)   # so that "fraction of peak" stays <= 1
    results = {"batch": args.batch, "repeats": args.repeats, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu": cpu_description(), "cores": os.cpu_count(),
               "load_average_at_start": os.getloadavg(),
               "matmul_peak_gflops": mm_peak, "onednn_conv1x1_peak_gflops": conv_peak,
               "peak_gflops_used": peak,
               # why --precision fp16/bf16 falls back to fp32 on a CPU (small n: fp16 can be slow)
               "matmul_gflops_512": {str(dt).split(".")[1]: matmul_peak_gflops(512, 3, dt)
                                     for dt in (torch.float32, torch.bfloat16, torch.float16)},
               "configs": {}}
    for c in args.configs.split(","):
        results["configs"][c] = bench_config(c, args, peak)
    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

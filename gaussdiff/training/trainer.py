"""Training: `gaussdiff train`. One loop for every objective (gaussdiff.diffusion.objectives).

A run directory holds config.json, model.safetensors, ema_<rate>.safetensors, state.safetensors
+ state.json (optimizer, step, RNG and data-order state, so --resume continues bit for bit),
log.jsonl (metrics) and samples/ (grids); with --tensorboard, event files of both.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data import BatchSampler, ImageDataset, is_image_folder, load_dataset, to_model_range
from ..data.augment import AUGMENT_DIM, AugmentPipe
from ..diffusion.objectives import DiscreteObjective, Objective, SigmaObjective
from ..diffusion.process import make_diffusion
from ..diffusion.timesteps import make_schedule_sampler
from ..distributed import DistInfo, all_gather_cat, barrier, current, rank_seed, shard
from ..errors import UsageError
from ..images import make_grid, save_grid
from ..modeldir import (CONFIG_NAME, DIFFUSION_OPTIONAL, TASKS, WEIGHTS_NAME, build_model,
                        default_device, diffusion_section, ema_name, load_state_into, load_tensors,
                        make_config, read_config)
from ..nn.unet import UNetConfig
from ..sampling.pipeline import Pipeline
from ..validate import check_train_options
from .checkpoint import (check_finite, holds_run, refresh_top_level, select_checkpoint, trim_log,
                         write_checkpoint)
from .evaluation import TrainingEval
from .guard import BadStepGuard, all_finite
from .precision import Autocast, make_scaler, resolve_precision
from .tensorboard import TensorBoardLog, check_tensorboard, tensorboard_dir

# Defaults where neither a preset nor a flag says otherwise (DDPM/Improved DDPM values where
# the papers give one; a small network so that a bare `gaussdiff train` runs on a CPU).
DEFAULTS = dict(
    data="fashion-mnist", image_size=None, channels=None, class_cond=False, model_channels=32,
    channel_mult="1,2,2", num_res_blocks=1, attention_resolutions="14", num_heads=1,
    num_head_channels=-1, num_heads_upsample=-1, dropout=0.0, use_scale_shift_norm=True,
    resblock_updown=False, norm_groups=32, schedule="linear", diffusion_steps=1000,
    mean_type="eps", var_type="fixed_small", loss="mse", hybrid_lambda=0.001,
    vb_stop_grad=True, batch_size=64, lr=1e-4, weight_decay=0.0, warmup=0, lr_anneal_steps=0,
    grad_clip=0.0,
    ema="0.9999", ema_warmup=False, steps=1000, save_every=1000, sample_every=1000, log_every=50, seed=0,
    flip=False, sample_steps=50, sample_num=64, skip_bad_images=False,
    objective="ddpm", precond=None, sigma_data=0.5, p_mean=-1.2, p_std=1.2, p2_gamma=0.0, p2_k=1.0,
    min_snr_gamma=0.0, augment=0.0,
    schedule_sampler="uniform",
    # conditioning (gaussdiff.sampling.guidance): label dropout for classifier-free guidance, and
    # the upsampling stage of a cascade
    label_dropout=0.0, task="generate", low_res=None,
    # performance and memory (precision.py, gaussdiff.distributed); none changes the result
    # beyond float rounding, and with these defaults a step is the plain fp32 one
    precision="fp32", force_precision=False, microbatch=0, grad_checkpoint=False,
    channels_last=False, compile=False,
    # crash safety (checkpoint.py, guard.py): checkpoint directories kept (0: all),
    # consecutive non-finite steps (skipped) before training stops (0: never)
    keep=3, max_bad_steps=20,
    # sample quality during training (evaluation.py): every N steps (0: off), M samples;
    # sampler None: heun:18 (σ-space) or ddim:50; metric None: fd with a feature net, else fid
    eval_every=0, eval_samples=256, eval_sampler=None, eval_metric=None, eval_feature_net=None,
    # TensorBoard event files (tensorboard.py): True for OUT/tensorboard, or a directory
    tensorboard=None)


def parse_floats(text, what: str) -> List[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{what}: expected comma-separated numbers, got {text!r}") from None


def parse_ints(text, what: str) -> List[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{what}: expected comma-separated integers, got {text!r}") from None


def unet_config(o: dict, out_channels: int) -> UNetConfig:
    return UNetConfig(
        image_size=o["image_size"], in_channels=o["channels"], model_channels=o["model_channels"],
        out_channels=out_channels, num_res_blocks=o["num_res_blocks"],
        attention_resolutions=tuple(parse_ints(o["attention_resolutions"], "attention-resolutions")),
        channel_mult=tuple(parse_ints(o["channel_mult"], "channel-mult")), dropout=o["dropout"],
        num_classes=o.get("num_classes"), num_heads=o["num_heads"],
        num_head_channels=o["num_head_channels"], num_heads_upsample=o["num_heads_upsample"],
        use_scale_shift_norm=o["use_scale_shift_norm"], resblock_updown=o["resblock_updown"],
        norm_groups=o["norm_groups"], augment_dim=AUGMENT_DIM if o.get("augment") else 0,
        null_class=bool(o.get("label_dropout")))


def check_conditioning(o: dict):
    """--label-dropout, --task and --low-res, once the data's image size is known."""
    p = o.get("label_dropout") or 0.0
    if not 0 <= p < 1:
        raise UsageError(f"--label-dropout is a probability in [0, 1), got {p}")
    if p and not o["class_cond"]:
        raise UsageError("--label-dropout drops class labels: it needs --class-cond true")
    task, low_res = o.get("task") or "generate", o.get("low_res")
    if task not in TASKS:
        raise UsageError(f"unknown --task {task!r}: choose one of {', '.join(TASKS)}")
    if task == "upsample" and not (low_res and 0 < low_res < o["image_size"]):
        raise UsageError(f"--task upsample needs --low-res, a size below the image size "
                         f"{o['image_size']}, got {low_res}")
    if task != "upsample" and low_res:
        raise UsageError("--low-res applies to --task upsample")


def diffusion_config(o: dict) -> dict:
    return dict(schedule=o["schedule"], steps=o["diffusion_steps"], mean_type=o["mean_type"],
                var_type=o["var_type"], loss_type=o["loss"], hybrid_lambda=o["hybrid_lambda"],
                vb_stop_grad=o["vb_stop_grad"], p2_gamma=o.get("p2_gamma", 0.0),
                p2_k=o.get("p2_k", 1.0), min_snr_gamma=o.get("min_snr_gamma", 0.0))


def make_objective(o: dict) -> Objective:
    """The training objective of the options: --objective ddpm (the discrete process of
    --schedule, --mean-type, --var-type, --loss, ...) or a σ-space one (edm, vp, ve, iddpm)."""
    name = o.get("objective", "ddpm")
    if name == "ddpm":
        if o.get("precond"):
            raise UsageError(f"--precond {o['precond']} applies to the σ-space objectives (edm, vp, "
                             f"ve, iddpm), not --objective ddpm")
        section = diffusion_section(diffusion_config(o))
        diffusion = make_diffusion(**section)
        return DiscreteObjective(diffusion, make_schedule_sampler(o["schedule_sampler"],
                                                                  diffusion.num_timesteps), section)
    if o.get("p2_gamma") or o.get("min_snr_gamma") or o.get("schedule_sampler", "uniform") != "uniform":
        raise UsageError(f"--p2-gamma, --min-snr-gamma and --schedule-sampler apply to "
                         f"--objective ddpm; --objective {name} has its own λ(σ) and σ distribution")
    return SigmaObjective(name, o["sigma_data"], o["p_mean"], o["p_std"], o.get("precond"))


def make_adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel (one pass over all parameters: 5x faster than the
    per-tensor loop for 35.7M parameters, bench/optimizer.py), the foreach one where a build
    has no fused kernel. Same algorithm and state dict, so checkpoints resume either way."""
    params = list(params)   # a generator would be spent by the first attempt
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class EMA:
    """Exponential moving averages of the parameters at several rates (fp32 shadows).

    After n updates at rate r the average still holds r^n of the initial (random) weights:
    22% for r = 0.999 after 1,500 steps, 86% for r = 0.9999. warmup=True uses the rate
    min(r, (1 + n)/(10 + n)) at update n (TensorFlow's ExponentialMovingAverage with
    num_updates), so that a short run's average is of trained weights; off by default, as in
    DDPM and ADM."""

    def __init__(self, model: torch.nn.Module, rates: List[float], warmup: bool = False):
        self.rates, self.warmup = rates, bool(warmup)
        self.shadows = {r: {k: v.detach().clone().float() for k, v in model.state_dict().items()}
                        for r in rates}

    def rate_at(self, r: float, n: int) -> float:
        """The rate of update n (0-based)."""
        return min(r, (1 + n) / (10 + n)) if self.warmup else r

    @torch.no_grad()
    def update(self, model, n: int = 0):
        """One update with the model's current weights; n: how many came before (warm-up)."""
        state = model.state_dict()
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        values = [state[k].detach() for k in floats]
        for rate, shadow in self.shadows.items():
            r = self.rate_at(rate, n)
            targets = [shadow[k] for k in floats]   # fp32 shadows (half-precision weights cast up)
            # shadow + (1 − r)·(v − shadow) = r·shadow + (1 − r)·v, one fused pass
            torch._foreach_lerp_(targets, [v.to(t.dtype) for v, t in zip(values, targets)], 1 - r)
            for k, v in state.items():
                if not v.dtype.is_floating_point:
                    shadow[k].copy_(v)


class Trainer:
    """Builds data, network, diffusion and optimizer from merged options and runs the loop."""
    LOG_KEYS = ("loss", "mse", "vb")   # per-sample values of a step, averaged in log.jsonl
    QUARTER_KEYS = ("loss",)          # also logged by quarter of the process, as <key>_q0..3

    def __init__(self, opts: dict, out_dir: str, resume: bool = False, device=None, progress=True,
                 dist: Optional[DistInfo] = None):
        self.o, self.out_dir, self.progress = opts, out_dir, progress
        self.device = torch.device(device) if device else default_device()
        self.dist = dist or current()   # torchrun: this process's rank; else a single process
        o = opts
        check_train_options(o)
        if o["steps"] < 1 or o["batch_size"] < 1:
            raise UsageError("--steps and --batch-size must be positive")
        if o["batch_size"] % self.dist.world_size:
            raise UsageError(f"--batch-size {o['batch_size']} is the global batch: it must be a "
                             f"multiple of the number of processes ({self.dist.world_size})")
        if o.get("microbatch", 0) < 0:
            raise UsageError(f"--microbatch must be positive (0: off), got {o['microbatch']}")
        self.precision = resolve_precision(o.get("precision", "fp32"), self.device,
                                           o.get("force_precision", False))
        self.scaler = make_scaler(self.precision)   # fp16: ADM's dynamic loss scaling
        self.guard = BadStepGuard(o.get("max_bad_steps", 20))   # skips non-finite steps
        if o["lr"] <= 0:
            raise UsageError(f"--lr must be positive, got {o['lr']}")
        anneal = o.get("lr_anneal_steps", 0)
        if anneal < 0 or 0 < anneal < o["steps"]:
            raise UsageError(f"--lr-anneal-steps must be 0 (off) or at least --steps ({o['steps']}): "
                             f"the learning rate is 0 from step {anneal} on, got {anneal}")
        self.ema_rates = parse_floats(o["ema"], "ema")
        if any(not 0 < r < 1 for r in self.ema_rates):
            raise UsageError(f"--ema rates must lie in (0, 1), got {o['ema']}")
        self.data: ImageDataset = load_dataset(o["data"], "train", o["channels"], o["image_size"],
                                               o["class_cond"], o["skip_bad_images"])
        if getattr(self.data, "skipped", 0):
            print(f"--skip-bad-images: skipped {self.data.skipped} unreadable images "
                  f"(first: {self.data.skipped_files[0]})", file=sys.stderr)
        n, h, w, c = self.data.images.shape   # said once set-up has succeeded (end of __init__)
        data_note = None   # an image folder's channel count is the data's: say which it took
        if not o["channels"] and is_image_folder(o["data"]):
            data_note = (f"data {o['data']}: {n} images of {h}x{w}, {c} channel"
                         f"{'s' if c > 1 else ''} (from the images; --channels sets it)")
        o["image_size"] = o["image_size"] or self.data.images.shape[1]
        o["channels"] = o["channels"] or self.data.images.shape[3]
        o["num_classes"] = self.data.num_classes if o["class_cond"] else None
        check_conditioning(o)
        self.objective = self.make_objective(o)
        sigma_space = self.objective.num_timesteps is None   # EDM eqs. 7-8, precond.py
        if not 0 <= o.get("augment", 0) <= 1:
            raise UsageError(f"--augment is a probability in [0, 1], got {o['augment']}")
        self.augment_pipe = AugmentPipe(o["augment"]) if o.get("augment") else None
        # checks the --eval-* options before any write
        self.evaluator = TrainingEval(o, self.objective.num_timesteps, sigma_space, self.device,
                                      self.dist.world_size)
        self.model_config = self.network_config(o, self.objective.output_channels(o["channels"]))
        unused = self.objective.unused_options   # e.g. no --mean-type in an EDM model's record
        self.config = make_config(self.model_config, None, dict(
            dataset=self.data.name, image_size=o["image_size"], channels=o["channels"],
            class_names=self.data.class_names if o["class_cond"] else None),
            training={k: v for k, v in o.items() if k not in unused} | {"sample_ema": self.ema_rates[0]},
            sections=self.objective.sections())
        self.config.update(self.config_extras(o))

        torch.manual_seed(o["seed"])
        self.model = self.build_network().to(self.device)
        if o.get("channels_last"):
            self.model.to(memory_format=torch.channels_last)
        if o.get("grad_checkpoint"):
            self.model.set_grad_checkpointing(True)
        self.train_module = self.objective.network(self.model)   # σ-space: D(x; σ) around it
        self.opt = make_adamw(self.model.parameters(), o["lr"], o["weight_decay"])
        self.ema = EMA(self.model, self.ema_rates, o.get("ema_warmup", False))
        self.sampler = BatchSampler(len(self.data), o["batch_size"], o["seed"])
        self.gen = torch.Generator().manual_seed(o["seed"] + 1)  # timesteps, noise, flips
        self.images = torch.from_numpy(self.data.images)         # uint8 NHWC, in memory
        self.labels = None if self.data.labels is None else torch.from_numpy(self.data.labels)
        self.step = 0
        os.makedirs(out_dir, exist_ok=True)
        if resume:
            self.load_checkpoint(resume)
        elif holds_run(out_dir):
            raise UsageError(f"{out_dir} already holds a training run: pass --resume to continue it "
                             f"or choose another --out")
        elif self.dist.is_main:   # a run that crashed before its first checkpoint: a fresh log
            trim_log(os.path.join(out_dir, "log.jsonl"), 0)
        self.build_forward()
        self.tb_dir = tensorboard_dir(o.get("tensorboard"), out_dir) if self.dist.is_main else None
        if self.tb_dir:
            check_tensorboard(self.tb_dir)
        self.tb: Optional[TensorBoardLog] = None   # opened by run()
        if data_note and self.dist.is_main and not resume:
            print(data_note, file=sys.stderr)

    def make_objective(self, o: dict) -> Objective:
        """The objective a step minimises (gaussdiff.diffusion.objectives)."""
        return make_objective(o)

    def network_config(self, o: dict, out_channels: int):
        """The network's config.json "model" section, as a dataclass."""
        return unet_config(o, out_channels)

    def config_extras(self, o: dict) -> dict:
        """Top-level config.json sections beyond model/diffusion/data/training: "task" for the
        upsampling stage of a cascade (load() rebuilds a SuperResModel from it)."""
        if o.get("task") == "upsample":
            return {"task": {"type": "upsample", "low_res": int(o["low_res"])}}
        return {}

    def build_network(self) -> torch.nn.Module:
        """A fresh network for self.config (UNetModel, SuperResModel or a classifier)."""
        return build_model(self.config)

    def build_forward(self):
        """self.train_net: the network (σ-space: the denoiser) as a training step calls it,
        wrapped in DistributedDataParallel (torchrun), torch.compile and autocast as asked."""
        net = self.train_module
        self.ddp = None
        if self.dist.enabled:
            self.ddp = net = DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.o.get("compile"):
            net = torch.compile(net)
        if self.precision != "fp32":
            net = Autocast(net, self.precision, self.device)
        self.train_net = net

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self):
        """checkpoints/stepNNNNNNN/ (atomic, with a checksummed manifest), then the run
        directory's top-level files; all but the newest --keep checkpoints are deleted."""
        weights = {WEIGHTS_NAME: self.model.state_dict(),
                   **{ema_name(r): shadow for r, shadow in self.ema.shadows.items()}}
        check_finite(self.step, weights)   # a non-finite model is never written
        opt_state = self.opt.state_dict()
        tensors = {"rng.torch": torch.get_rng_state(), "rng.gen": self.gen.get_state()}
        tensors.update(self.sampler.state_tensors())
        tensors.update(self.objective.state_tensors())
        tensors.update(self.scaler.state_tensors())
        for pid, s in opt_state["state"].items():
            for k, v in s.items():
                tensors[f"opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        write_checkpoint(self.out_dir, self.step, {
            **weights, "state.safetensors": tensors, CONFIG_NAME: self.config,
            "state.json": {"step": self.step, "bad_steps": self.guard.total}},
            keep=self.o.get("keep", 0))

    def load_checkpoint(self, spec="auto"):
        """Restore the newest checkpoint that verifies (spec "auto"), or the one named."""
        d = select_checkpoint(self.out_dir, spec)
        state_path = os.path.join(d, "state.json")
        saved = read_config(d)
        # sections as this version writes them (keys added since default to their old meaning)
        saved["model"] = type(self.model_config).from_dict(saved["model"]).to_dict()
        if "diffusion" in saved and "diffusion" in self.config:   # the keys this version writes
            full = {**DIFFUSION_OPTIONAL, **saved["diffusion"]}
            saved["diffusion"] = {k: full.get(k) for k in self.config["diffusion"]}
        for key in ("model", "diffusion", "precond", "objective", "task", "kind"):
            if saved.get(key) != self.config.get(key):
                raise UsageError(f"--resume: the options given differ from {d}/config.json in its "
                                 f"{key!r} section; resume with the same options")
        with open(state_path) as f:
            state_json = json.load(f)
        self.step, self.guard.total = int(state_json["step"]), int(state_json.get("bad_steps", 0))
        if self.dist.is_main:   # the log's records of the lost steps: they are about to be redone
            trim_log(os.path.join(self.out_dir, "log.jsonl"), self.step)
            refresh_top_level(self.out_dir, d)
        load_state_into(self.model, os.path.join(d, WEIGHTS_NAME))
        for r in self.ema_rates:
            shadow = load_tensors(os.path.join(d, ema_name(r)))
            self.ema.shadows[r] = {k: v.to(self.device).float() for k, v in shadow.items()}
        s = load_tensors(os.path.join(d, "state.safetensors"))
        opt_state = self.opt.state_dict()
        per_param: Dict[int, dict] = {}
        for k, v in s.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                per_param.setdefault(int(pid), {})[name] = v.to(self.device) if name != "step" else v
        opt_state["state"] = per_param
        self.opt.load_state_dict(opt_state)
        torch.set_rng_state(s["rng.torch"])
        self.gen.set_state(s["rng.gen"])
        if "rng.cuda" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["rng.cuda"], self.device)
        self.sampler.load_state_tensors(s)
        self.objective.load_state_tensors(s)
        self.scaler.load_state_tensors(s)

    # ---------------------------------------------------------------- one step
    def next_batch(self):
        idx = self.sampler.next_indices()
        x = to_model_range(self.images[idx])
        if self.o["flip"]:
            flip = torch.rand(len(idx), generator=self.gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        kwargs = {}
        if self.labels is not None:
            y = self.labels[idx]
            if self.o.get("label_dropout"):   # the null label num_classes (classifier-free guidance)
                drop = torch.rand(len(idx), generator=self.gen) < self.o["label_dropout"]
                y = torch.where(drop, torch.full_like(y, self.o["num_classes"]), y)
            kwargs["y"] = y.to(self.device)
        if self.augment_pipe is not None:   # EDM's non-leaky augmentation, labels to the network
            x, augment_labels = self.augment_pipe(x, self.gen)
            kwargs["augment_labels"] = augment_labels.to(self.device)
        if self.o.get("task") == "upsample":
            kwargs["low_res"] = self.low_res_of(x).to(self.device)
        return x.to(self.device), kwargs

    def low_res_of(self, x: torch.Tensor) -> torch.Tensor:
        """The upsampler's condition: x [B, C, H, W] area-downsampled to --low-res
        (guided-diffusion's load_superres_data)."""
        return torch.nn.functional.interpolate(x, size=self.o["low_res"], mode="area")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimisation step `step` (0-based): linear warm-up over --warmup
        steps, then, with --lr-anneal-steps N, improved-diffusion's linear decay
        lr·(1 − step/N), which reaches 0 at step N."""
        warm, anneal = self.o["warmup"], self.o.get("lr_anneal_steps", 0)
        lr = self.o["lr"] * min(1.0, (step + 1) / warm) if warm > 0 else self.o["lr"]
        return lr * max(0.0, 1 - step / anneal) if anneal > 0 else lr

    def microbatches(self, rows: slice) -> List[slice]:
        """The rows of the global batch this process runs, in chunks of --microbatch."""
        m = self.o.get("microbatch") or 0
        if m <= 0 or m >= rows.stop - rows.start:
            return [rows]
        return [slice(s, min(s + m, rows.stop)) for s in range(rows.start, rows.stop, m)]

    def train_step(self) -> dict:
        """One optimisation step on the global batch. Returns its per-sample losses [B]
        (and "t" [B] for the discrete objective), gathered from every process."""
        self.model.train()
        if self.dist.enabled:   # dropout masks: a function of (seed, step, rank)
            torch.manual_seed(rank_seed(self.o["seed"], self.step, self.dist.rank))
        x0, kwargs = self.next_batch()
        # The random numbers are drawn for all B rows of the global batch from self.gen, in the
        # order of the plain loop; a process (torchrun) or a microbatch then takes its rows. So
        # row i gets the same data, t (or σ) and noise whatever the number of processes or chunks.
        draw = self.objective.draw(x0, self.gen)
        rows = shard(x0.shape[0], self.dist)
        chunks = self.microbatches(rows)
        self.opt.zero_grad(set_to_none=True)
        parts = []
        for i, sl in enumerate(chunks):
            kw = {k: v[sl] for k, v in kwargs.items()}
            last = i == len(chunks) - 1   # DDP averages the gradients once, after the last chunk
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                per_sample, losses = self.objective.losses(self.train_net, x0[sl], draw.rows(sl), kw)
                # the mean over this process's rows, accumulated chunk by chunk
                loss = per_sample.mean() if len(chunks) == 1 else per_sample.sum() / (rows.stop - rows.start)
                self.scaler.scale_loss(loss).backward()
            parts.append({k: v.detach() for k, v in losses.items()})
        losses = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.dist.enabled:
            losses = {k: all_gather_cat(v, self.dist) for k, v in losses.items()}
        if bool(torch.isfinite(losses["loss"]).all()):   # no NaN in importance sampling's history
            self.objective.observe(draw, losses["loss"])
        finite = self.scaler.unscale_(self.model.parameters())   # fp16: False on overflow
        finite = finite and all_finite(losses["loss"], self.model.parameters())   # NaN/inf guard
        grad_norm = None
        if finite:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if self.o["grad_clip"] > 0:   # the norm before clipping
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.o["grad_clip"])
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads)
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            self.opt.step()
            self.ema.update(self.model, self.step)
        # an fp16 overflow while the loss scale can still drop does not count towards the stop
        recoverable = self.scaler.scale > getattr(self.scaler, "min_scale", float("inf"))
        self.scaler.update(finite)   # fp16: halve the scale and skip the step on overflow
        self.guard.update(finite, self.step + 1, recoverable)   # stops after --max-bad-steps
        self.step += 1
        quarters = self.objective.quarters(draw)
        return (losses | ({"quarter": quarters} if quarters is not None else {})
                | ({"grad_norm": grad_norm.detach()} if grad_norm is not None else {}))

    # ---------------------------------------------------------------- the loop
    def ema_pipeline(self):
        """A Pipeline of a copy of the network with the first EMA weights (σ-space: with its
        denoiser), leaving the training network and RNG streams untouched."""
        with torch.random.fork_rng(devices=[]):   # keep the training RNG stream untouched
            ema_model = self.build_network().to(self.device)
        ema_model.load_state_dict(self.ema.shadows[self.ema_rates[0]])
        if self.objective.num_timesteps is None:
            return Pipeline(ema_model, None, self.config, self.out_dir,
                            self.objective.network(ema_model).eval())
        return Pipeline(ema_model, self.objective.diffusion, self.config, self.out_dir)

    def write_samples(self):
        """samples/stepNNNNNNN.png: --sample-num images of the first EMA from seed 0 (the classes
        in turn for a class-conditional model) by DDIM with --sample-steps steps, or for a
        σ-space model by EDM's Heun sampler with that many steps (Pipeline.sample, as
        `gaussdiff sample` draws them)."""
        pipe, n = self.ema_pipeline(), self.o["sample_num"]
        low_res = None   # upsampler: the first training images, downsampled
        if self.o.get("task") == "upsample":
            low_res = self.low_res_of(to_model_range(self.images[:n])).to(self.device)
        labels = [i % self.o["num_classes"] for i in range(n)] if self.o.get("num_classes") else None
        images, _ = pipe.sample(n, "heun" if pipe.denoiser is not None else "ddim",
                                self.o["sample_steps"], seed=0, labels=labels, progress=False,
                                low_res=low_res)
        os.makedirs(os.path.join(self.out_dir, "samples"), exist_ok=True)
        save_grid(os.path.join(self.out_dir, "samples", f"step{self.step:07d}.png"), images)
        if self.tb is not None:
            self.tb.image(make_grid(images), self.step)

    def run(self):
        if self.tb_dir:   # a resumed run: the events of steps after its checkpoint are dropped
            self.tb = TensorBoardLog(self.tb_dir, resumed_at=self.step)
        try:
            self.loop()
        finally:
            if self.tb is not None:
                self.tb.close()
        barrier()   # torchrun: no process leaves before rank 0 has written the last checkpoint
        return self

    def loop(self):
        o = self.o
        log_path = os.path.join(self.out_dir, "log.jsonl")
        main = self.dist.is_main   # under torchrun, rank 0 alone writes logs, checkpoints, grids
        bar = tqdm(total=o["steps"], initial=self.step, disable=not self.progress or not main, unit="step",
                   desc="training", dynamic_ncols=True)
        acc: Dict[str, list] = {}
        t_start, n_images = time.perf_counter(), 0
        while self.step < o["steps"]:
            out = self.train_step()
            n_images += out["loss"].shape[0]
            for k in self.LOG_KEYS:
                if k in out:
                    acc.setdefault(k, []).append(out[k].mean().item())
            if "grad_norm" in out:   # the steps skipped as non-finite have none
                acc.setdefault("grad_norm", []).append(out["grad_norm"].item())
            for q in range(4 if "quarter" in out else 0):   # loss by quarter of the process
                # (as improved-diffusion logs it; timestep objectives only)
                sel = out["quarter"] == q
                for k in self.QUARTER_KEYS if sel.any() else ():
                    acc.setdefault(f"{k}_q{q}", []).append(out[k][sel].mean().item())
            bar.update(1)
            if self.step % o["log_every"] == 0 or self.step == o["steps"]:
                elapsed = time.perf_counter() - t_start
                rec = {"step": self.step, "lr": self.lr_at(self.step - 1),
                       "images_per_s": n_images / max(elapsed, 1e-9),
                       "precision": self.precision}   # as resolved: --precision auto may differ by machine
                rec.update({k: float(np.mean(v)) for k, v in acc.items()})
                rec["bad_steps"] = self.guard.take_log_count()   # skipped since the last record
                if self.precision == "fp16":
                    rec.update(loss_scale=self.scaler.scale, skipped_steps=self.scaler.skipped)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
                self.write_log(log_path, rec)
                acc, t_start, n_images = {}, time.perf_counter(), 0
            if self.evaluator.due(self.step, o["steps"]):   # before the checkpoint: a crash
                rec = self.evaluator(self.ema_pipeline(), self.data.images, self.step, self.dist,
                                     o["batch_size"], self.data.name)   # redoes it on --resume
                self.write_log(log_path, rec)
            if main and (self.step % o["save_every"] == 0 or self.step == o["steps"]):
                self.save_checkpoint()
            if main and o["sample_every"] and self.step % o["sample_every"] == 0:
                self.write_samples()
        bar.close()

    def write_log(self, log_path: str, rec: dict):
        """A record to log.jsonl and, with --tensorboard, to the event files (main process)."""
        if not self.dist.is_main:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            self.tb.record(rec)

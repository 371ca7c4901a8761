"""Sample quality during training: `gaussdiff train --eval-every N`.

Every N steps, and after the last step, --eval-samples M images are drawn with the first EMA
weights from fixed seeds (image i from (0, i), so the points of a run are comparable) and scored
with metrics.evaluate against a fixed subset of min(M, dataset size) training images (chosen
with seed 0, as many as samples like `gaussdiff eval`; their statistics are computed once and
cached in the reference cache). log.jsonl gets {"step", "eval_<metric>", "eval_nfe",
"eval_seconds"}; <metric> is evaluate's key: fid, or fd_NAME after the feature net's name.

Under torchrun every rank draws its contiguous share of the M images and takes part in the
feature extraction (metrics.evaluate); rank 0 writes the record.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from ..distributed import all_gather_cat, shard
from ..errors import UsageError
from ..metrics.classifier import load_feature_net
from ..metrics.evaluate import evaluate
from ..modeldir import CONFIG_NAME
from ..metrics.sweep import generate, parse_sampler_spec

EVAL_KEYS = ("eval_every", "eval_samples", "eval_sampler", "eval_metric", "eval_feature_net")
INHERITED_KEYS = EVAL_KEYS + ("tensorboard",)   # what --resume takes from the run unless given
EVAL_METRICS = ("fd", "fid")


def inherit_run_options(opts: dict, given, out_dir: str):
    """--resume: the evaluation and TensorBoard options saved in the run's config.json, where
    the command line gives none."""
    try:
        with open(os.path.join(out_dir, CONFIG_NAME)) as f:
            saved = json.load(f)["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return   # no saved run yet: --resume reports that itself
    for key in INHERITED_KEYS:
        if key not in given and key in saved:
            opts[key] = saved[key]


class TrainingEval:
    """The --eval-* options of a run, checked on construction; call it to evaluate.

    o: the training options (eval_feature_net is made absolute in place, so that the saved
    options still find it). T: the diffusion's steps; sigma_space: a σ-space objective."""

    def __init__(self, o: dict, T: int, sigma_space: bool, device=None, world_size: int = 1):
        self.every, self.num = o.get("eval_every") or 0, o.get("eval_samples") or 256
        metric, net_dir = o.get("eval_metric"), o.get("eval_feature_net")
        if metric not in (None,) + EVAL_METRICS:
            raise UsageError(f"--eval-metric {metric}: choose {' or '.join(EVAL_METRICS)}")
        if metric == "fd" and not net_dir:
            raise UsageError("--eval-metric fd needs --eval-feature-net DIR (train one with "
                             "`gaussdiff train-feature-net`)")
        self.metric = metric or ("fd" if net_dir else "fid")
        self.feature_net = None
        if net_dir:
            o["eval_feature_net"] = os.path.abspath(net_dir)
            self.feature_net = load_feature_net(net_dir, device)
            self.feature_net.path = o["eval_feature_net"]
        default = "heun:18" if sigma_space else f"ddim:{min(50, T)}"
        self.sampler, self.steps = parse_sampler_spec(o.get("eval_sampler") or default, T,
                                                      sigma_space, "--eval-sampler")
        if self.every and o.get("task") == "upsample":
            raise UsageError("--eval-every: sample metrics of an upsampler (--task upsample) are "
                             "not supported; evaluate the cascade with `gaussdiff sample --cascade`")
        if self.every and self.num < world_size:
            raise UsageError(f"--eval-samples {self.num} is less than the number of processes ({world_size})")
        self.device, self._reference = device, None

    def due(self, step: int, last: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last)

    def reference(self, images: np.ndarray) -> np.ndarray:
        """The fixed subset of the training images [M', H, W, C] (chosen once, seed 0)."""
        if self._reference is None:
            n = min(self.num, len(images))
            idx = np.sort(np.random.default_rng(0).choice(len(images), n, replace=False))
            self._reference = images[idx]
        return self._reference

    def __call__(self, pipe, train_images: np.ndarray, step: int, dist, batch_size: int = 64,
                 dataset_name: str = "train") -> dict:
        """Sample and score; returns the log record. Every rank calls it (torchrun)."""
        start = time.perf_counter()
        part = shard(self.num, dist)
        out = generate(pipe, self.sampler, self.steps, part.stop - part.start, seed=0,
                       batch_size=batch_size, progress=False, start_index=part.start)
        images, nfe = out["images"], out["nfe"]
        if dist.enabled:   # every rank gets all M images, in index order
            on = torch.device("cuda", torch.cuda.current_device()) if self.device.type == "cuda" else torch.device("cpu")
            images = all_gather_cat(torch.from_numpy(images).to(on), dist).cpu().numpy()
            nfe = int(all_gather_cat(torch.tensor([nfe], device=on), dist).max())
        result = evaluate(images, self.reference(train_images), [self.metric],
                          reference_name=f"{dataset_name}-train", feature_net=self.feature_net,
                          batch_size=batch_size, device=self.device, progress=False)
        return {"step": step, **{f"eval_{k}": v for k, v in result["metrics"].items()},
                "eval_nfe": nfe, "eval_seconds": time.perf_counter() - start}

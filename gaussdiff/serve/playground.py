"""The playground's engine, apart from HTTP: which models it serves, what a request may ask for,
and one sampling job with its step-by-step previews.

Only the models named at start are served, by name (their directory's base name): no value
from a request ever reaches the file system. A request is a JSON object, checked field by field
(`check_request`: a `BadRequest` names the field and what it may be); the work per request is
bounded by `Limits` (network evaluations per image, images per request). Results are kept in
memory, the newest `Limits.results` of them, under a random id.
"""
from __future__ import annotations

import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from ..data.readers import to_uint8
from ..errors import UsageError
from ..images import make_grid, npz_bytes, png_bytes
from ..modeldir import load
from ..sampling.guidance import Guidance
from ..sampling.samplers import REGISTRY

MAX_SEED = 2 ** 31 - 1


class BadRequest(ValueError):
    """A request field that cannot be served: the message names it (HTTP 400/404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """The client went away: the job stops at its next step."""


@dataclass
class Limits:
    max_nfe: int = 250        # network evaluations per image
    max_images: int = 16      # images per request
    max_queue: int = 8        # requests waiting or running; more get HTTP 503
    results: int = 32         # finished results kept for download
    preview_every: float = 0.1   # seconds between two streamed previews (the last one always)


@dataclass
class Job:
    model: str
    sampler: str
    steps: int
    seed: int = 0
    num: int = 1
    label: Optional[int] = None
    guidance_scale: Optional[float] = None
    temperature: float = 1.0
    nfe: int = 0              # the bound this request was checked against

    def key(self) -> tuple:
        return (self.model, self.sampler, self.steps, self.seed, self.num, self.label,
                self.guidance_scale, self.temperature)


@dataclass
class Result:
    png: bytes
    npz: bytes
    images: np.ndarray
    nfe: int
    seconds: float
    job: Job = field(repr=False, default=None)


def model_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


class Playground:
    """The models, the limits, a lock that runs one job at a time, and the results store."""

    def __init__(self, model_dirs, device=None, limits: Optional[Limits] = None, classifier=None):
        self.limits = limits or Limits()
        self.models: Dict[str, object] = {}
        for path in model_dirs:
            name = model_name(path)
            if name in self.models:
                raise UsageError(f"two models are named {name!r} ({path}): serve directories with "
                                 f"different names")
            pipe = load(path, device=device)
            if pipe.task == "upsample":
                raise UsageError(f"{path} is an upsampler: it needs low-resolution inputs, which "
                                 f"the playground does not take; serve its base model")
            self.models[name] = pipe
        if not self.models:
            raise UsageError("serve: name at least one model directory")
        self.classifier = classifier
        self.run_lock = threading.Lock()     # one job at a time on the CPU: reproducible, no thrashing
        self.count_lock = threading.Lock()
        self.pending = 0
        self.results: "OrderedDict[str, Result]" = OrderedDict()

    # ------------------------------------------------------------------ what can be asked
    def describe(self) -> dict:
        models = []
        for name, pipe in self.models.items():
            sigma_space = bool(pipe.config.get("precond"))
            nc = pipe.num_classes or (self.classifier.num_classes if self.classifier else None)
            guidance = None
            if pipe.config["model"].get("null_class"):
                guidance = "classifier-free"
            elif self.classifier is not None and pipe.num_classes in (None, self.classifier.num_classes):
                guidance = "classifier"
            classes = pipe.config.get("data", {}).get("class_names") or \
                (list(map(str, range(nc))) if nc else None)
            models.append(dict(
                name=name, image_shape=list(pipe.image_shape), sigma_space=sigma_space,
                samplers=[s for s, spec in REGISTRY.items()
                          if (not spec.discrete or not sigma_space) and spec.nfe is not None],
                num_classes=nc, class_names=classes, guidance=guidance,
                default_sampler="heun" if sigma_space else "ddim",
                default_steps=18 if sigma_space else 50))
        return dict(models=models, limits=dict(max_nfe=self.limits.max_nfe,
                                               max_images=self.limits.max_images))

    def check_request(self, body) -> Job:
        """A Job from a JSON object, or a BadRequest naming the first bad field."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        known = {"model", "sampler", "steps", "seed", "num", "label", "guidance_scale", "temperature"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}: the fields are {', '.join(sorted(known))}")
        name = body.get("model")
        if not isinstance(name, str) or name not in self.models:
            raise BadRequest(f"model: one of {', '.join(self.models)}", 404 if isinstance(name, str) else 400)
        info = next(m for m in self.describe()["models"] if m["name"] == name)
        sampler = body.get("sampler", info["default_sampler"])
        if sampler not in info["samplers"]:
            raise BadRequest(f"sampler: one of {', '.join(info['samplers'])} for model {name}")
        steps = _integer(body, "steps", info["default_steps"], 1, None)
        a, b = REGISTRY[sampler].nfe
        nfe = a * steps + b
        if nfe > self.limits.max_nfe:
            raise BadRequest(f"steps: {steps} {sampler} steps are {nfe} network evaluations per "
                             f"image, above this server's limit of {self.limits.max_nfe}")
        pipe = self.models[name]
        if pipe.diffusion is not None and REGISTRY[sampler].discrete and steps > pipe.diffusion.num_timesteps:
            raise BadRequest(f"steps: at most the model's {pipe.diffusion.num_timesteps} for {sampler}")
        seed = _integer(body, "seed", 0, 0, MAX_SEED)
        num = _integer(body, "num", 1, 1, self.limits.max_images)
        label = body.get("label")
        if label is not None:
            label = _integer(body, "label", None, 0, (info["num_classes"] or 0) - 1,
                             "the model has no classes" if not info["num_classes"] else None)
        scale = body.get("guidance_scale")
        if scale is not None:
            if info["guidance"] is None:
                raise BadRequest(f"guidance_scale: model {name} has no guidance (neither a null "
                                 f"label nor a classifier)")
            scale = _number(body, "guidance_scale", 0.0, 20.0)
        temperature = 1.0 if body.get("temperature") is None else _number(body, "temperature", 0.05, 2.0)
        return Job(name, sampler, steps, seed, num, label, scale, temperature, nfe)

    # ------------------------------------------------------------------ running
    def admit(self) -> bool:
        """Count a request in if the queue has room (False: the server is busy)."""
        with self.count_lock:
            if self.pending >= self.limits.max_queue:
                return False
            self.pending += 1
            return True

    def release(self):
        with self.count_lock:
            self.pending -= 1

    def guidance(self, job: Job) -> Optional[Guidance]:
        pipe = self.models[job.model]
        cfg = job.guidance_scale if pipe.config["model"].get("null_class") else None
        classifier = self.classifier if job.guidance_scale is not None and cfg is None else None
        if cfg is None and classifier is None and job.temperature == 1.0:
            return None
        return Guidance(classifier=classifier,
                        classifier_scale=job.guidance_scale if classifier is not None else 1.0,
                        cfg_scale=cfg, temperature=job.temperature)

    def run(self, job: Job, on_step: Optional[Callable[[int, int, bytes], None]] = None,
            cancelled: Callable[[], bool] = lambda: False) -> str:
        """Sample `job` (one at a time), calling on_step(step, steps, preview PNG) with the x̂_0
        grid at most every Limits.preview_every seconds and at the last step; returns the
        result's id. The images are those of `gaussdiff sample` with the same options."""
        pipe = self.models[job.model]
        last = [0.0]

        def callback(d):
            if cancelled():
                raise Cancelled()
            if on_step is None:
                return
            now = time.perf_counter()
            if d["step"] == d["steps"] or now - last[0] >= self.limits.preview_every:
                last[0] = now
                on_step(d["step"], d["steps"], png_bytes(make_grid(to_uint8(d["denoised"]))))

        with self.run_lock:
            start, stats = time.perf_counter(), {}
            images, labels = pipe.sample(
                job.num, job.sampler, job.steps, seed=job.seed, batch_size=job.num,
                labels=None if job.label is None else [job.label] * job.num, progress=False,
                stats=stats, guidance=self.guidance(job), callback=callback)
            seconds = time.perf_counter() - start
        result = Result(png_bytes(make_grid(images)), npz_bytes(images, labels), images,
                        stats["nfe"], seconds, job)
        rid = secrets.token_hex(8)
        with self.count_lock:
            self.results[rid] = result
            while len(self.results) > self.limits.results:
                self.results.popitem(last=False)
        return rid

    def result(self, rid: str) -> Result:
        with self.count_lock:
            if rid not in self.results:
                raise BadRequest(f"no result {rid!r} (results are kept for the last "
                                 f"{self.limits.results} requests)", 404)
            return self.results[rid]


def _integer(body, name, default, lo, hi, why=None) -> int:
    v = body.get(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or \
            (hi is not None and v > hi):
        span = why or (f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
        raise BadRequest(f"{name}: {span}, got {v!r}")
    return v


def _number(body, name, lo, hi) -> float:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise BadRequest(f"{name}: a number in [{lo}, {hi}], got {v!r}")
    return float(v)

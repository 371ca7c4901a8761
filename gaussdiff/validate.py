"""Checks of untrusted configuration: a model directory's config.json and the training options.

Every problem becomes one `UsageError` line naming the file (or flag), the key and what was
wrong, before anything is built from the values, so that a hand-edited or hostile config never
ends in a traceback deep inside the network or the diffusion.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .diffusion.precond import make_precond
from .diffusion.process import LOSS_TYPES, MEAN_TYPES, VAR_TYPES, make_diffusion
from .diffusion.schedules import SCHEDULES
from .errors import UsageError
from .nn.encoder import EncoderConfig
from .nn.unet import UNetConfig

# The keys of a config.json "diffusion" section, and the defaults of the optional ones.
DIFFUSION_KEYS = ("schedule", "steps", "mean_type", "var_type", "loss_type", "hybrid_lambda",
                  "vb_stop_grad", "p2_gamma", "p2_k", "min_snr_gamma")
# keys added after format 1 was fixed: configs without them mean these values
DIFFUSION_OPTIONAL = dict(p2_gamma=0.0, p2_k=1.0, min_snr_gamma=0.0)
# what Pipeline.sample accepts: the discrete engine's two samplers, then the σ-space ones


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _describe(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- config.json
TASKS = ("generate", "upsample")


def task_of(cfg: dict) -> dict:
    """A config's "task" section: {"type": "generate"} (also when absent) or {"type":
    "upsample", "low_res": N} (the second stage of a cascade, gaussdiff train --task upsample)."""
    task = cfg.get("task") or {"type": "generate"}
    low_res = task.get("low_res") if isinstance(task, dict) else None
    if not isinstance(task, dict) or task.get("type") not in TASKS or (
            task["type"] == "upsample" and not (type(low_res) is int and low_res > 0)):
        raise UsageError(f"config.json: bad task section {task!r}: expected type generate, or "
                         f"type upsample with a positive integer low_res")
    return task


def check_model_section(section, where: str, classifier: bool = False):
    """Build-check the "model" section: UNetConfig.from_dict's type and range checks
    (EncoderConfig's for a classifier directory)."""
    config_class = EncoderConfig if classifier else UNetConfig
    try:
        return config_class.from_dict(section)
    except UsageError as e:
        raise UsageError(f"{where}: \"model\" section: {e}") from None


def check_diffusion_section(section, where: str, schedule_only: bool = False):
    """Types and choices of the "diffusion" section, then a trial make_diffusion. schedule_only:
    a noisy classifier's section, which needs only the noise schedule (schedule and steps)."""
    unknown = sorted(set(section) - set(DIFFUSION_KEYS))
    if unknown:
        raise UsageError(f"{where}: \"diffusion\" section: unknown keys {', '.join(map(str, unknown))}")
    required = ("schedule", "steps") if schedule_only else set(DIFFUSION_KEYS) - set(DIFFUSION_OPTIONAL)
    missing = sorted(set(required) - set(section))
    if missing:
        raise UsageError(f"{where}: \"diffusion\" section: missing keys {', '.join(missing)}")
    choices = dict(schedule=SCHEDULES, mean_type=MEAN_TYPES, var_type=VAR_TYPES,
                   loss_type=LOSS_TYPES)
    for key, value in section.items():
        bad = None
        if key in choices:
            if value not in choices[key]:
                bad = f"must be one of {', '.join(choices[key])}"
        elif key == "steps":
            if not _is_int(value) or not 1 <= value <= 1_000_000:
                bad = "must be an integer in [1, 1000000]"
        elif key == "vb_stop_grad":
            if not isinstance(value, bool):
                bad = "must be true or false"
        elif key in ("hybrid_lambda", "p2_gamma", "p2_k", "min_snr_gamma"):
            if not _is_number(value):
                bad = "must be a finite number"
            elif value < 0 or (key == "p2_k" and value == 0):
                bad = "must be positive" if key == "p2_k" else "must be >= 0"
        if bad:
            raise UsageError(f"{where}: \"diffusion\" section: {key} {bad}, got {_describe(value)}")
    try:   # whatever else the section holds, make_diffusion must accept it
        make_diffusion(**section)
    except UsageError as e:
        raise UsageError(f"{where}: \"diffusion\" section: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise UsageError(f"{where}: \"diffusion\" section: bad values ({e})") from None


def check_data_section(section, model_section: dict, where: str):
    for key in ("image_size", "channels"):
        if key in section and not (_is_int(section[key]) and section[key] >= 1):
            raise UsageError(f"{where}: \"data\" section: {key} must be a positive integer, "
                             f"got {_describe(section[key])}")
    names = section.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UsageError(f"{where}: \"data\" section: class_names must be a list of strings or null")
    if section.get("channels") is not None and section["channels"] != model_section.get("in_channels"):
        raise UsageError(f"{where}: data channels {section['channels']} do not match the model's "
                         f"in_channels {model_section.get('in_channels')}")


def check_precond_section(section, where: str):
    if not isinstance(section, dict):
        raise UsageError(f"{where}: \"precond\" section must be an object")
    for key, value in section.items():
        if key != "type" and not _is_number(value):
            raise UsageError(f"{where}: \"precond\" section: {key} must be a finite number, "
                             f"got {_describe(value)}")
    try:
        make_precond(section, nn.Identity())
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UsageError(f"{where}: \"precond\" section: bad values ({e})") from None


def check_config(cfg: dict, where: str):
    """All sections of a config.json that gaussdiff builds something from."""
    classifier = cfg.get("kind") == "classifier"
    check_model_section(cfg["model"], where, classifier=classifier)
    if "diffusion" in cfg:   # σ-space models have none (read_config drops an old one)
        check_diffusion_section(cfg["diffusion"], where, schedule_only=classifier)
    check_data_section(cfg["data"], cfg["model"], where)
    if cfg.get("precond") is not None:
        check_precond_section(cfg["precond"], where)
    if not isinstance(cfg.get("training", {}), dict):
        raise UsageError(f"{where}: \"training\" section must be an object")


# --------------------------------------------------------------------------- training options
# option: (minimum, what the flag means when given below it)
_MINIMUM = dict(steps=1, batch_size=1, save_every=1, log_every=1, sample_every=0, sample_num=1,
                sample_steps=1, warmup=0, diffusion_steps=1, keep=0, max_bad_steps=0,
                image_size=1, model_channels=1, num_res_blocks=1, seed=0, eval_every=0,
                eval_samples=2)


def check_train_options(o: dict):
    """Ranges of `gaussdiff train` options that nothing else checks before they are used."""
    def flag(k):
        return "--" + k.replace("_", "-")
    for key, low in _MINIMUM.items():
        v = o.get(key)
        if v is None:
            continue
        if not _is_int(v):
            raise UsageError(f"{flag(key)}: expected an integer, got {_describe(v)}")
        if v < low:
            raise UsageError(f"{flag(key)} must be at least {low}, got {v}")
    for key in ("lr", "weight_decay", "grad_clip", "dropout", "hybrid_lambda", "augment"):
        v = o.get(key)
        if v is not None and (not _is_number(v) or v < 0):
            raise UsageError(f"{flag(key)} must be a finite number >= 0, got {_describe(v)}")
    if o.get("loss") == "hybrid" and o.get("objective", "ddpm") == "ddpm" and \
            o.get("var_type") not in ("learned", "learned_range"):
        raise UsageError(f"--loss hybrid trains a learned variance: it needs --var-type learned or "
                         f"learned_range, got {o.get('var_type')} (for a fixed variance use --loss mse)")
    if o.get("channels") is not None and o["channels"] not in (1, 3):
        raise UsageError(f"--channels must be 1 or 3, got {o['channels']}")
    for key in ("num_heads",):
        v = o.get(key)
        if v is not None and _is_int(v) and v < 1:
            raise UsageError(f"{flag(key)} must be at least 1, got {v}")


# --------------------------------------------------------------------------- sampling numbers
def _bad(flag: str, value, allowed: str) -> UsageError:
    return UsageError(f"{flag} {_describe(value)}: must be {allowed}")


def check_sampling_numbers(*, eta=None, churn=None, tmin=None, tmax=None, snoise=None, rho=None,
                           sigma_min=None, sigma_max=None, rtol=None, atol=None, cfg_scale=None,
                           classifier_scale=None, temperature=None):
    """Range-check the numeric sampling options before anything runs, so that a value that
    would make the samples NaN (η = 5, S_churn < 0, a NaN guidance scale) or crash deep in a
    sampler (ρ = 0, zero tolerances) is one line naming the flag and the allowed range.
    None means "not given". Flags are named as on the command line."""
    def number(flag, v):
        if not _is_number(v):
            raise _bad(flag, v, "a finite number")

    if eta is not None:
        number("--eta", eta)
        if not 0 <= eta <= 1:
            raise _bad("--eta", eta, "in [0, 1] (0: deterministic DDIM, 1: ancestral; larger "
                                     "values ask for more noise than the step removes)")
    for flag, v in (("--churn", churn), ("--snoise", snoise), ("--tmin", tmin)):
        if v is not None:
            number(flag, v)
            if v < 0:
                raise _bad(flag, v, ">= 0")
    if tmax is not None:
        if not (isinstance(tmax, (int, float)) and not isinstance(tmax, bool)) or math.isnan(tmax) or tmax < 0:
            raise _bad("--tmax", tmax, ">= 0 (inf: no upper limit)")
    if tmin is not None and tmax is not None and tmin > tmax:
        raise UsageError(f"--tmin {tmin} is above --tmax {tmax}: churn would never apply; "
                         f"give tmin <= tmax")
    if rho is not None:
        number("--rho", rho)
        if rho <= 0:
            raise _bad("--rho", rho, "positive (EDM: 7)")
    for flag, v in (("--sigma-min", sigma_min), ("--sigma-max", sigma_max)):
        if v is not None:
            number(flag, v)
            if v <= 0:
                raise _bad(flag, v, "positive")
    if sigma_min is not None and sigma_max is not None and sigma_min >= sigma_max:
        raise UsageError(f"--sigma-min {sigma_min} must be below --sigma-max {sigma_max}")
    for flag, v in (("--rtol", rtol), ("--atol", atol)):
        if v is not None:
            number(flag, v)
            if v < 0:
                raise _bad(flag, v, ">= 0")
    if (rtol is not None or atol is not None) and \
            (0.05 if rtol is None else rtol) + (0.0078 if atol is None else atol) < 1e-6:
        raise UsageError(f"--rtol {rtol} and --atol {atol}: the adaptive sampler needs a tolerance "
                         f"(rtol + atol >= 1e-6; defaults 0.05 and 0.0078)")
    for flag, v in (("--cfg-scale", cfg_scale), ("--classifier-scale", classifier_scale)):
        if v is not None:
            number(flag, v)
    if temperature is not None:
        number("--temperature", temperature)
        if temperature <= 0:
            raise _bad("--temperature", temperature, "positive (1: off)")

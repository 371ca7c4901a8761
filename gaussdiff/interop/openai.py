"""Import checkpoints of openai/improved-diffusion and openai/guided-diffusion.

`gaussdiff convert-openai CKPT.pt --flags "<MODEL_FLAGS DIFFUSION_FLAGS>" --out DIR` turns their
`UNetModel`, `SuperResModel` and `EncoderUNetModel` (noisy classifier) state dicts into a
gaussdiff model directory. The flag string is the one given to their scripts; keys not given
take that script's defaults (the tables below copy `script_util.py` of each codebase), so the
same string that sampled the model there describes it here.

The checkpoint is read with `torch.load(..., weights_only=True)` and nothing else: it can hold
tensors, not code. gaussdiff's UNet has guided-diffusion's module names and shapes, so the state
dict maps one to one, with two translations:
- guided-diffusion's `use_new_attention_order` lays the qkv projection out as [q | k | v], each
  split into heads; gaussdiff's attention uses the legacy per-head [q_h k_h v_h] layout (that of
  improved-diffusion and of guided-diffusion's default), so those rows are permuted on import;
- `rescale_timesteps` (the network saw t * 1000 / T) becomes the model's `timestep_scale`,
  since gaussdiff always hands the network ORIGINAL integer timesteps.
"""
from __future__ import annotations

import os
import shlex
from typing import Dict, Tuple

import torch

from ..diffusion.schedules import SCHEDULES, space_timesteps
from ..errors import UsageError
from ..modeldir import CONFIG_NAME, WEIGHTS_NAME, atomic_write_json, build_model, make_config, save_tensors
from ..nn.encoder import POOLS, EncoderConfig
from ..nn.unet import AttentionBlock, UNetConfig

NUM_CLASSES = 1000   # both codebases: class_cond means the 1000 ImageNet classes

# ---- guided-diffusion, guided_diffusion/script_util.py
GUIDED_DIFFUSION = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear",
                        timestep_respacing="", use_kl=False, predict_xstart=False,
                        rescale_timesteps=False, rescale_learned_sigmas=False)
GUIDED_MODEL = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
                    num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="16,8",
                    channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
                    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
                    use_new_attention_order=False, **GUIDED_DIFFUSION)
GUIDED_CLASSIFIER = dict(image_size=64, classifier_use_fp16=False, classifier_width=128,
                         classifier_depth=2, classifier_attention_resolutions="32,16,8",
                         classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                         classifier_pool="attention", **GUIDED_DIFFUSION)
# sr_model_and_diffusion_defaults(): the model defaults less the keys sr_create_model_and_
# diffusion does not take (image_size, channel_mult, use_new_attention_order), plus the sizes
GUIDED_SR = {**{k: v for k, v in GUIDED_MODEL.items()
                if k not in ("image_size", "channel_mult", "use_new_attention_order")},
             "large_size": 256, "small_size": 64}

# ---- improved-diffusion, improved_diffusion/script_util.py
IMPROVED_MODEL = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
                      num_heads_upsample=-1, attention_resolutions="16,8", dropout=0.0,
                      learn_sigma=False, sigma_small=False, class_cond=False,
                      diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                      use_kl=False, predict_xstart=False, rescale_timesteps=True,
                      rescale_learned_sigmas=True, use_checkpoint=False,
                      use_scale_shift_norm=True)
IMPROVED_SR = {**{k: v for k, v in IMPROVED_MODEL.items() if k not in ("image_size", "sigma_small")},
               "large_size": 256, "small_size": 64}

DEFAULTS = {"guided-diffusion": {"unet": GUIDED_MODEL, "superres": GUIDED_SR,
                                 "classifier": GUIDED_CLASSIFIER},
            "improved-diffusion": {"unet": IMPROVED_MODEL, "superres": IMPROVED_SR}}
CODEBASES = tuple(DEFAULTS)

# channel_mult by image size when not given ("" in guided-diffusion; improved-diffusion has no flag)
CHANNEL_MULT = {
    ("guided-diffusion", "unet"): {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                                   128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
    ("guided-diffusion", "classifier"): {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                                         128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
    ("guided-diffusion", "superres"): {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                                       64: (1, 2, 3, 4)},
    ("improved-diffusion", "unet"): {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
    ("improved-diffusion", "superres"): {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)},
}

# keys of the training and sampling scripts that say nothing about the network or the diffusion
SCRIPT_KEYS = frozenset((
    "clip_denoised", "num_samples", "batch_size", "use_ddim", "model_path", "classifier_path",
    "classifier_scale", "base_samples", "data_dir", "val_data_dir", "schedule_sampler", "lr",
    "weight_decay", "lr_anneal_steps", "microbatch", "ema_rate", "log_interval", "save_interval",
    "eval_interval", "resume_checkpoint", "fp16_scale_growth", "noised", "iterations", "anneal_lr",
    "use_fp16"))   # use_fp16: a training-script key in improved-diffusion, a model key in guided
IGNORED_MODEL_KEYS = ("use_checkpoint", "use_fp16", "classifier_use_fp16")   # no effect on weights

README = """\
`gaussdiff convert-openai CKPT.pt --flags "FLAGS" --out DIR` reads, from FLAGS (the MODEL_FLAGS
and DIFFUSION_FLAGS given to improved-diffusion's or guided-diffusion's scripts; `--key value`
or `--key=value`, booleans as True/False/1/0/yes/no):
- network: image_size, num_channels, num_res_blocks, channel_mult ("" = by image size, as in
  the scripts), attention_resolutions (resolutions, e.g. "32,16,8", turned into downsampling
  rates image_size // res as the scripts do), num_heads, num_head_channels, num_heads_upsample,
  dropout, class_cond (1000 classes), learn_sigma (6 output channels), use_scale_shift_norm,
  resblock_updown, use_new_attention_order (qkv rows permuted to gaussdiff's layout);
  super-resolution: large_size, small_size; noisy classifier: image_size, classifier_width,
  classifier_depth, classifier_attention_resolutions, classifier_use_scale_shift_norm,
  classifier_resblock_updown, classifier_pool (attention or adaptive).
- diffusion: diffusion_steps (T), noise_schedule (linear, cosine), predict_xstart (mean_type
  x0, else eps), learn_sigma (var_type learned_range; else sigma_small: fixed_small, else
  fixed_large), use_kl (loss kl = T·L_t), rescale_learned_sigmas (loss hybrid with λ = 0.001,
  i.e. mse + (T/1000)·L_t; without it improved-diffusion's mse + L_t, λ = 1/T; without
  learn_sigma: loss mse), rescale_timesteps (the network is given 1000·t/T: timestep_scale),
  timestep_respacing (recorded in config.json; pass it to `gaussdiff sample --steps`).
- accepted, no effect on the converted weights: use_fp16, classifier_use_fp16 (weights are
  stored in float32), use_checkpoint (gradient checkpointing), and the scripts' own keys
  (model_path, batch_size, num_samples, use_ddim, clip_denoised, classifier_scale, lr, ...).
Keys not given take the defaults of the codebase's script_util.py (improved-diffusion:
rescale_timesteps and rescale_learned_sigmas True; guided-diffusion: False). The codebase is
told by the flags (guided-only keys such as num_head_channels, resblock_updown, channel_mult,
use_new_attention_order, classifier_*; improved-only sigma_small; image_size 32 is
improved-diffusion's, 128 and 512 guided-diffusion's) or by --codebase; the kind of network
(UNetModel, SuperResModel with large_size/small_size, EncoderUNetModel) by the checkpoint.
Any other key is an error."""


def str2bool(text: str) -> bool:
    """The scripts' str2bool."""
    t = text.lower()
    if t in ("yes", "true", "t", "y", "1"):
        return True
    if t in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError("boolean value expected")


def parse_flag_string(text: str) -> Dict[str, str]:
    """'--key value --key2=value2 ...' -> {key: raw value} (the last of repeated keys wins, as
    with argparse). Dashes in key names are read as underscores."""
    try:
        tokens = shlex.split(text)   # tokenizing only: nothing here runs a shell
    except ValueError as e:
        raise UsageError(f"--flags: cannot parse {text!r} ({e})") from None
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UsageError(f"--flags: expected --key value pairs, got {tok!r}")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise UsageError(f"--flags: {tok} has no value")
            key, value = tok[2:], tokens[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def _typed(key: str, raw: str, default):
    """The value as the script's argparse would type it (from the default's type)."""
    try:
        if isinstance(default, bool):
            return str2bool(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return raw
    except ValueError:
        want = {bool: "True or False", int: "an integer", float: "a number"}[type(default)]
        raise UsageError(f"--flags: --{key} {raw!r}: expected {want}") from None


# ------------------------------------------------------------------------------ the checkpoint
def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A plain state dict of tensors, through torch.load(weights_only=True) only."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # UnpicklingError (code refused), RuntimeError (not a checkpoint) ...
        # torch's message goes on to advise weights_only=False, i.e. running the file's code:
        # never pass that on; say what was refused instead
        text = str(e)
        detail = text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        detail = " ".join(detail.split()) or (text.strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in detail:
            detail = type(e).__name__
        raise UsageError(f"{path}: not a tensors-only PyTorch checkpoint, refused by the safe "
                         f"loader ({detail[:120]}); convert-openai reads plain state dicts of "
                         f"tensors, as the OpenAI training scripts save them") from None
    if not isinstance(state, dict) or not state:
        raise UsageError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    bad = next((k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
    if bad is not None:
        raise UsageError(f"{path}: entry {str(bad)[:60]!r} is a {type(state[bad]).__name__}, not a "
                         f"tensor: expected a plain state dict as the OpenAI scripts save")
    if all(k.startswith("module.") for k in state):   # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def detect_kind(state: Dict[str, torch.Tensor], flags: Dict[str, str], path: str) -> str:
    """unet, superres or classifier, from the checkpoint's keys and the flags."""
    sr_flags = bool({"large_size", "small_size"} & set(flags))
    if not any(k.startswith("output_blocks.") for k in state):
        if sr_flags:
            raise UsageError(f"{path} is not a super-resolution model (no output blocks), but "
                             f"--flags gives large_size/small_size")
        return "classifier"
    w = state.get("input_blocks.0.0.weight")
    in_ch = w.shape[1] if w is not None and w.ndim == 4 else None
    if in_ch == 6 and not sr_flags:
        raise UsageError(f"{path} takes 6 input channels: a super-resolution model? add "
                         f"--large_size and --small_size to --flags")
    if sr_flags and in_ch not in (None, 6):
        raise UsageError(f"{path} takes {in_ch} input channels: not a super-resolution model, "
                         f"but --flags gives large_size/small_size")
    return "superres" if sr_flags else "unet"


def detect_codebase(flags: Dict[str, str], kind: str, requested: str = "auto") -> Tuple[str, str]:
    """(codebase, why)."""
    if requested != "auto":
        if requested not in CODEBASES:
            raise UsageError(f"--codebase {requested}: choose auto, {', '.join(CODEBASES)}")
        return requested, "given by --codebase"
    if kind == "classifier":
        return "guided-diffusion", "noisy classifiers exist only in guided-diffusion"
    guided_only = sorted(set(flags) & (set(GUIDED_MODEL) | set(GUIDED_CLASSIFIER))
                         - set(IMPROVED_MODEL) - set(IGNORED_MODEL_KEYS))
    improved_only = sorted(set(flags) & set(IMPROVED_MODEL) - set(GUIDED_MODEL))
    if guided_only and improved_only:
        raise UsageError(f"--flags mixes guided-diffusion keys ({', '.join(guided_only)}) and "
                         f"improved-diffusion keys ({', '.join(improved_only)})")
    if guided_only:
        return "guided-diffusion", f"flags {', '.join(guided_only)}"
    if improved_only:
        return "improved-diffusion", f"flags {', '.join(improved_only)}"
    if kind == "unet" and "image_size" in flags:
        size = _typed("image_size", flags["image_size"], 0)
        if size == 32:
            return "improved-diffusion", "image_size 32"
        if size in (128, 512):
            return "guided-diffusion", f"image_size {size}"
    # the flags fit both; their defaults differ only in rescale_timesteps and
    # rescale_learned_sigmas, and those matter only when T != 1000
    steps = _typed("diffusion_steps", flags.get("diffusion_steps", "1000"), 0)
    learn_sigma = _typed("learn_sigma", flags.get("learn_sigma", "False"), False)
    open_keys = [k for k in ("rescale_timesteps", "rescale_learned_sigmas")
                 if k not in flags and (k == "rescale_timesteps" or learn_sigma)]
    if steps != 1000 and open_keys:
        raise UsageError(f"--flags fit improved-diffusion and guided-diffusion alike, whose "
                         f"defaults differ for {' and '.join(open_keys)} (True / False), which "
                         f"matter with diffusion_steps {steps}: add them to --flags or pass "
                         f"--codebase improved-diffusion or guided-diffusion")
    return "guided-diffusion", "the flags fit both codebases, which agree on them"


def resolve_flags(flags: Dict[str, str], codebase: str, kind: str) -> Tuple[dict, list, list]:
    """(the script's arguments: defaults updated by the typed flags, keys read, keys ignored)."""
    tables = DEFAULTS[codebase]
    if kind not in tables:
        raise UsageError(f"{codebase} has no {kind} model")
    table = tables[kind]
    every = set().union(*tables.values())
    other = set().union(*(t for c, ts in DEFAULTS.items() if c != codebase for t in ts.values()))
    args, read, ignored = dict(table), [], []
    for key, raw in flags.items():
        if key in table:
            args[key] = _typed(key, raw, table[key])
            read.append(key)
        elif key in SCRIPT_KEYS:
            ignored.append(key)
        elif key in every:
            if kind == "superres":
                raise UsageError(f"--flags: --{key} is not a flag of {codebase}'s super-resolution "
                                 f"scripts (they take large_size and small_size)")
            if kind == "unet" and key in ("large_size", "small_size"):
                raise UsageError(f"--flags: --{key} describes a super-resolution model")
            ignored.append(key)   # classifier flags next to a diffusion model's, or vice versa
        elif key in other:
            raise UsageError(f"--flags: --{key} is not a flag of {codebase} (it is one of the other "
                             f"codebase's); check --codebase")
        else:
            raise UsageError(f"--flags: unknown flag --{key}: not a key of improved-diffusion's or "
                             f"guided-diffusion's model, diffusion, classifier or super-resolution "
                             f"defaults")
    return args, read, ignored


# ------------------------------------------------------------------------------ configs
def _attention_pixels(spec: str, image_size: int, levels: int, key: str) -> Tuple[int, ...]:
    """The scripts' `attention_ds = [image_size // int(res) for res in spec.split(",")]`,
    expressed as gaussdiff's resolutions in pixels (image_size // ds at the levels reached)."""
    try:
        ds = {image_size // int(r) for r in spec.split(",")}
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--flags: --{key} {spec!r}: expected resolutions like 16,8") from None
    return tuple(image_size // 2 ** i for i in range(levels) if 2 ** i in ds)


def _channel_mult(args: dict, codebase: str, kind: str, size: int):
    given = args.get("channel_mult", "")
    if given:
        try:
            return tuple(int(m) for m in given.split(","))   # the script's int(): no 0.5 here
        except ValueError:
            raise UsageError(f"--flags: --channel_mult {given!r}: expected integers like 1,2,3,4") from None
    table = CHANNEL_MULT[(codebase, kind)]
    if size not in table:
        what = "large_size" if kind == "superres" else "image_size"
        raise UsageError(f"--flags: {what} {size} has no default channel_mult in {codebase}'s "
                         f"{kind} script (it supports {', '.join(map(str, table))})"
                         + ("; give --channel_mult" if codebase == "guided-diffusion" and kind == "unet" else ""))
    return table[size]


def diffusion_section(args: dict) -> dict:
    """gaussdiff's "diffusion" section of create_gaussian_diffusion's arguments."""
    T = args["diffusion_steps"]
    if T < 1:
        raise UsageError(f"--flags: diffusion_steps must be positive, got {T}")
    if args["noise_schedule"] not in SCHEDULES:
        raise UsageError(f"--flags: noise_schedule {args['noise_schedule']!r}: the scripts know "
                         f"{', '.join(SCHEDULES)}")
    if args["timestep_respacing"]:
        space_timesteps(T, args["timestep_respacing"])   # a UsageError if malformed
    learn_sigma = args["learn_sigma"]
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if args.get("sigma_small", False) else "fixed_large"
    # create_gaussian_diffusion: use_kl -> RESCALED_KL (T·L_t); rescale_learned_sigmas ->
    # RESCALED_MSE (mse + (T/1000)·L_t); else MSE (mse, + L_t when the variance is learned)
    if args["use_kl"]:
        loss, lam = "kl", 0.001
    elif learn_sigma:
        loss, lam = "hybrid", (0.001 if args["rescale_learned_sigmas"] else 1.0 / T)
    else:
        loss, lam = "mse", 0.001
    return dict(schedule=args["noise_schedule"], steps=T,
                mean_type="x0" if args["predict_xstart"] else "eps", var_type=var_type,
                loss_type=loss, hybrid_lambda=lam, vb_stop_grad=True, p2_gamma=0.0, p2_k=1.0,
                min_snr_gamma=0.0)


def build_config(args: dict, codebase: str, kind: str) -> dict:
    """config.json of the converted model (without the provenance section)."""
    diffusion = diffusion_section(args)
    T = args["diffusion_steps"]
    scale = 1000.0 / T if args["rescale_timesteps"] else 1.0
    if kind == "classifier":
        if args["classifier_pool"] not in POOLS:
            raise UsageError(f"--flags: classifier_pool {args['classifier_pool']!r}: gaussdiff's "
                             f"EncoderUNetModel has the pools {', '.join(POOLS)}")
        if scale != 1.0:
            raise UsageError("--flags: rescale_timesteps with diffusion_steps != 1000 is not "
                             "supported for classifiers")
        size = args["image_size"]
        mult = _channel_mult({}, codebase, kind, size)
        model = EncoderConfig(
            image_size=size, in_channels=3, model_channels=args["classifier_width"],
            out_channels=NUM_CLASSES, num_res_blocks=args["classifier_depth"],
            attention_resolutions=_attention_pixels(args["classifier_attention_resolutions"], size,
                                                    len(mult), "classifier_attention_resolutions"),
            channel_mult=mult, dropout=0.0, num_heads=1, num_head_channels=64,
            use_scale_shift_norm=args["classifier_use_scale_shift_norm"],
            resblock_updown=args["classifier_resblock_updown"], pool=args["classifier_pool"])
        cfg = make_config(model, diffusion, dict(dataset="imagenet", image_size=size, channels=3,
                                                 class_names=None))
        cfg["kind"] = "classifier"
        return cfg
    size = args["large_size"] if kind == "superres" else args["image_size"]
    mult = _channel_mult(args, codebase, kind, size)
    for key in ("num_channels", "num_res_blocks", "num_heads"):
        if args[key] < 1:
            raise UsageError(f"--flags: {key} must be positive, got {args[key]}")
    model = UNetConfig(
        image_size=size, in_channels=3, model_channels=args["num_channels"],
        out_channels=6 if args["learn_sigma"] else 3, num_res_blocks=args["num_res_blocks"],
        attention_resolutions=_attention_pixels(args["attention_resolutions"], size, len(mult),
                                                "attention_resolutions"),
        channel_mult=mult, dropout=args["dropout"],
        num_classes=NUM_CLASSES if args["class_cond"] else None, num_heads=args["num_heads"],
        num_head_channels=args.get("num_head_channels", -1),
        num_heads_upsample=args["num_heads_upsample"],
        use_scale_shift_norm=args["use_scale_shift_norm"],
        resblock_updown=args.get("resblock_updown", False), timestep_scale=scale)
    cfg = make_config(model, diffusion, dict(dataset="imagenet", image_size=size, channels=3,
                                             class_names=None))
    if kind == "superres":
        if not 1 <= args["small_size"] <= size:
            raise UsageError(f"--flags: small_size {args['small_size']} must lie in [1, large_size]")
        cfg["task"] = {"type": "upsample", "low_res": args["small_size"]}
    return cfg


# ------------------------------------------------------------------------------ weights
def new_to_legacy_qkv(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a qkv projection [3C, ...] from guided-diffusion's new order (q | k | v, each of
    heads x d) to the legacy order (per head: q_h, k_h, v_h), which gaussdiff's attention uses."""
    C3 = w.shape[0]
    d = C3 // (3 * heads)
    return w.reshape(3, heads, d, *w.shape[1:]).transpose(0, 1).reshape(C3, *w.shape[1:])


def convert_state(state: Dict[str, torch.Tensor], model: torch.nn.Module, new_attention_order: bool,
                  path: str) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's names, checked key by key and shape by shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: checkpoint "
                         f"{list(state[k].shape)}, flags {list(own[k].shape)})")
        raise UsageError(f"{path} does not match --flags: {'; '.join(parts)}: check num_channels, "
                         f"num_res_blocks, attention_resolutions, channel_mult, learn_sigma, "
                         f"class_cond, resblock_updown and image_size")
    out = {k: state[k].to(own[k].dtype).contiguous() for k in own}
    if new_attention_order:
        for name, m in model.named_modules():
            if isinstance(m, AttentionBlock):
                for p in ("weight", "bias"):
                    key = f"{name}.qkv.{p}"
                    out[key] = new_to_legacy_qkv(out[key], m.num_heads).contiguous()
    return out


def convert(ckpt: str, flag_string: str, out_dir: str, codebase: str = "auto",
            log=print) -> dict:
    """Convert `ckpt` described by `flag_string` into the model directory `out_dir`.
    Returns the written config (with a "source" section: codebase, kind, flags read)."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UsageError(f"--out {out_dir} exists and is not empty: choose a new directory")
    flags = parse_flag_string(flag_string)
    state = read_state_dict(ckpt)
    kind = detect_kind(state, flags, ckpt)
    codebase, why = detect_codebase(flags, kind, codebase)
    args, read, ignored = resolve_flags(flags, codebase, kind)
    cfg = build_config(args, codebase, kind)
    with torch.random.fork_rng(devices=[]):   # the random init is overwritten right away
        model = build_model(cfg)
    new_order = bool(args.get("use_new_attention_order", False))
    weights = convert_state(state, model, new_order, ckpt)
    model.load_state_dict(weights)
    cfg["source"] = dict(codebase=codebase, kind={"unet": "UNetModel", "superres": "SuperResModel",
                                                  "classifier": "EncoderUNetModel"}[kind],
                         checkpoint=os.path.basename(ckpt), flags_read=sorted(read),
                         flags_ignored=sorted(ignored), arguments=args,
                         timestep_respacing=args.get("timestep_respacing", ""))
    os.makedirs(out_dir, exist_ok=True)
    save_tensors(os.path.join(out_dir, WEIGHTS_NAME), weights)
    atomic_write_json(os.path.join(out_dir, CONFIG_NAME), cfg)
    d = cfg["diffusion"]
    log(f"{ckpt}: {cfg['source']['kind']} of {codebase} ({why}); "
        f"{sum(v.numel() for v in weights.values()):,} parameters")
    log(f"diffusion: {d['schedule']} T={d['steps']}, mean {d['mean_type']}, variance "
        f"{d['var_type']}, loss {d['loss_type']}"
        + (f", timestep_scale {cfg['model']['timestep_scale']:g}" if kind != "classifier" else ""))
    if ignored:
        log(f"not read (no effect on the converted model): {', '.join(sorted(ignored))}")
    if args.get("timestep_respacing"):
        log(f"timestep_respacing {args['timestep_respacing']}: sample with --steps "
            f"{args['timestep_respacing']} to use the same steps")
    log(f"wrote {out_dir}")
    return cfg

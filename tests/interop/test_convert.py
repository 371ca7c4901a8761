"""Interoperability: `gaussdiff convert-openai` (improved-diffusion / guided-diffusion checkpoints),
EDM's dataset layout (`gaussdiff dataset`) and `gaussdiff export-torchscript`.

The OpenAI code cannot be downloaded here; tests/openai_reference.py re-implements their
networks' forward pass from the original state-dict names. Random weights under those names are
saved as a .pt state dict, converted, and `gaussdiff.load(DIR).model(x, t, y=y)` must equal the
reference to 1e-5.
"""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import gaussdiff
import openai_reference as ref
from gaussdiff.cli import main
from gaussdiff.interop.openai import convert, diffusion_section, parse_flag_string, resolve_flags
from gaussdiff.errors import UsageError

# (flags, reference architecture in the original constructor's terms, the factor the scripts
# apply to t before the network (rescale_timesteps: 1000 / T), codebase argument)
CASES = {
    # improved-diffusion, CIFAR-style: image 32 -> channel_mult (1,2,2,2); T = 4000 with its
    # default rescale_timesteps=True; legacy attention with 2 heads at 16x16 and 8x8
    "improved-unet": (
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 2 "
        "--attention_resolutions 16,8 --learn_sigma True --diffusion_steps 4000 "
        "--noise_schedule cosine --class_cond True",
        ref.arch(32, 32, 1, {2, 4}, (1, 2, 2, 2), out_channels=6, num_classes=1000, num_heads=2,
                 use_scale_shift_norm=True), 0.25, "auto"),
    # guided-diffusion, ADM-style: new attention order (4 heads of 16 at 8x8), BigGAN up/down
    "guided-unet-new-order": (
        "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 2 "
        "--num_head_channels 16 --attention_resolutions 16,8 --resblock_updown True "
        "--use_new_attention_order True --class_cond True --learn_sigma True --dropout 0.1 "
        "--use_fp16 True --use_checkpoint True",
        ref.arch(16, 32, 2, {1, 2}, (1, 2), out_channels=6, num_classes=1000,
                 num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
                 new_attention_order=True), 1.0, "auto"),
    # guided-diffusion, DDPM-style: addition of the embedding, different heads downstream
    "guided-unet-legacy": (
        "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --num_heads 2 "
        "--num_heads_upsample 4 --attention_resolutions 8 --use_scale_shift_norm False "
        "--predict_xstart True --diffusion_steps 100 --rescale_timesteps False",
        ref.arch(16, 32, 1, {2}, (1, 2), num_heads=2, num_heads_upsample=4), 1.0, "auto"),
    "guided-superres": (
        "--large_size 64 --small_size 32 --num_channels 32 --num_res_blocks 1 "
        "--attention_resolutions 8 --num_head_channels 32 --learn_sigma True --resblock_updown True",
        ref.arch(64, 32, 1, {8}, (1, 2, 3, 4), out_channels=6, num_head_channels=32,
                 use_scale_shift_norm=True, resblock_updown=True, kind="superres"), 1.0, "auto"),
    "improved-superres": (
        "--large_size 64 --small_size 16 --num_channels 32 --num_res_blocks 1 --num_heads 2 "
        "--attention_resolutions 8 --diffusion_steps 2000",
        ref.arch(64, 32, 1, {8}, (1, 2, 3, 4), num_heads=2, use_scale_shift_norm=True,
                 kind="superres"), 0.5, "improved-diffusion"),
    # ADM's noisy classifier: width 32 (only the attention levels need multiples of 64)
    "classifier-attention": (
        "--image_size 64 --classifier_width 32 --classifier_depth 1 "
        "--classifier_attention_resolutions 32,8 --classifier_use_fp16 True",
        ref.arch(64, 32, 1, {2, 8}, (1, 2, 3, 4), out_channels=1000, num_head_channels=64,
                 use_scale_shift_norm=True, resblock_updown=True, kind="encoder"), 1.0, "auto"),
    "classifier-adaptive": (
        "--image_size 64 --classifier_width 64 --classifier_depth 1 --classifier_pool adaptive "
        "--classifier_attention_resolutions 8 --classifier_resblock_updown False "
        "--classifier_use_scale_shift_norm False",
        ref.arch(64, 64, 1, {8}, (1, 2, 3, 4), out_channels=1000, num_head_channels=64,
                 kind="encoder", pool="adaptive"), 1.0, "auto"),
}


def load_any(path):
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    if cfg.get("kind") == "classifier":
        from gaussdiff.training.classifier import load_classifier
        return load_classifier(path, device="cpu").model, cfg
    return gaussdiff.load(path, device="cpu").model, cfg


def convert_case(name, tmp_path, seed=0):
    flags, a, scale, codebase = CASES[name]
    state = ref.random_state(a, seed)
    torch.save(state, tmp_path / f"{name}.pt")
    convert(str(tmp_path / f"{name}.pt"), flags, str(tmp_path / name), codebase, log=lambda *_: None)
    return state, a, scale


@pytest.mark.parametrize("name", list(CASES))
def test_converted_network_equals_reference(name, tmp_path):
    """The converted model directory's network gives the original network's output to 1e-5
    (timesteps as gaussdiff passes them, original integers; labels; the low-resolution image),
    weights stored in float32."""
    state, a, scale = convert_case(name, tmp_path)
    model, cfg = load_any(str(tmp_path / name))
    g = torch.Generator().manual_seed(1)
    S = a["image_size"]
    x = torch.randn(3, 3, S, S, generator=g)
    T = cfg["diffusion"]["steps"]
    t = torch.tensor([0, T // 3, T - 1])
    kw = {}
    if a["num_classes"]:
        kw["y"] = torch.tensor([0, 417, 999])
    if a["kind"] == "superres":
        kw["low_res"] = torch.randn(3, 3, cfg["task"]["low_res"], cfg["task"]["low_res"], generator=g)
    want = ref.forward(state, a, x, t.float() * scale, **kw)
    with torch.no_grad():
        got = model(x, t, **kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-5, (got - want).abs().max().item()
    assert want.abs().max().item() > 0.1   # a real signal, not zeros


def test_attention_layout_and_timestep_scale_matter(tmp_path):
    """The checks above can fail: without the qkv permutation of the new attention order, or
    without the 1000/T timestep rescaling, the outputs differ by far more than 1e-5."""
    from gaussdiff.interop.openai import new_to_legacy_qkv
    state, a, _ = convert_case("guided-unet-new-order", tmp_path)
    model, _ = load_any(str(tmp_path / "guided-unet-new-order"))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 600]), torch.tensor([1, 2])
    unpermuted = dict(model.state_dict())
    for k in unpermuted:
        if k.endswith("qkv.weight") or k.endswith("qkv.bias"):
            unpermuted[k] = state[k].reshape(unpermuted[k].shape)
    with torch.no_grad():
        good = model(x, t, y=y)
        model.load_state_dict(unpermuted)
        bad = model(x, t, y=y)
    assert (good - bad).abs().max() > 1e-3
    w = torch.arange(12.0)[:, None]   # q|k|v of 2 heads of 2 -> per head q, k, v
    assert new_to_legacy_qkv(w, 2).flatten().tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    state, a, scale = convert_case("improved-unet", tmp_path)
    model, _ = load_any(str(tmp_path / "improved-unet"))
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([100, 3000]), torch.tensor([3, 4])
    with torch.no_grad():
        assert (model(x, t, y=y) - ref.forward(state, a, x, t.float(), y=y)).abs().max() > 1e-3


# original script_util.py defaults, copied independently of gaussdiff's tables
ORIGINAL = {
    "guided-diffusion": dict(
        image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
        num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
        class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
        use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
        noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
        rescale_timesteps=False, rescale_learned_sigmas=False),
    "improved-diffusion": dict(
        image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
        attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
        class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
        use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
        use_checkpoint=False, use_scale_shift_norm=True),
}
CLASSIFIER_KEYS = dict(image_size=64, classifier_use_fp16=False, classifier_width=128,
                       classifier_depth=2, classifier_attention_resolutions="32,16,8",
                       classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                       classifier_pool="attention")


def _flag_text(d):
    return " ".join(f"--{k} {v if v != '' else chr(34) * 2}" for k, v in d.items())


@pytest.mark.parametrize("codebase", list(ORIGINAL))
def test_every_default_key_is_accepted_with_the_scripts_defaults(codebase):
    """Every key of model_and_diffusion_defaults() (and the classifier and super-resolution
    defaults) is accepted; given no flags, the arguments are the script's defaults; an unknown
    key is a one-line error."""
    orig = ORIGINAL[codebase]
    args, read, _ = resolve_flags(parse_flag_string(_flag_text(orig)), codebase, "unet")
    assert args == orig and sorted(read) == sorted(orig)
    assert resolve_flags({}, codebase, "unet")[0] == orig
    sr = {k: v for k, v in orig.items() if k not in ("image_size", "channel_mult",
                                                     "use_new_attention_order", "sigma_small")}
    sr.update(large_size=256, small_size=64)
    assert resolve_flags({}, codebase, "superres")[0] == sr
    if codebase == "guided-diffusion":
        cls = dict(CLASSIFIER_KEYS, **{k: orig[k] for k in (
            "learn_sigma", "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl",
            "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas")})
        assert resolve_flags({}, codebase, "classifier")[0] == cls
    with pytest.raises(UsageError) as e:
        resolve_flags({"num_chanels": "64"}, codebase, "unet")
    assert "unknown flag --num_chanels" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags,codebase,expect", [
    ("", "guided-diffusion", dict(var_type="fixed_large", loss_type="mse", mean_type="eps")),
    ("--sigma_small True", "improved-diffusion", dict(var_type="fixed_small")),
    ("--learn_sigma True --diffusion_steps 4000", "improved-diffusion",   # RESCALED_MSE
     dict(var_type="learned_range", loss_type="hybrid", hybrid_lambda=0.001, steps=4000)),
    ("--learn_sigma True --diffusion_steps 4000", "guided-diffusion",     # MSE: mse + L_t
     dict(loss_type="hybrid", hybrid_lambda=1 / 4000)),
    ("--use_kl True --predict_xstart True", "guided-diffusion", dict(loss_type="kl", mean_type="x0")),
    ("--noise_schedule cosine --timestep_respacing ddim25", "guided-diffusion", dict(schedule="cosine")),
])
def test_diffusion_flags_map_onto_gaussdiff(flags, codebase, expect):
    """create_gaussian_diffusion's settings as gaussdiff's: mean type, variance type (learned
    range / fixed small / fixed large), loss (kl = RESCALED_KL; hybrid λ 0.001 = RESCALED_MSE,
    λ = 1/T = improved-diffusion's un-rescaled MSE + L_t) and schedule."""
    args, _, _ = resolve_flags(parse_flag_string(flags), codebase, "unet")
    section = diffusion_section(args)
    for k, v in expect.items():
        assert section[k] == pytest.approx(v) if isinstance(v, float) else section[k] == v, k
    gaussdiff.make_diffusion(**section)


def test_cli_convert_then_every_sampler_runs(tmp_path):
    """`gaussdiff convert-openai` from the command line (one process), then every gaussdiff
    sampler draws finite, distinct ADM-evaluator-compatible images from the converted
    class-conditional learned-variance model; the super-resolution model samples with low_res."""
    from gaussdiff.images import save_npz
    from gaussdiff.modeldir import SAMPLER_NAMES
    flags, a, _, _ = CASES["guided-unet-new-order"]
    torch.save(ref.random_state(a, 3), tmp_path / "ckpt.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "gaussdiff", "convert-openai", "ckpt.pt",
                           "--flags", flags + " --timestep_respacing 250 --model_path x.pt",
                           "--out", "conv"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "UNetModel of guided-diffusion" in proc.stdout and "learned_range" in proc.stdout
    assert "--steps 250" in proc.stdout and "model_path" in proc.stdout
    pipe = gaussdiff.load(str(tmp_path / "conv"), device="cpu")
    assert pipe.config["source"]["timestep_respacing"] == "250"
    for sampler in SAMPLER_NAMES:
        steps = 3 if sampler in ("ddpm", "ddim") else 2
        images, labels = pipe.sample(2, sampler, steps, seed=1, progress=False)
        assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3), sampler
        assert labels.shape == (2,) and images[0].tobytes() != images[1].tobytes(), sampler
    path = save_npz(str(tmp_path / "s.npz"), images, labels)
    with np.load(path, allow_pickle=False) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (2, 16, 16, 3)
    convert_case("guided-superres", tmp_path)
    sr = gaussdiff.load(str(tmp_path / "guided-superres"), device="cpu")
    low = torch.rand(2, 3, 32, 32) * 2 - 1
    for sampler in ("ddim", "heun"):
        up, _ = sr.sample(2, sampler, 2, low_res=low, progress=False)
        assert up.shape == (2, 64, 64, 3)


def _malicious_pickle(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"weight": Evil()}, path)


def test_convert_errors_are_one_line(tmp_path, capsys):
    """Unknown keys, flags that do not fit the checkpoint, undecidable defaults, a pickle that
    would run code (refused by weights_only=True: the code does not run) and a non-state-dict
    file: exit status 2 and one line each."""
    flags, a, _, _ = CASES["guided-unet-legacy"]
    torch.save(ref.random_state(a), tmp_path / "ok.pt")

    def run(ckpt, flag_string, out, *more):
        code = main(["convert-openai", str(tmp_path / ckpt), "--flags", flag_string, "--out",
                     str(tmp_path / out), *more])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert not (tmp_path / out).exists()
        return err[0]
    assert "unknown flag --colour" in run("ok.pt", flags + " --colour red", "o1")
    line = run("ok.pt", flags.replace("--num_channels 32", "--num_channels 64"), "o2")
    assert "ok.pt does not match --flags" in line and "num_channels" in line
    line = run("ok.pt", "--image_size 16 --channel_mult 1,2 --learn_sigma True --diffusion_steps 4000", "o3")
    assert "attention" in line or "does not match" in line
    line = run("ok.pt", "--num_channels 32 --num_res_blocks 1 --image_size 16 --diffusion_steps 4000", "o4")
    assert "rescale_timesteps" in line and "--codebase" in line
    assert "expected True or False" in run("ok.pt", flags + " --learn_sigma maybe", "o5")
    assert "large_size" in run("ok.pt", flags + " --large_size 64", "o6")
    marker = tmp_path / "pwned"
    _malicious_pickle(tmp_path / "evil.pt", marker)
    line = run("evil.pt", flags, "o7")
    assert "refused by the safe loader" in line and not marker.exists()
    assert "weights_only=False" not in line and "Re-running" not in line   # never the unsafe advice
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "expected a state dict" in run("tensor.pt", flags, "o8")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "junk.pt" in run("junk.pt", flags, "o9")


# ----------------------------------------------------------------------------- EDM datasets
def _png_bytes(arr):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_dataset_command_writes_edm_layout(tmp_path, capsys):
    """`gaussdiff dataset` turns an image folder (classes from subfolders), an .npz with labels and
    an IDX file pair into EDM's layout (zip or folder): PNGs named 00000/img00000000.png,
    dataset.json [[name, label], ...]; reading it back gives the same images and labels."""
    from gaussdiff.data import load_dataset
    rng = np.random.default_rng(0)
    folder = tmp_path / "folder"
    want = {}
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            im = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            (folder / cls / f"{i}.png").write_bytes(_png_bytes(im))
            want[(cls, i)] = im
    assert main(["dataset", str(folder), "--out", str(tmp_path / "f.zip")]) == 0
    assert "6 images of 8x8x3, 2 classes" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "f.zip") as zf:
        names = zf.namelist()
        meta = json.loads(zf.read("dataset.json"))
    assert names[:2] == ["00000/img00000000.png", "00000/img00000001.png"]
    assert meta["labels"][3] == ["00000/img00000003.png", 1] and meta["class_names"] == ["cat", "dog"]
    ds = load_dataset(str(tmp_path / "f.zip"), class_cond=True)
    np.testing.assert_array_equal(ds.images[4], want[("dog", 1)])
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.class_names == ["cat", "dog"]

    images = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images, np.array([4, 3, 2, 1, 0]))
    assert main(["dataset", str(tmp_path / "d.npz"), "--out", str(tmp_path / "edm_dir")]) == 0
    assert sorted(os.listdir(tmp_path / "edm_dir")) == ["00000", "dataset.json"]
    ds = load_dataset(str(tmp_path / "edm_dir"), class_cond=True)
    np.testing.assert_array_equal(ds.images, images)   # greyscale stays one channel
    assert ds.labels.tolist() == [4, 3, 2, 1, 0]

    idx = bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2 + images.tobytes()
    (tmp_path / "img-idx3-ubyte").write_bytes(idx)
    (tmp_path / "lab-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes([7, 7, 1, 1, 0]))
    assert main(["dataset", str(tmp_path / "img-idx3-ubyte"), "--labels",
                 str(tmp_path / "lab-idx1-ubyte"), "--out", str(tmp_path / "i.zip")]) == 0
    ds = load_dataset(str(tmp_path / "i.zip"), class_cond=True)
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels.tolist() == [7, 7, 1, 1, 0]
    capsys.readouterr()
    assert main(["dataset", str(tmp_path / "d.npz"), "--out", str(tmp_path / "i.zip")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no temporary leftovers


def test_training_reads_an_edm_zip(tmp_path):
    """A class-conditional training run reads an EDM zip with dataset.json labels."""
    from gaussdiff.training.trainer import DEFAULTS, Trainer
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for i in range(6):
            zf.writestr(f"00000/img{i:08d}.png", _png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
        zf.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", i % 2] for i in range(6)]}))
    o = dict(DEFAULTS, data=str(tmp_path / "d.zip"), class_cond=True, model_channels=32,
             channel_mult="1", attention_resolutions="0", diffusion_steps=50, batch_size=4,
             steps=1, save_every=1, sample_every=0, log_every=1, ema="0.9")
    tr = Trainer(o, str(tmp_path / "run"), device="cpu", progress=False).run()
    assert tr.config["model"]["num_classes"] == 2 and tr.config["model"]["in_channels"] == 1


# ----------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name", ["guided-unet-new-order", "guided-superres"])
def test_export_torchscript_reproduces_the_network(name, tmp_path, capsys):
    """`gaussdiff export-torchscript` writes a file that torch.jit.load alone runs, with
    config.json inside, reproducing the network's output (another batch size than traced)."""
    convert_case(name, tmp_path, seed=4)
    out = tmp_path / "net.pt"
    assert main(["export-torchscript", str(tmp_path / name), "--out", str(out)]) == 0
    extra = {"config.json": ""}
    net = torch.jit.load(str(out), _extra_files=extra)
    cfg = json.loads(extra["config.json"])
    model, _ = load_any(str(tmp_path / name))
    S = cfg["model"]["image_size"]
    x, t = torch.randn(5, 3, S, S), torch.tensor([0, 10, 500, 900, 999])
    args, kw = [x, t], {}
    if cfg["model"]["num_classes"]:
        args.append(torch.tensor([1, 2, 3, 4, 5]))
        kw["y"] = args[-1]
    if cfg.get("task"):
        args.append(torch.randn(5, 3, cfg["task"]["low_res"], cfg["task"]["low_res"]))
        kw["low_res"] = args[-1]
    with torch.no_grad():
        assert (net(*args) - model(x, t, **kw)).abs().max() < 1e-5


def test_export_torchscript_of_a_sigma_space_model_is_its_denoiser(tmp_path):
    """A σ-space model (config "precond") exports D(x; σ) with its preconditioning, the
    function its samplers call: the file's output equals gaussdiff.load(DIR).denoiser(x, σ),
    and is not the bare network's output."""
    import gaussdiff
    from gaussdiff.modeldir import CONFIG_NAME, atomic_write_json, read_config
    from guided_models import make_model_dir
    d = make_model_dir(tmp_path / "edm", num_classes=None, var_type="fixed_small")
    cfg = read_config(d)
    cfg["precond"] = {"type": "edm", "sigma_data": 0.5}
    atomic_write_json(os.path.join(d, CONFIG_NAME), cfg)
    out = tmp_path / "d.pt"
    assert main(["export-torchscript", d, "--out", str(out)]) == 0
    net = torch.jit.load(str(out))
    pipe = gaussdiff.load(d, device="cpu")
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.tensor([0.02, 1.0, 40.0])
    with torch.no_grad():
        ref = pipe.denoiser(x, sigma)
        got = net(x, sigma)
        assert (got - ref).abs().max() < 1e-5
        assert (got - pipe.model(x, sigma)).abs().max() > 1e-3

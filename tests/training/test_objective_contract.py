"""The objective contract (gaussdiff.diffusion.objectives): each training objective writes the
config sections it uses and nothing else, and directories written before the contract (a
σ-space model with the "diffusion" section it never used) still load and sample the same."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from gaussdiff.diffusion.objectives import (DISCRETE_OPTIONS, SIGMA_OPTIONS, ClassifierObjective,
                                            DiscreteObjective, SigmaObjective)
from gaussdiff.errors import UsageError
from gaussdiff.modeldir import load, read_config
from gaussdiff.training.classifier import ClassifierTrainer, load_classifier
from gaussdiff.training.trainer import DEFAULTS, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(model_channels=8, channel_mult="1", attention_resolutions="", norm_groups=4,
            batch_size=8, steps=1, save_every=1, sample_every=0, log_every=1, ema="0.9")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(path, rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 16))
    return str(path)


def train(data, out, **opts):
    return Trainer(dict(DEFAULTS, data=str(data), **TINY, **opts), str(out), device="cpu",
                   progress=False).run()


def config_of(run) -> dict:
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


def test_each_objective_writes_only_its_own_sections(data, tmp_path):
    """ddpm: a "diffusion" section and no σ-space options; edm: "precond" and "objective" and
    none of the discrete options (mean type, schedule, ...); the noisy classifier: only the
    schedule it was trained on."""
    ddpm = train(data, tmp_path / "ddpm", schedule="cosine", diffusion_steps=20)
    edm = train(data, tmp_path / "edm", objective="edm")
    assert isinstance(ddpm.objective, DiscreteObjective) and isinstance(edm.objective, SigmaObjective)
    c = config_of(tmp_path / "ddpm")
    assert c["diffusion"]["schedule"] == "cosine" and c["diffusion"]["steps"] == 20
    assert "precond" not in c and "objective" not in c
    assert not set(SIGMA_OPTIONS) & set(c["training"]) and set(DISCRETE_OPTIONS) <= set(c["training"])
    c = config_of(tmp_path / "edm")
    assert "diffusion" not in c and c["precond"]["type"] == "edm" and c["objective"]["type"] == "edm"
    assert not set(DISCRETE_OPTIONS) & set(c["training"]) and set(SIGMA_OPTIONS) <= set(c["training"])
    pipe = load(str(tmp_path / "edm"), device="cpu")
    assert pipe.diffusion is None and pipe.denoiser is not None
    with pytest.raises(UsageError, match="σ-space"):
        pipe.respaced(10)

    cls = ClassifierTrainer(dict(TINY, data=data, num_head_channels=8, attention_resolutions="8",
                                 schedule="cosine", diffusion_steps=20), str(tmp_path / "cls"),
                            device="cpu", progress=False).run()
    assert isinstance(cls.objective, ClassifierObjective)
    c = config_of(tmp_path / "cls")
    assert c["diffusion"] == {"schedule": "cosine", "steps": 20}
    assert not {"mean_type", "var_type", "loss"} & set(c["training"])
    classifier = load_classifier(str(tmp_path / "cls"), device="cpu")
    np.testing.assert_array_equal(classifier.alphas_cumprod, ddpm.objective.diffusion.alphas_cumprod)


def test_an_old_sigma_space_directory_loads_and_samples_the_same(data, tmp_path):
    """A σ-space run directory given the full "diffusion" section that directories written before
    the objective contract carry: it loads without it (diffusion None) and samples bit for bit
    as the new directory; so does the bundled EDM model, written in the old format."""
    train(data, tmp_path / "new", objective="edm")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    c = config_of(tmp_path / "old")
    c["diffusion"] = dict(schedule="linear", steps=1000, mean_type="eps", var_type="learned_range",
                          loss_type="hybrid", hybrid_lambda=0.001, vb_stop_grad=True)
    with open(tmp_path / "old" / "config.json", "w") as f:
        json.dump(c, f)
    old, new = load(str(tmp_path / "old"), device="cpu"), load(str(tmp_path / "new"), device="cpu")
    assert old.diffusion is None and "diffusion" not in old.config
    a, _ = old.sample(3, "heun", 4, seed=1, progress=False)
    b, _ = new.sample(3, "heun", 4, seed=1, progress=False)
    np.testing.assert_array_equal(a, b)

    bundled = os.path.join(ROOT, "models", "fashion-cond-edm")
    with open(os.path.join(bundled, "config.json")) as f:
        assert "diffusion" in json.load(f)   # the old format, on disk
    assert "diffusion" not in read_config(bundled) and load(bundled, device="cpu").diffusion is None


def test_the_discrete_objective_weights_losses_by_the_importance_weights():
    """DiscreteObjective.losses returns training_losses' terms unweighted (for the log) and
    their loss times 1/(T p_t), the unbiased estimate that is minimised."""
    from gaussdiff.diffusion import make_diffusion
    from gaussdiff.diffusion.objectives import Draw
    from gaussdiff.diffusion.timesteps import make_schedule_sampler
    diffusion = make_diffusion("cosine", 10)
    objective = DiscreteObjective(diffusion, make_schedule_sampler("uniform", 10), {})
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    draw = Draw(torch.tensor([0, 4, 9]), noise, torch.tensor([0.5, 1.0, 2.0]))
    per_sample, terms = objective.losses(lambda x, t: torch.zeros_like(x), x0, draw, {})
    want = diffusion.training_losses(lambda x, t: torch.zeros_like(x), x0, draw.levels, noise, {})
    torch.testing.assert_close(terms["loss"], want["loss"])
    torch.testing.assert_close(per_sample, want["loss"] * draw.weights)
    assert objective.quarters(draw).tolist() == [0, 1, 3]

"""The package layout of issue 14: every module that moved into a sub-package keeps its old
import path, as an alias of the new module (the same module object, so private names and
monkeypatching carry over); gaussdiff.diffusion, now a package, re-exports the former module's
public names, and gaussdiff.cli, now a package, keeps the command line's entry points."""
import importlib
import subprocess
import sys

import pytest

MOVED = {   # old path -> new path
    "gaussdiff.schedules": "gaussdiff.diffusion.schedules",
    "gaussdiff.precond": "gaussdiff.diffusion.precond",
    "gaussdiff.losses": "gaussdiff.diffusion.gaussian",
    "gaussdiff.resample": "gaussdiff.diffusion.timesteps",
    "gaussdiff.train": "gaussdiff.training.trainer",
    "gaussdiff.train_eval": "gaussdiff.training.evaluation",
    "gaussdiff.checkpoint": "gaussdiff.training.checkpoint",
    "gaussdiff.amp": "gaussdiff.training.precision",
    "gaussdiff.guard": "gaussdiff.training.guard",
    "gaussdiff.presets": "gaussdiff.training.presets",
    "gaussdiff.perf": "gaussdiff.training.batch_size",
    "gaussdiff.classifier": "gaussdiff.training.classifier",
    "gaussdiff.samplers": "gaussdiff.sampling.samplers",
    "gaussdiff.denoisers": "gaussdiff.sampling.denoisers",
    "gaussdiff.guidance": "gaussdiff.sampling.guidance",
    "gaussdiff.tools": "gaussdiff.sampling.editing",
    "gaussdiff.ensemble": "gaussdiff.sampling.ensemble",
    "gaussdiff.sharded": "gaussdiff.sampling.sharded",
    "gaussdiff.cli_metrics": "gaussdiff.cli.metrics",
    "gaussdiff.cli_tools": "gaussdiff.cli.tools",
    "gaussdiff.cli_interop": "gaussdiff.cli.interop",
    "gaussdiff.cli_analyze": "gaussdiff.cli.analyze",
    "gaussdiff.cli_common": "gaussdiff.cli.common",
}


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_import_path_is_the_new_module(old, new):
    module = importlib.import_module(new)
    assert importlib.import_module(old) is module
    parent, name = old.rsplit(".", 1)
    assert getattr(importlib.import_module(parent), name) is module   # `from gaussdiff import x`


def test_old_import_paths_in_a_fresh_interpreter():
    """Each old path imports first thing in a new process (no import circle through the aliases)."""
    code = ("import importlib, sys\n"
            f"for old, new in {sorted(MOVED.items())!r}:\n"
            "    assert importlib.import_module(old) is sys.modules[new], old\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_diffusion_package_reexports_the_process_module():
    import gaussdiff
    import gaussdiff.diffusion as pkg
    from gaussdiff.diffusion import gaussian, process
    public = [n for n, v in vars(process).items() if not n.startswith("_")
              and getattr(v, "__module__", process.__name__) == process.__name__
              and not isinstance(v, type(sys))]
    assert {"GaussianDiffusion", "make_diffusion", "MEAN_TYPES", "VAR_TYPES", "FIXED_VAR_TYPES",
            "LOSS_TYPES"} <= set(public)
    for name in public + ["normal_kl", "discretized_gaussian_log_likelihood", "mean_flat"]:
        assert getattr(pkg, name) is getattr(process, name), name
    assert pkg.mean_flat is gaussian.mean_flat
    assert gaussdiff.GaussianDiffusion is process.GaussianDiffusion
    assert gaussdiff.schedules is importlib.import_module("gaussdiff.diffusion.schedules")


def test_monkeypatching_an_old_path_reaches_the_new_module(monkeypatch):
    """The aliases are the modules themselves: a patch through the old path is seen by the code
    that uses the new one (here Trainer's checkpoint writer, as tests and users patch it)."""
    import gaussdiff.train as old
    from gaussdiff.training import trainer
    marker = object()
    monkeypatch.setattr("gaussdiff.train.write_checkpoint", marker)
    assert trainer.write_checkpoint is marker and old.write_checkpoint is marker


def test_cli_entry_points():
    """pyproject's console script (gaussdiff.cli:main) and `python -m gaussdiff` reach the
    command line, and every subcommand, from the package and from the moved modules, is there."""
    import pathlib
    from gaussdiff.cli import build_parser
    pyproject = pathlib.Path(__file__).parent.parent / "pyproject.toml"
    assert 'gaussdiff = "gaussdiff.cli:main"' in pyproject.read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "sample", "export", "plot", "eval", "nll", "train-feature-net", "sweep",
            "train-classifier", "invert", "interpolate", "inpaint", "convert-openai", "dataset",
            "export-torchscript", "analyze"} <= set(sub.choices)
    out = subprocess.run([sys.executable, "-m", "gaussdiff", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("gaussdiff ")

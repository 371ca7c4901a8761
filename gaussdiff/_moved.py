"""Old import paths of the modules that moved into sub-packages (issue 14's layout).

`import gaussdiff.train` (or `from gaussdiff import tools`) still works: a finder on
`sys.meta_path` answers each old name with the new module itself (the same module object, so
private names and monkeypatching carry over), instead of 23 stub files at the top level.
"""
import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {   # old name under gaussdiff -> new module
    "schedules": "diffusion.schedules", "precond": "diffusion.precond",
    "losses": "diffusion.gaussian", "resample": "diffusion.timesteps",
    "train": "training.trainer", "train_eval": "training.evaluation",
    "checkpoint": "training.checkpoint", "amp": "training.precision", "guard": "training.guard",
    "presets": "training.presets", "perf": "training.batch_size", "classifier": "training.classifier",
    "samplers": "sampling.samplers", "denoisers": "sampling.denoisers",
    "guidance": "sampling.guidance", "tools": "sampling.editing", "ensemble": "sampling.ensemble",
    "sharded": "sampling.sharded",
    "cli_metrics": "cli.metrics", "cli_tools": "cli.tools", "cli_interop": "cli.interop",
    "cli_analyze": "cli.analyze", "cli_common": "cli.common",
    "sweep": "metrics.sweep", "convert_openai": "interop.openai", "export": "interop.torchscript",
}
PACKAGE = __name__.rpartition(".")[0]


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == PACKAGE and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        # the new module; the import system sets only attributes it lacks, so its own
        # __name__, __spec__ and __file__ stay
        return importlib.import_module(f"{PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass   # already executed under its new name


def install():
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())

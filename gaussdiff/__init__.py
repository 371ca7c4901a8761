"""gaussdiff: Gaussian diffusion image models (DDPM, Improved DDPM, ADM, EDM) in one design space."""
from .version import __version__  # noqa: F401
from ._moved import install as _install_moved

_install_moved()   # old module paths (gaussdiff.train, gaussdiff.tools, ...) keep working

from .diffusion import schedules  # noqa: F401
from .diffusion import GaussianDiffusion, make_diffusion  # noqa: F401
from .errors import UsageError  # noqa: F401
from . import modeldir


def load(path, **kwargs):
    """Load a model directory (config.json + *.safetensors) as a `Pipeline`."""
    return modeldir.load(path, **kwargs)

"""Moved to gaussdiff.diffusion.timesteps; this alias keeps old imports working."""
import sys

from .diffusion import timesteps as _m

sys.modules[__name__] = _m

"""Moved to gaussdiff.diffusion.schedules; this alias keeps old imports working."""
import sys

from .diffusion import schedules as _m

sys.modules[__name__] = _m

"""Moved to gaussdiff.diffusion.gaussian; this alias keeps old imports working."""
import sys

from .diffusion import gaussian as _m

sys.modules[__name__] = _m

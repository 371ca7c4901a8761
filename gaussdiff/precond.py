"""Moved to gaussdiff.diffusion.precond; this alias keeps old imports working."""
import sys

from .diffusion import precond as _m

sys.modules[__name__] = _m

"""Moved to gaussdiff.sampling.editing; this alias keeps old imports working."""
import sys

from .sampling import editing as _m

sys.modules[__name__] = _m

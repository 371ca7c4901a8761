"""Moved to gaussdiff.sampling.guidance; this alias keeps old imports working."""
import sys

from .sampling import guidance as _m

sys.modules[__name__] = _m

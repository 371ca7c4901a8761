"""Moved to gaussdiff.sampling.ensemble; this alias keeps old imports working."""
import sys

from .sampling import ensemble as _m

sys.modules[__name__] = _m

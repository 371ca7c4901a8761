"""Moved to gaussdiff.sampling.samplers; this alias keeps old imports working."""
import sys

from .sampling import samplers as _m

sys.modules[__name__] = _m

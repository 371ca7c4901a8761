"""Moved to gaussdiff.sampling.denoisers; this alias keeps old imports working."""
import sys

from .sampling import denoisers as _m

sys.modules[__name__] = _m

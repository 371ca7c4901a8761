"""Moved to gaussdiff.training.precision; this alias keeps old imports working."""
import sys

from .training import precision as _m

sys.modules[__name__] = _m

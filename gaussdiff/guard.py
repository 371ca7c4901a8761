"""Moved to gaussdiff.training.guard; this alias keeps old imports working."""
import sys

from .training import guard as _m

sys.modules[__name__] = _m

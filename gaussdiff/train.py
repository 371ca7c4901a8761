"""Moved to gaussdiff.training.trainer; this alias keeps old imports working."""
import sys

from .training import trainer as _m

sys.modules[__name__] = _m

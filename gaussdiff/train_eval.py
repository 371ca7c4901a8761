"""Moved to gaussdiff.training.evaluation; this alias keeps old imports working."""
import sys

from .training import evaluation as _m

sys.modules[__name__] = _m

"""Moved to gaussdiff.sampling.sharded; this alias keeps old imports working."""
import sys

from .sampling import sharded as _m

sys.modules[__name__] = _m

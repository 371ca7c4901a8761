"""Moved to gaussdiff.cli.analyze; this alias keeps old imports working."""
import sys

from .cli import analyze as _m

sys.modules[__name__] = _m

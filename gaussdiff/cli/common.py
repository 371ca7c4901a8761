"""Argument helpers shared by the command modules (cli, cli.tools, ...): parsing what several
commands take alike. Reading their images (`load_images`, `first_images`) is gaussdiff.data's,
so that metrics/sweep.py, a library module, has it without importing the cli package (an import
circle: cli -> cli.metrics -> metrics.sweep -> cli)."""
from __future__ import annotations

import argparse


def _bool(text: str) -> bool:
    t = str(text).lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")

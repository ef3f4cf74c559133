"""Argument types for the command lines: a number checked where it is parsed, so a bad flag is one usage line;
and the parser that prints a usage error once, not once per rank (``RankZeroParser``).

Shared by the programs; nothing here imports NumPy or MPI, so a launcher stays light."""
from __future__ import annotations

import argparse
import math


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def weight(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


class RankZeroParser(argparse.ArgumentParser):
    """Usage errors printed once: by rank 0 only when an MPI launcher started every rank (exit 2 everywhere)."""

    def error(self, message):
        from ddp_cnn.dist.launcher import launcher_rank
        if launcher_rank() not in (None, 0):
            self.exit(2)
        super().error(message)

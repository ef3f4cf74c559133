"""Weight initialisers: He (Kaiming) and Glorot (Xavier), normal and uniform; a small one for logits.

Every initialiser draws on the host from a NumPy generator, so the same seed
gives the same initial model on CPU and GPU and on every rank.
"""
from __future__ import annotations

import math

import numpy as np


def he_normal(rng, shape, fan_in, fan_out, gain=math.sqrt(2.0)):
    return rng.normal(0.0, gain / math.sqrt(fan_in), size=shape)


def he_uniform(rng, shape, fan_in, fan_out, gain=math.sqrt(2.0)):
    bound = gain * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape)


def glorot_normal(rng, shape, fan_in, fan_out):
    return rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), size=shape)


def glorot_uniform(rng, shape, fan_in, fan_out):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def classifier(rng, shape, fan_in, fan_out):
    """For the layer that outputs the logits: Glorot uniform scaled by 0.1.

    With Glorot alone the logits' std is about sqrt(2) x the rms of the
    features (fan_out = 10 << fan_in), and in training each dropout layer
    before it multiplies their second moment by 1/(1 - rate): fmnist-cnn
    started at a loss of 9-12 instead of ln 10 = 2.30, its first steps spent
    undoing overconfident guesses.  A tenth of that keeps the first loss near
    ln(classes) (Karpathy's "verify loss @ init").  Not zeros: with W = 0 no
    gradient would reach the layers below on the first step.
    """
    return 0.1 * glorot_uniform(rng, shape, fan_in, fan_out)


def zeros(rng, shape, fan_in, fan_out):
    return np.zeros(shape)


def ones(rng, shape, fan_in, fan_out):
    return np.ones(shape)


INITIALIZERS = {
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
    "xavier_normal": glorot_normal,
    "xavier_uniform": glorot_uniform,
    "classifier": classifier,
    "zeros": zeros,
    "ones": ones,
}


def get(name: str):
    """The initialiser called `name` (or ``const:VALUE``); ValueError listing the known names otherwise."""
    if name.startswith("const:"):
        value = float(name.split(":", 1)[1])
        return lambda rng, shape, fan_in, fan_out: np.full(shape, value)
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown initialiser {name!r}; expected one of {sorted(INITIALIZERS)}") from None

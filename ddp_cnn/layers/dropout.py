"""Inverted dropout with masks keyed by (seed, stream, rank, step, layer)."""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..backend import STREAM_DROPOUT
from .base import Layer


class Dropout(Layer):
    """Inverted dropout: scaled at train time, the identity at eval time.

    The mask comes from a key the model sets before each step
    (seed, stream, rank, step, layer index), so runs and resumes are
    reproducible: on the CPU one draw of ``default_rng(key)`` over the whole
    batch, on a GPU a counter-based hash (kernels.dropout_mask).  A batch
    that is part of a bigger one (``first_row`` > 0: a micro-batch, a rank's
    share of a global batch) continues that draw where its rows begin, so
    on the CPU each row gets the mask it would get in the whole batch.
    """

    def __init__(self, rate: float, name=None):
        super().__init__(name)
        self._remember(locals())
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.key = (0, STREAM_DROPOUT, 0, 0, 0)
        self.first_row = 0

    def forward(self, x, train=False):
        self.check_input(x)
        if not train or self.rate == 0.0:
            self.mask = None
            return x
        offset = self.first_row * (x.size // max(x.shape[0], 1))  # values drawn for the rows before
        if self.gpu:
            self.mask = kernels.dropout_mask(x.shape, self.rate, self.key, self.xp, self.dtype, offset=offset)
        else:
            self.mask = kernels.dropout_mask(x.shape, self.rate, self.key, self.xp, self.dtype,
                                             self.buffer("mask", x.shape), self.buffer("uniform", x.shape, np.float32),
                                             offset=offset)
        return self.xp.multiply(x, self.mask, out=self.buffer("out", x.shape))

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        if self.mask is None:
            return dy
        # The forward output's buffer: the next layer's backward, the last reader of it, has run.
        return self.xp.multiply(dy, self.mask, out=self.buffer("out", dy.shape))

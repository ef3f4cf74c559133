"""Batch normalisation over every axis but the last (channels or features), optionally over
the global batch (SyncBatchNorm)."""
from __future__ import annotations

import time

import numpy as np

from ddp_cnn.model import kernels
from ddp_cnn.model.layers.base import Layer, ParamSpec


class SyncStatistics:
    """Means over the ranks of ``comm`` of a few per-channel sums, each wait bounded by ``timeout``
    seconds (0: none): what a BatchNorm layer needs to normalise over the global batch."""

    def __init__(self, comm, timeout: float = 0.0):
        self.comm, self.timeout = comm, timeout

    def mean(self, values):
        """``values`` (a contiguous 1-D array that stays alive) averaged over ranks, in place."""
        deadline = time.monotonic() + self.timeout if self.timeout else None
        self.comm.allreduce_mean(values).wait(deadline)
        return values


class BatchNorm(Layer):
    """Batch normalisation over every axis but the last (channels or features).

    Train mode normalises with the local batch statistics (under data
    parallelism each rank uses its own batch, like PyTorch DDP) and updates
    running statistics; eval mode uses the running statistics.  With
    ``sync`` set (a :class:`SyncStatistics`; ``train --sync-bn``) the
    statistics are those of the global batch: the per-channel sums and the
    counts are averaged over ranks in forward (mean, then the variance about
    it) and backward (the sums of dy and dy*xhat), so N ranks compute what
    one rank computes with the whole batch.
    Training on one value per channel (a local batch of 1 on a dense layer,
    or of one 1x1 image) raises ValueError, as PyTorch does.

    Both implementations take per-channel sums as GEMVs (ones @ rows) and
    write xhat and y (forward) or dx (backward) in one pass over (pixels,
    channels) rows: ~10 full-array NumPy passes, each with a fresh
    temporary, become 2-3.  On a GPU the passes are CUDA kernels (cuda_kernels).
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, name=None):
        super().__init__(name)
        self._remember(locals())
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.sync = None  # a SyncStatistics: normalise over the global batch

    def _build(self, input_shape):
        self.c = input_shape[-1]
        self.buffers = {"running_mean": self.xp.zeros(self.c, self.dtype),
                        "running_var": self.xp.ones(self.c, self.dtype)}
        self._forward = self._forward_gpu if self.gpu else self._forward_cpu
        self._backward = self._backward_gpu if self.gpu else self._backward_cpu
        return input_shape

    def param_specs(self):
        return [ParamSpec("gamma", (self.c,), "ones"), ParamSpec("beta", (self.c,), "zeros")]

    def forward(self, x, train=False):
        self.check_input(x)
        if train and x.size == self.c:  # one value per channel: x - mean = 0, the output would be beta
            raise ValueError(f"layer {self.name!r}: expected more than 1 value per channel in training, got input "
                             f"of shape {tuple(x.shape)} (a batch of 1 without pixels to average over)")
        return self._forward(x, train)

    def backward(self, dy, need_dx=True):
        return self._backward(dy, need_dx)

    def _statistics(self, train, m, batch_statistics):
        """(mean, var) to normalise with: in train mode the batch's, from
        batch_statistics() -> (mean, var, count), folded into the running statistics; else the running ones."""
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        if not train or (m == 0 and self.sync is None):  # an empty batch has no statistics
            return rm, rv
        mean, var, m = batch_statistics()
        rm *= 1 - self.momentum
        rm += self.momentum * mean
        rv *= 1 - self.momentum
        rv += self.momentum * var * (m / max(m - 1, 1))  # unbiased, as PyTorch keeps it
        return mean, var

    def _global_statistics(self, rows, sums):
        """(mean, var, count) over every rank's rows: ``sums(rows, minus=None)`` gives this rank's
        per-channel float64 sums of rows (or of (rows - minus)**2).  Two averaged exchanges: the
        sums with the count, then the squares about the global mean."""
        xp, c = self.xp, self.c
        first = self.scratch.get("sync_sums", (c + 1,), np.float64, xp)  # a fixed buffer for the comm
        first[:c] = sums(rows)
        first[c] = rows.shape[0]
        self.sync.mean(first)  # means over ranks: mean sum / mean count = global mean
        count = first[c]
        mean = first[:c] / count
        second = self.scratch.get("sync_squares", (c,), np.float64, xp)
        second[...] = sums(rows, minus=mean.astype(rows.dtype))
        self.sync.mean(second)
        return mean, second / count, int(round(float(count) * self.sync.comm.size))

    def _global_slopes(self, dbeta, dgamma, m):
        """(mean of dy, mean of dy*xhat) per channel over the global batch, from this rank's sums."""
        xp, c = self.xp, self.c
        v = self.scratch.get("sync_grads", (2 * c + 1,), np.float64, xp)
        v[:c], v[c:2 * c], v[2 * c] = dbeta, dgamma, m
        self.sync.mean(v)
        return v[:c] / v[2 * c], v[c:2 * c] / v[2 * c]

    # ---- GPU -----------------------------------------------------------------
    def _forward_gpu(self, x, train):
        from ddp_cnn.model import cuda_kernels
        x2 = self.xp.ascontiguousarray(x).reshape(-1, self.c)
        ones = self.scratch.ones("ones", x2.shape[0], x2.dtype, self.xp)

        def batch_statistics():
            if self.sync is None:
                return (*cuda_kernels.batchnorm_statistics(x2, ones), x2.shape[0])

            def sums(rows, minus=None):
                part = rows if minus is None else cuda_kernels._centred_square(rows, minus)
                return cuda_kernels.channel_sums(part, ones).astype(np.float64)
            mean, var, m = self._global_statistics(x2, sums)
            return mean.astype(x2.dtype), var.astype(x2.dtype), m
        mean, var = self._statistics(train, x2.shape[0], batch_statistics)
        self.batch_stats = train
        self.invstd = 1.0 / self.xp.sqrt(var + self.eps)
        self.xhat, y = cuda_kernels.batchnorm_normalise(x2, mean, self.invstd, self.params["gamma"],
                                                       self.params["beta"])
        return y.reshape(x.shape)

    def _backward_gpu(self, dy, need_dx):
        from ddp_cnn.model import cuda_kernels
        dy2 = self.xp.ascontiguousarray(dy).reshape(-1, self.c)
        m = dy2.shape[0]
        ones = self.scratch.ones("ones", m, dy2.dtype, self.xp)
        self.grads["beta"][...] = cuda_kernels.channel_sums(dy2, ones)
        self.grads["gamma"][...] = cuda_kernels.channel_sums(dy2 * self.xhat, ones)
        xhat, self.xhat = self.xhat, None
        if not need_dx:
            return None
        scale = self.params["gamma"] * self.invstd
        if not self.batch_stats:  # eval mode: statistics are constants
            return (dy2 * scale).reshape(dy.shape)
        # d/dx of (x - mean(x)) / std(x), with both statistics depending on x.
        if self.sync is None:
            shift, slope = self.grads["beta"] / max(m, 1), self.grads["gamma"] / max(m, 1)
        else:
            shift, slope = (v.astype(dy2.dtype) for v in self._global_slopes(self.grads["beta"], self.grads["gamma"], m))
        dx = cuda_kernels.batchnorm_backward(dy2, xhat, scale, shift, slope)
        return dx.reshape(dy.shape)

    # ---- CPU -----------------------------------------------------------------
    def _channel_sums(self, rows, times=None, minus=None):
        """Per-channel float64 sums over `rows` of rows, (rows - minus)**2 or rows * times,
        an L2-sized block of rows at a time, each block's sums a GEMV (ones @ block)."""
        m, c = rows.shape
        total = np.zeros(c)
        if m == 0:
            return total
        block = min(m, max(1, kernels.L2_BYTES // (4 * c * rows.itemsize)))
        ones = self.scratch.ones("ones", block, rows.dtype, np)
        tmp = self.scratch.get("block", (block, c), rows.dtype, np)
        for a in range(0, m, block):
            b = min(m, a + block)
            part = rows[a:b]
            if minus is not None:
                part = np.subtract(part, minus, out=tmp[:b - a])
                part *= part
            elif times is not None:
                part = np.multiply(part, times[a:b], out=tmp[:b - a])
            total += ones[:b - a] @ part
        return total

    def _forward_cpu(self, x, train):
        x2 = x.reshape(-1, self.c)
        m = x2.shape[0]

        def batch_statistics():  # two passes: the variance about the mean, not E[x^2] - mean^2
            if self.sync is not None:
                return self._global_statistics(x2, self._channel_sums)
            mean = self._channel_sums(x2) / m
            return mean, self._channel_sums(x2, minus=mean.astype(x.dtype)) / m, m
        mean, var = self._statistics(train, m, batch_statistics)
        self.batch_stats = train
        self.invstd = (1.0 / np.sqrt(var + self.eps)).astype(x.dtype)
        mean = np.asarray(mean, dtype=x.dtype)
        xhat = self.xhat = self.buffer("xhat", x2.shape, reuse=train)
        # C-contiguous, so that y2 below is a view of y (empty_like would keep a transposed x's layout).
        y = self.buffer("y", x.shape, reuse=train)
        y2 = y.reshape(-1, self.c)
        np.subtract(x2, mean, out=xhat)
        xhat *= self.invstd
        np.multiply(xhat, self.params["gamma"], out=y2)
        y2 += self.params["beta"]
        return y

    def _backward_cpu(self, dy, need_dx):
        dy2, xhat = dy.reshape(-1, self.c), self.xhat
        m = dy2.shape[0]
        dbeta, dgamma = self._channel_sums(dy2), self._channel_sums(dy2, times=xhat)
        self.grads["beta"][...] = dbeta
        self.grads["gamma"][...] = dgamma
        self.xhat = None
        if not need_dx:
            return None
        dtype = dy.dtype.type
        scale = self.params["gamma"] * self.invstd
        # d/dx of (x - mean(x)) / std(x), both statistics depending on x (train),
        # or constants (eval): gamma invstd (dy - mean(dy) - xhat mean(dy xhat)).
        if not self.batch_stats:
            shift, slope = dtype(0), dtype(0)
        elif self.sync is not None:
            shift, slope = (v.astype(dtype) for v in self._global_slopes(dbeta, dgamma, m))
        else:
            shift, slope = (dbeta / max(m, 1)).astype(dtype), (dgamma / max(m, 1)).astype(dtype)
        dx = self.buffer("dx", dy.shape)
        dx2 = dx.reshape(-1, self.c)
        np.multiply(xhat, slope, out=dx2)
        dx2 += shift
        np.subtract(dy2, dx2, out=dx2)
        dx2 *= scale
        return dx

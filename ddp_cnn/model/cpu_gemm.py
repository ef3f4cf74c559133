"""Compiled CPU convolution and dense layers (Numba): the GEMM-bound twins of :mod:`ddp_cnn.model.cpu_kernels`.

The convolution runs a cache-sized chunk of images per task, im2col + GEMM + bias, and Dense blocks of rows or
features, so their GEMMs run one per core without BLAS threads waiting for each other.  Their GEMMs are cut into
other blocks than the NumPy path's, so they agree with it to rounding; no kernel reduces across threads (dW is
summed chunk by chunk in chunk order), so results do not depend on the thread count.  Which path runs, the
thread count and SciPy's BLAS settings are :mod:`~ddp_cnn.model.cpu_kernels`' (``active``)."""
from __future__ import annotations

import numpy as np

from ddp_cnn.model import cpu_kernels

if cpu_kernels.numba is not None:
    from numba import njit, prange

    _jit = njit(cache=True, nogil=True, parallel=True)

    # ---- convolution as chunks of im2col + GEMM, one chunk per thread at a time ----

    @njit(cache=True, nogil=True)
    def _im2col_chunk(x, a, b, kh, kw, stride, pt, pl, oh, ow, rows):
        """The im2col rows of images a..b-1 of x into rows ((b-a)*OH*OW, KH*KW*C); padding reads as 0."""
        h, wd, c = x.shape[1], x.shape[2], x.shape[3]
        per = oh * ow
        for im in range(a, b):
            for i in range(oh):
                for j in range(ow):
                    r = (im - a) * per + i * ow + j
                    for p in range(kh):
                        yy = i * stride + p - pt
                        for q in range(kw):
                            xx = j * stride + q - pl
                            base = (p * kw + q) * c
                            if 0 <= yy < h and 0 <= xx < wd:
                                for ch in range(c):
                                    rows[r, base + ch] = x[im, yy, xx, ch]
                            else:
                                for ch in range(c):
                                    rows[r, base + ch] = 0

    @_jit
    def _conv_forward(x, w, bias, use_bias, kh, kw, stride, pt, pl, oh, ow, chunk, y):
        n = x.shape[0]
        per = oh * ow
        for ci in prange((n + chunk - 1) // chunk):
            a, b = ci * chunk, min(n, ci * chunk + chunk)
            rows = np.empty(((b - a) * per, w.shape[0]), dtype=x.dtype)
            _im2col_chunk(x, a, b, kh, kw, stride, pt, pl, oh, ow, rows)
            out = y[a * per:b * per]
            np.dot(rows, w, out)
            if use_bias:
                for r in range(out.shape[0]):
                    for f in range(out.shape[1]):
                        out[r, f] += bias[f]

    @_jit
    def _conv_backward(x, dy, w_t, need_dx, kh, kw, stride, pt, pl, oh, ow, chunk, dw_parts, db_parts, dx):
        n, h, wd, c = x.shape
        per, k = oh * ow, kh * kw * c
        for ci in prange((n + chunk - 1) // chunk):
            a, b = ci * chunk, min(n, ci * chunk + chunk)
            rows = np.empty(((b - a) * per, k), dtype=x.dtype)  # im2col again: cheaper than keeping it
            _im2col_chunk(x, a, b, kh, kw, stride, pt, pl, oh, ow, rows)
            g = dy[a * per:b * per]
            np.dot(rows.T, g, dw_parts[ci])
            part = db_parts[ci]
            part[:] = 0
            for r in range(g.shape[0]):
                for f in range(g.shape[1]):
                    part[f] += g[r, f]
            if not need_dx:
                continue
            np.dot(g, w_t, rows)  # dcols, in the rows' place
            dx[a:b] = 0
            for im in range(a, b):
                for i in range(oh):
                    for j in range(ow):
                        r = (im - a) * per + i * ow + j
                        for p in range(kh):
                            yy = i * stride + p - pt
                            if yy < 0 or yy >= h:
                                continue
                            for q in range(kw):
                                xx = j * stride + q - pl
                                if xx < 0 or xx >= wd:
                                    continue
                                base = (p * kw + q) * c
                                for ch in range(c):
                                    dx[im, yy, xx, ch] += rows[r, base + ch]

    @njit(cache=True, nogil=True)
    def _sum_parts(parts, out):
        """out = parts[0] + parts[1] + ..., in that order for every element: on the calling thread
        (a few thousand adds; waking the other threads would cost more)."""
        flat = parts.reshape(parts.shape[0], -1)
        dst = out.reshape(-1)
        for e in range(dst.size):
            s = flat[0, e]
            for t in range(1, flat.shape[0]):
                s += flat[t, e]
            dst[e] = s

    # ---- dense: row blocks for y and dx, input-feature blocks for dW (no sum across threads) ----

    @njit(cache=True, nogil=True)
    def _dense_rows(x, w, bias, use_bias, a, b, y):
        out = y[a:b]
        np.dot(x[a:b], w, out)
        if use_bias:
            for r in range(out.shape[0]):
                for f in range(out.shape[1]):
                    out[r, f] += bias[f]

    @njit(cache=True, nogil=True)
    def _dense_grad_task(t, x, dy, w, block, n_dw, dw, dx):
        """Task t: dW for input features block t, or (t >= n_dw) dx for row block t - n_dw."""
        n, d = x.shape
        if t < n_dw:
            a, b = t * block, min(d, t * block + block)
            x_t = np.empty((b - a, n), dtype=x.dtype)
            for i in range(n):
                for j in range(a, b):
                    x_t[j - a, i] = x[i, j]
            np.dot(x_t, dy, dw[a:b])
        else:
            a, b = (t - n_dw) * block, min(n, (t - n_dw) * block + block)
            np.dot(dy[a:b], w.T, dx[a:b])

    @_jit
    def _dense_forward(x, w, bias, use_bias, block, parallel, y):
        n = x.shape[0]
        if parallel:
            for bi in prange((n + block - 1) // block):
                _dense_rows(x, w, bias, use_bias, bi * block, min(n, bi * block + block), y)
        else:
            for bi in range((n + block - 1) // block):
                _dense_rows(x, w, bias, use_bias, bi * block, min(n, bi * block + block), y)

    @_jit
    def _dense_backward(x, dy, w, need_dx, block, parallel, dw, db, dx):
        n, d = x.shape
        n_dw = (d + block - 1) // block
        tasks = n_dw + ((n + block - 1) // block if need_dx else 0)
        if parallel:  # dW and dx in one parallel region
            for t in prange(tasks):
                _dense_grad_task(t, x, dy, w, block, n_dw, dw, dx)
        else:
            for t in range(tasks):
                _dense_grad_task(t, x, dy, w, block, n_dw, dw, dx)
        db[:] = 0
        for r in range(n):
            for f in range(dy.shape[1]):
                db[f] += dy[r, f]


def conv_forward(x, w, bias, kh, kw, stride, pads, oh, ow, chunk, y):
    """Conv2D forward on NHWC `x`, a `chunk` of images per task: im2col into the task's own
    rows (padding read as zeros, no padded copy), one GEMM with `w` (K, F), the bias, into
    y (N*OH*OW, F).  Nothing is kept: backward builds the rows again from x.
    Twin: Conv2D's NumPy forward (pad, kernels.im2col_into, matmul, + bias)."""
    (pt, _), (pl, _) = pads
    use_bias = bias is not None
    bias = bias if use_bias else np.zeros(w.shape[1], dtype=x.dtype)
    _conv_forward(x, w, bias, use_bias, kh, kw, stride, pt, pl, oh, ow, chunk, y)
    return y


def conv_backward(x, dy, w_t, kh, kw, stride, pads, oh, ow, chunk, dw, db, dx):
    """Conv2D backward from the forward's input x, a chunk per task: the chunk's im2col rows
    again, dW (K, F) and db (F,) as per-chunk partial sums added in chunk order (the same
    result whatever the thread count), and dx into `dx` (N, H, W, C) unless it is None.
    `w_t`: the weights as (F, K), C-contiguous."""
    (pt, _), (pl, _) = pads
    n_chunks = -(-x.shape[0] // chunk)
    dw_parts = np.empty((n_chunks,) + dw.shape, dtype=dy.dtype)
    db_parts = np.empty((n_chunks, dy.shape[1]), dtype=dy.dtype)
    need_dx = dx is not None
    dx_arr = dx if need_dx else np.empty((0, 0, 0, 0), dtype=dy.dtype)
    _conv_backward(x, dy, w_t, need_dx, kh, kw, stride, pt, pl, oh, ow, chunk, dw_parts, db_parts, dx_arr)
    _sum_parts(dw_parts, dw)
    if db is not None:
        _sum_parts(db_parts, db)
    return dx


DENSE_BLOCK = 64  # rows of y and dx, or input features of dW, per task
DENSE_PARALLEL_MIN = 1 << 22  # multiply-adds below which a dense layer runs on the calling thread


def dense_forward(x, w, bias, y):
    """y = x @ w (+ bias), DENSE_BLOCK rows per task, into `y` (twin: Dense's matmul + bias)."""
    use_bias = bias is not None
    _dense_forward(x, w, bias if use_bias else np.zeros(w.shape[1], dtype=x.dtype), use_bias, DENSE_BLOCK,
                   x.size * w.shape[1] >= DENSE_PARALLEL_MIN, y)
    return y


def dense_backward(x, dy, w, dw, db, dx):
    """dW = x.T @ dy by blocks of input features, db = dy summed over rows in row order (into
    `db` unless None), dx = dy @ w.T by row blocks into `dx` unless None; returns dx."""
    need_dx = dx is not None
    _dense_backward(x, dy, w, need_dx, DENSE_BLOCK, x.size * w.shape[1] >= DENSE_PARALLEL_MIN, dw,
                    db if db is not None else np.empty(dy.shape[1], dy.dtype),
                    dx if need_dx else np.empty((0, 0), dtype=dy.dtype))
    return dx

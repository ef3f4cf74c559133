"""Dedicated CUDA kernels for the memory-bound helpers, the GPU twins of kernels.py.

The generic ``xp`` versions (strided-view im2col plus a reshape copy, col2im
as KH*KW slice adds, pooling through one-hot masks) each cost several passes
over the activations and many launches; on the H100 they, not the GEMMs,
dominated a step.  Each kernel here makes one pass:

- im2col reads the unpadded input and writes zeros where a window leaves the
  image (no padded copy);
- col2im *gathers*: every input pixel sums the window entries that read it,
  so no atomics and a deterministic order;
- max pooling keeps the winning window slot (uint8) and its backward gathers
  like col2im;
- one fused kernel does the whole Adam update over the flat buffers;
- batch norm: per-channel sums as GEMVs (ones @ rows; CuPy's reductions over
  the leading axes of an NHWC array run one block per channel and were the
  slowest part of a step), one pass for (x - mean)^2, one that writes xhat
  and y, one that writes dx;
- dropout masks from a counter-based hash (splitmix64 of seed + index): one
  pass, no generator state to set up per step.

Every function here is tested against its generic twin (tests/test_cuda_kernels.py).
"""
from __future__ import annotations

import cupy
import numpy as np

_INDEX = """
    const long long c = i % C;
    long long t = i / C;
"""

_im2col = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 C, int32 KH, int32 KW, int32 S, int32 PT, int32 PL, int32 OH, int32 OW",
    "T col",
    _INDEX + """
    const int kw = t % KW; t /= KW;
    const int kh = t % KH; t /= KH;
    const int ow = t % OW; t /= OW;
    const int oh = t % OH;
    const long long n = t / OH;
    const int h = oh * S + kh - PT;
    const int w = ow * S + kw - PL;
    col = (h >= 0 && h < H && w >= 0 && w < W) ? x[((n * H + h) * W + w) * C + c] : (T)0;
    """,
    "ddp_cnn_im2col_nhwc")

_col2im = cupy.ElementwiseKernel(
    "raw T col, int32 H, int32 W, int32 C, int32 KH, int32 KW, int32 S, int32 PT, int32 PL, int32 OH, int32 OW",
    "T dx",
    _INDEX + """
    const int w = t % W; t /= W;
    const int h = t % H;
    const long long n = t / H;
    T acc = 0;
    for (int kh = 0; kh < KH; ++kh) {
        const int hh = h + PT - kh;
        if (hh < 0 || hh % S != 0) continue;
        const int oh = hh / S;
        if (oh >= OH) continue;
        for (int kw = 0; kw < KW; ++kw) {
            const int ww = w + PL - kw;
            if (ww < 0 || ww % S != 0) continue;
            const int ow = ww / S;
            if (ow >= OW) continue;
            acc += col[((((n * OH + oh) * OW + ow) * KH + kh) * KW + kw) * C + c];
        }
    }
    dx = acc;
    """,
    "ddp_cnn_col2im_nhwc")

_maxpool_forward = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 C, int32 KH, int32 KW, int32 S, int32 PT, int32 PL, int32 OH, int32 OW",
    "T y, uint8 arg",
    _INDEX + """
    const int ow = t % OW; t /= OW;
    const int oh = t % OH;
    const long long n = t / OH;
    T best = 0;
    int best_slot = -1;
    for (int kh = 0; kh < KH; ++kh) {
        const int h = oh * S + kh - PT;
        if (h < 0 || h >= H) continue;
        for (int kw = 0; kw < KW; ++kw) {
            const int w = ow * S + kw - PL;
            if (w < 0 || w >= W) continue;
            const T v = x[((n * H + h) * W + w) * C + c];
            if (best_slot < 0 || v > best) { best = v; best_slot = kh * KW + kw; }  // first winner on ties
        }
    }
    y = best;
    arg = (unsigned char)best_slot;
    """,
    "ddp_cnn_maxpool_forward_nhwc")

_maxpool_backward = cupy.ElementwiseKernel(
    "raw T dy, raw uint8 arg, int32 H, int32 W, int32 C, int32 KH, int32 KW, int32 S, int32 PT, int32 PL, "
    "int32 OH, int32 OW",
    "T dx",
    _INDEX + """
    const int w = t % W; t /= W;
    const int h = t % H;
    const long long n = t / H;
    T acc = 0;
    for (int kh = 0; kh < KH; ++kh) {
        const int hh = h + PT - kh;
        if (hh < 0 || hh % S != 0) continue;
        const int oh = hh / S;
        if (oh >= OH) continue;
        for (int kw = 0; kw < KW; ++kw) {
            const int ww = w + PL - kw;
            if (ww < 0 || ww % S != 0) continue;
            const int ow = ww / S;
            if (ow >= OW) continue;
            const long long o = ((n * OH + oh) * OW + ow) * C + c;
            if (arg[o] == kh * KW + kw) acc += dy[o];
        }
    }
    dx = acc;
    """,
    "ddp_cnn_maxpool_backward_nhwc")

# Same arithmetic as optim.Adam._update: bias corrections folded into the step.
_adam = cupy.ElementwiseKernel(
    "T g, T b1, T b2, T step, T eps_hat",
    "T p, T m, T v",
    """
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * (g * g);
    p -= step * (m / (sqrt(v) + eps_hat));
    """,
    "ddp_cnn_adam")


_centred_square = cupy.ElementwiseKernel(
    "T x, T mean", "T d", "const T t = x - mean; d = t * t;", "ddp_cnn_centred_square")

_bn_normalise = cupy.ElementwiseKernel(
    "T x, T mean, T invstd, T gamma, T beta", "T xhat, T y",
    "xhat = (x - mean) * invstd; y = xhat * gamma + beta;", "ddp_cnn_bn_normalise")

# dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), the means per channel.
_bn_backward = cupy.ElementwiseKernel(
    "T dy, T xhat, T scale, T dy_mean, T dyxhat_mean", "T dx",
    "dx = scale * (dy - dy_mean - xhat * dyxhat_mean);", "ddp_cnn_bn_backward")

# splitmix64 of (seed + i * golden gamma): the top 24 bits give a uniform float in [0, 1).
_dropout_mask = cupy.ElementwiseKernel(
    "uint64 seed, float64 keep, T scale", "T mask",
    """
    unsigned long long z = seed + (unsigned long long)i * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    mask = ((double)(z >> 40) * (1.0 / 16777216.0) < keep) ? scale : (T)0;
    """,
    "ddp_cnn_dropout_mask")


def im2col(x, kh, kw, stride, pads, oh, ow):
    """(N, H, W, C) unpadded -> (N*OH*OW, KH*KW*C), zero outside the image."""
    n, h, w, c = x.shape
    (pt, _), (pl, _) = pads
    cols = cupy.empty((n * oh * ow, kh * kw * c), dtype=x.dtype)
    _im2col(cupy.ascontiguousarray(x), h, w, c, kh, kw, stride, pt, pl, oh, ow, cols)
    return cols


def col2im(cols, x_shape, kh, kw, stride, pads, oh, ow):
    """Adjoint of :func:`im2col`: (N*OH*OW, KH*KW*C) -> (N, H, W, C)."""
    n, h, w, c = x_shape
    (pt, _), (pl, _) = pads
    dx = cupy.empty(x_shape, dtype=cols.dtype)
    _col2im(cupy.ascontiguousarray(cols), h, w, c, kh, kw, stride, pt, pl, oh, ow, dx)
    return dx


def maxpool_forward(x, kh, kw, stride, pads, oh, ow):
    """(y (N, OH, OW, C), winning slot kh*KW+kw as uint8) of max pooling; padding never wins."""
    n, h, w, c = x.shape
    (pt, _), (pl, _) = pads
    y = cupy.empty((n, oh, ow, c), dtype=x.dtype)
    arg = cupy.empty((n, oh, ow, c), dtype=cupy.uint8)
    _maxpool_forward(cupy.ascontiguousarray(x), h, w, c, kh, kw, stride, pt, pl, oh, ow, y, arg)
    return y, arg


def maxpool_backward(dy, arg, x_shape, kh, kw, stride, pads, oh, ow):
    n, h, w, c = x_shape
    (pt, _), (pl, _) = pads
    dx = cupy.empty(x_shape, dtype=dy.dtype)
    _maxpool_backward(cupy.ascontiguousarray(dy), arg, h, w, c, kh, kw, stride, pt, pl, oh, ow, dx)
    return dx


def adam_update(params, grads, m, v, beta1, beta2, step, eps_hat):
    """In place over the flat buffers: one kernel for the whole model."""
    t = params.dtype.type
    _adam(grads, t(beta1), t(beta2), t(step), t(eps_hat), params, m, v)


def channel_sums(rows, ones):
    """Per-channel sums of (M, C) rows as one GEMV; `ones` holds M ones."""
    if rows.shape[0] == 0:
        return cupy.zeros(rows.shape[1], dtype=rows.dtype)
    return cupy.matmul(ones, rows)


def batchnorm_statistics(rows, ones):
    """(mean, biased variance) per channel of (M, C) rows: two passes, the variance about the mean."""
    m = rows.shape[0]
    mean = channel_sums(rows, ones) / m
    return mean, channel_sums(_centred_square(rows, mean), ones) / m


def batchnorm_normalise(rows, mean, invstd, gamma, beta):
    """(xhat, y) of (M, C) rows in one pass."""
    xhat, y = cupy.empty_like(rows), cupy.empty_like(rows)
    _bn_normalise(rows, mean, invstd, gamma, beta, xhat, y)
    return xhat, y


def batchnorm_backward(dy_rows, xhat, scale, dy_mean, dyxhat_mean):
    """dx of batch norm in training mode, given the per-channel means of dy and dy * xhat."""
    dx = cupy.empty_like(dy_rows)
    _bn_backward(dy_rows, xhat, scale, dy_mean, dyxhat_mean, dx)
    return dx


def dropout_mask(shape, keep: float, scale, seed: int, dtype):
    """Inverted-dropout multipliers (0 or `scale`), element i drawn from splitmix64(seed + i)."""
    mask = cupy.empty(shape, dtype=dtype)
    _dropout_mask(np.uint64(seed), float(keep), mask.dtype.type(scale), mask)
    return mask

"""The memory-bound helpers of convolution, pooling and dropout.

All images are channels-last (N, H, W, C): the channels of one pixel are
contiguous, so im2col rows are contiguous runs, conv outputs need no
transpose after the GEMM, and batch norm reduces over every axis but the last.

Each helper here is written once against ``xp`` (NumPy or CuPy).  Where a
dedicated GPU kernel is faster it is added beside its NumPy twin, and the
pair is tested against each other.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import array_module


def conv_out_size(size: int, k: int, stride: int, pad_before: int, pad_after: int) -> int:
    return (size + pad_before + pad_after - k) // stride + 1


def resolve_padding(padding, size_hw, k_hw, stride):
    """Padding spec -> ((top, bottom), (left, right)).

    ``valid``: none; ``same``: output = ceil(input / stride) (extra pixel at the
    bottom/right, as TensorFlow does); an int p: p on every side.
    """
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        pads = []
        for size, k in zip(size_hw, k_hw):
            total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool) and padding >= 0:
        return (int(padding), int(padding)), (int(padding), int(padding))
    raise ValueError(f"padding: expected 'valid', 'same' or an int >= 0, got {padding!r}")


def pad_nhwc(x, pads, value=0.0):
    """Pad H and W of an NHWC array; returns x itself when there is nothing to pad."""
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return x
    xp = array_module(x)
    n, h, w, c = x.shape
    out = xp.full((n, h + t + b, w + l + r, c), value, dtype=x.dtype)
    out[:, t:t + h, l:l + w, :] = x
    return out


def window_view(xp_padded, kh, kw, stride, oh, ow):
    """A no-copy (N, OH, OW, KH, KW, C) view of every pooling/conv window."""
    xp = array_module(xp_padded)
    s0, s1, s2, s3 = xp_padded.strides
    n, c = xp_padded.shape[0], xp_padded.shape[3]
    return xp.lib.stride_tricks.as_strided(
        xp_padded, shape=(n, oh, ow, kh, kw, c),
        strides=(s0, s1 * stride, s2 * stride, s1, s2, s3))


def im2col(x_padded, kh, kw, stride, oh, ow):
    """(N, Hp, Wp, C) -> (N*OH*OW, KH*KW*C): one row per output pixel, one copy."""
    n, c = x_padded.shape[0], x_padded.shape[3]
    windows = window_view(x_padded, kh, kw, stride, oh, ow)
    return windows.reshape(n * oh * ow, kh * kw * c)


def col2im(cols, padded_shape, kh, kw, stride, oh, ow):
    """Adjoint of :func:`im2col`: scatter-add rows back into a padded image."""
    xp = array_module(cols)
    n, hp, wp, c = padded_shape
    out = xp.zeros(padded_shape, dtype=cols.dtype)
    c6 = cols.reshape(n, oh, ow, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :] += c6[:, :, :, i, j, :]
    return out


def unpad_nhwc(x, pads):
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return x
    return x[:, t:x.shape[1] - b, l:x.shape[2] - r, :]


def scatter_windows(d_windows, padded_shape, kh, kw, stride, oh, ow):
    """Adjoint of :func:`window_view` for a (N, OH, OW, KH, KW, C) gradient."""
    n, _, _, _, _, c = d_windows.shape
    return col2im(d_windows.reshape(n * oh * ow, kh * kw * c), padded_shape, kh, kw, stride, oh, ow)


def dropout_mask(shape, p: float, key: tuple, xp, dtype):
    """Inverted-dropout multiplier: 0 with probability p, 1/(1-p) otherwise.

    Drawn from a generator derived from `key` (seed, stream, rank, step,
    layer), so a resumed run draws exactly the masks of an uninterrupted one.
    """
    keep = 1.0 - p
    if xp is np:
        u = np.random.default_rng([int(k) for k in key]).random(shape, dtype=np.float32)
    else:
        seed = int(np.random.default_rng([int(k) for k in key]).integers(2**63))
        u = xp.random.default_rng(seed).random(shape, dtype=np.float32)
    mask = (u < keep).astype(dtype)
    mask *= dtype(1.0 / keep) if isinstance(dtype, type) else 1.0 / keep
    return mask

"""The memory-bound helpers of convolution, pooling and dropout.

All images are channels-last (N, H, W, C): the channels of one pixel are
contiguous, so im2col rows are contiguous runs, conv outputs need no
transpose after the GEMM, and batch norm reduces over every axis but the last.

Each helper here is written once against ``xp`` (NumPy or CuPy).  Where a
dedicated GPU kernel is faster it is added beside its NumPy twin, and the
pair is tested against each other.  On the CPU the heavy helpers work a
cache-sized chunk of images at a time (:func:`batch_chunks`); on a GPU,
on the whole batch at once.
"""
from __future__ import annotations

import math

import numpy as np

from ddp_cnn.system.backend import array_module, on_gpu


def pair(value, what: str) -> tuple:
    """(height, width) of a per-axis setting given as an int (both axes) or a pair."""
    hw = (value, value) if np.isscalar(value) else tuple(value)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in hw):
        raise ValueError(f"{what}: expected an int or a pair of ints, got {value!r}")
    return int(hw[0]), int(hw[1])


def conv_out_size(size: int, k: int, stride: int, pad_before: int, pad_after: int) -> int:
    return (size + pad_before + pad_after - k) // stride + 1


def resolve_padding(padding, size_hw, k_hw, stride):
    """Padding spec -> ((top, bottom), (left, right)).

    ``valid``: none; ``same``: output = ceil(input / stride) (extra pixel at the
    bottom/right, as TensorFlow does); an int p: p on every side; a pair
    (ph, pw): ph above and below, pw left and right.  `stride`: an int or a
    (height, width) pair.
    """
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        pads = []
        for size, k, s in zip(size_hw, k_hw, pair(stride, "stride")):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    try:
        ph, pw = pair(padding, "padding")
    except (ValueError, TypeError):
        ph = pw = -1
    if ph >= 0 and pw >= 0:
        return (ph, ph), (pw, pw)
    raise ValueError(f"padding: expected 'valid', 'same', an int >= 0 or a pair of them, got {padding!r}")


def pad_nhwc(x, pads, value=0.0, out=None):
    """Pad H and W of an NHWC array (into `out` if given); returns x itself when there is nothing to pad."""
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return x
    n, h, w, c = x.shape
    if out is None:
        out = array_module(x).empty((n, h + t + b, w + l + r, c), dtype=x.dtype)
    out.fill(value)
    out[:, t:t + h, l:l + w, :] = x
    return out


def window_view(xp_padded, kh, kw, stride, oh, ow):
    """A no-copy (N, OH, OW, KH, KW, C) view of every pooling/conv window (`stride`: int or pair)."""
    xp = array_module(xp_padded)
    sh, sw = pair(stride, "stride")
    s0, s1, s2, s3 = xp_padded.strides
    n, c = xp_padded.shape[0], xp_padded.shape[3]
    return xp.lib.stride_tricks.as_strided(
        xp_padded, shape=(n, oh, ow, kh, kw, c),
        strides=(s0, s1 * sh, s2 * sw, s1, s2, s3))


def im2col(x_padded, kh, kw, stride, oh, ow):
    """(N, Hp, Wp, C) -> (N*OH*OW, KH*KW*C): one row per output pixel, one copy."""
    n, c = x_padded.shape[0], x_padded.shape[3]
    windows = window_view(x_padded, kh, kw, stride, oh, ow)
    return windows.reshape(n * oh * ow, kh * kw * c)


def col2im(cols, padded_shape, kh, kw, stride, oh, ow):
    """Adjoint of :func:`im2col`: scatter-add rows back into a padded image (`stride`: int or pair)."""
    xp = array_module(cols)
    sh, sw = pair(stride, "stride")
    n, hp, wp, c = padded_shape
    out = xp.zeros(padded_shape, dtype=cols.dtype)
    c6 = cols.reshape(n, oh, ow, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += c6[:, :, :, i, j, :]
    return out


class Scratch:
    """Arrays a layer reuses from step to step instead of allocating anew.

    In train mode every working and output array of a layer comes from here:
    one array per (name, shape, dtype), allocated on first use and handed out
    again, the same memory, at every later step of that shape.  So the
    layers that use it allocate nothing after the first training step (what
    a CUDA graph needs), and the CPU does not page-fault fresh arrays in
    again whenever glibc's heuristics have handed the previous ones back to
    the OS.  The price: an array a layer returned in train mode is
    overwritten by its next training forward (or backward); eval mode
    allocates fresh arrays, so predictions a caller holds never change.
    """

    def __init__(self):
        self.arrays: dict = {}

    def get(self, name: str, shape, dtype, xp):
        """The C-contiguous array called `name` of this shape and dtype (contents undefined)."""
        key = (name, tuple(int(s) for s in shape), np.dtype(dtype))
        buf = self.arrays.get(key)
        if buf is None:
            buf = self.arrays[key] = xp.empty(key[1], dtype=dtype)
        return buf

    def ones(self, name: str, n: int, dtype, xp):
        """`n` ones owned by this scratch: with a GEMV (ones @ rows) they sum rows,
        2-5x faster than rows.sum(axis=0) and, on a GPU, than CuPy's reductions."""
        key = (name, (int(n),), np.dtype(dtype))
        fresh = key not in self.arrays
        buf = self.get(name, (n,), dtype, xp)
        if fresh:
            buf.fill(1)
        return buf


def im2col_into(x_padded, kh, kw, stride, oh, ow, out):
    """:func:`im2col` written into `out` (N*OH*OW, KH*KW*C), a reused buffer; returns `out`."""
    n, c = x_padded.shape[0], x_padded.shape[3]
    out.reshape(n, oh, ow, kh, kw, c)[...] = window_view(x_padded, kh, kw, stride, oh, ow)
    return out


def im2col_t_into(x_padded, kh, kw, stride, oh, ow, out):
    """The transpose of :func:`im2col`, (KH*KW*C, N*OH*OW), written into `out`; returns `out`.

    For few channels (a grayscale input layer): each row is one strided
    slice of the image, copied in runs of OW floats, where im2col's rows
    are runs of KW*C floats (3 for a 3x3 kernel on one channel): 0.3 ms
    against 1.3 ms at batch 128, and BLAS takes either layout as is.
    """
    xp = array_module(x_padded)
    n, c = x_padded.shape[0], x_padded.shape[3]
    rows = out.reshape(kh, kw, c, n, oh, ow)
    for i in range(kh):
        for j in range(kw):
            window = x_padded[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
            rows[i, j] = xp.moveaxis(window, 3, 0)
    return out


def col2im_taps(taps, padded_shape, kh, kw, stride, oh, ow, out=None):
    """Adjoint of :func:`im2col` for a gradient laid out tap by tap: (KH*KW, N*OH*OW, C).

    Same sum as :func:`col2im` on the (N*OH*OW, KH*KW*C) layout, but each
    tap is one contiguous (N, OH, OW, C) block, so each of the KH*KW adds
    runs over rows of OW*C floats instead of C (3x faster for C=32).
    Adds into `out` (N, Hp, Wp, C) when given, else into fresh zeros; returns it.
    """
    xp = array_module(taps)
    n, hp, wp, c = padded_shape
    if out is None:
        out = xp.zeros(padded_shape, dtype=taps.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :] += \
                taps[i * kw + j].reshape(n, oh, ow, c)
    return out


def col2im_taps_wide(taps, out, kh, kw, oh):
    """:func:`col2im_taps` for stride 1, on taps computed for rows as wide as the padded image.

    taps: (KH*KW, N*OH*Wp, C) where the columns past OW = Wp - KW + 1 of each
    row are zero (the dy rows were padded with zeros to width Wp).  Then the
    target of tap (i, j) is one contiguous run per image, from pixel (i, j)
    on: the wrapped columns land on other pixels but add zeros, and each add
    is one long row per image (3x faster than rows of OW*C).  Adds into
    `out` (N, Hp, Wp, C), C-contiguous; returns it.
    """
    n, hp, wp, c = out.shape
    flat = out.reshape(n, hp * wp * c)
    length = (oh * wp - (kw - 1)) * c  # the last row's zero columns would run past the image
    for i in range(kh):
        for j in range(kw):
            start = (i * wp + j) * c
            flat[:, start:start + length] += taps[i * kw + j].reshape(n, oh * wp * c)[:, :length]
    return out


# Batch chunks are sized so that a chunk's intermediates stay in cache: about
# the L2 of one core for elementwise passes, a share of L3 around a GEMM.
L2_BYTES = 1 * 2**20
CHUNK_BYTES = 4 * 2**20


def batch_chunks(n: int, bytes_per_image: int, budget: int | None = None):
    """(start, stop) ranges over a batch of n on the CPU, as many images each as fit
    in `budget` bytes (default CHUNK_BYTES), at least one."""
    budget = CHUNK_BYTES if budget is None else budget
    step = max(1, min(n, budget // max(bytes_per_image, 1)))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _chunks(x, bytes_per_image: int, budget: int):
    """:func:`batch_chunks` over x's batch on the CPU; the whole batch on a GPU."""
    n = x.shape[0]
    return [(0, n)] if on_gpu(x) else batch_chunks(n, bytes_per_image, budget)


def pool_tiles_forward(x, kh, kw, mode, y=None, arg=None):
    """Max/min pooling over KHxKW windows that tile x exactly (stride = window, no padding).

    Returns (y, arg): y (N, H/KH, W/KW, C) and arg (uint8), the position
    i*KW + j of the first winner of each window, as argmax/argmin give it;
    written into `y` and `arg` when given.
    A running max over the KH*KW strided slices, an L2-sized chunk of images
    at a time: no window copy and no reduction over a strided axis.  Masked
    writes (where=, putmask, xp.where) cost ~5 ns an element in NumPy, so the
    winner is tracked with uint8 arithmetic instead: positions only grow, so
    arg = max(arg, k * wins) keeps the last strict improvement.
    """
    xp = array_module(x)
    n, h, w, c = x.shape
    better = xp.greater if mode == "max" else xp.less
    pick = xp.maximum if mode == "max" else xp.minimum
    if y is None:
        y = xp.empty((n, h // kh, w // kw, c), dtype=x.dtype)
    if arg is None:
        arg = xp.empty(y.shape, dtype=np.uint8)
    arg.fill(0)
    chunks = _chunks(x, h * w * c * x.dtype.itemsize, L2_BYTES)
    wins = xp.empty((chunks[0][1],) + y.shape[1:], dtype=bool)
    for a, b in chunks:
        xa, ya, arga, wa = x[a:b], y[a:b], arg[a:b], wins[:b - a]
        ya[...] = xa[:, 0::kh, 0::kw, :]
        for k in range(1, kh * kw):
            v = xa[:, k // kw::kh, k % kw::kw, :]
            better(v, ya, out=wa)  # strictly: ties keep the earlier position
            xp.maximum(arga, wa.view(np.uint8) * np.uint8(k), out=arga)
            pick(ya, v, out=ya)
    return y, arg


def pool_tiles_backward(dy, arg, kh, kw, dx=None):
    """Adjoint of :func:`pool_tiles_forward`: dy goes to each window's winner, zeros elsewhere (into `dx`)."""
    xp = array_module(dy)
    n, oh, ow, c = dy.shape
    if dx is None:
        dx = xp.empty((n, oh * kh, ow * kw, c), dtype=dy.dtype)
    for a, b in _chunks(dy, oh * ow * c * dy.dtype.itemsize * kh * kw, L2_BYTES):
        for k in range(kh * kw):
            # A float one-hot: multiplying by a bool array casts element by element (3x slower).
            xp.multiply(dy[a:b], (arg[a:b] == k).astype(dy.dtype), out=dx[a:b, k // kw::kh, k % kw::kw, :])
    return dx


def leaky_relu(x, alpha, slope=None, y=None):
    """LeakyReLU for 0 <= alpha <= 1: returns (y, slope), y = x * slope and
    slope = ``where(x > 0, 1, alpha)`` in x's dtype, into `slope` and `y` if given.

    The slope is computed as max(float(x > 0), alpha), exactly 1 or alpha,
    because xp.where costs ~5 ns an element in NumPy (4x this).
    """
    xp = array_module(x)
    slope = xp.empty_like(x) if slope is None else slope
    y = xp.empty_like(x) if y is None else y
    slope[...] = x > 0
    xp.maximum(slope, x.dtype.type(alpha), out=slope)
    xp.multiply(x, slope, out=y)
    return y, slope


def unpad_nhwc(x, pads):
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return x
    return x[:, t:x.shape[1] - b, l:x.shape[2] - r, :]


def scatter_windows(d_windows, padded_shape, kh, kw, stride, oh, ow):
    """Adjoint of :func:`window_view` for a (N, OH, OW, KH, KW, C) gradient."""
    n, _, _, _, _, c = d_windows.shape
    return col2im(d_windows.reshape(n * oh * ow, kh * kw * c), padded_shape, kh, kw, stride, oh, ow)


def _generator_at(key: list, offset: int) -> np.random.Generator:
    """``default_rng(key)`` after `offset` float32 draws: each 64-bit output of PCG64 gives two."""
    bits = np.random.PCG64(np.random.SeedSequence(key))
    bits.advance(offset // 2)
    rng = np.random.Generator(bits)
    if offset % 2:
        rng.random(1, dtype=np.float32)  # the low half; the high half is the next value
    return rng


def uniform_draw(shape, key: tuple, offset: int = 0, out=None):
    """The float32 draw behind a CPU dropout mask (see :func:`dropout_mask`), into `out` if given."""
    return _generator_at([int(k) for k in key], offset).random(shape, dtype=np.float32, out=out)


def dropout_mask(shape, p: float, key: tuple, xp, dtype, out=None, uniform=None, offset: int = 0):
    """Inverted-dropout multiplier: 0 with probability p, 1/(1-p) otherwise, into `out` if given.

    Drawn from a generator derived from `key` (seed, stream, rank, step,
    layer), so a resumed run draws exactly the masks of an uninterrupted one.
    On the CPU the mask is one float32 draw of ``default_rng(key)`` over the
    whole batch (into `uniform`, float32, if given), starting `offset`
    values into that generator's stream (PCG64 jumps ahead in O(log n)), so
    a slice of a bigger batch gets the bigger batch's mask of its rows.  On
    a GPU the offset only makes the hash's seed differ.
    """
    keep = 1.0 - p
    scale = dtype(1.0 / keep) if isinstance(dtype, type) else 1.0 / keep
    if on_gpu(xp):
        # One hashing pass (cuda_kernels.dropout_mask): setting up a CuPy generator
        # every step costs more than the mask.  Not the CPU's stream: GPU runs are
        # reproducible on the GPU.
        from ddp_cnn.model import cuda_kernels
        seed = int(np.random.default_rng([int(k) for k in key] + ([int(offset)] if offset else [])).integers(2**63))
        return cuda_kernels.dropout_mask(shape, keep, scale, seed, dtype)
    mask = np.empty(shape, dtype=dtype) if out is None else out
    u = uniform_draw(shape, key, offset, uniform)
    np.less(u, keep, out=mask)
    mask *= scale
    return mask

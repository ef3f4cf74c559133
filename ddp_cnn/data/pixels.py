"""What happens to the pixels on their way to the model: random augmentation (drawn so that a global batch
can be sliced to any rank's part) and the one normalisation (training, evaluation, predict and inference)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools.errors import DataError

# NumPy alone: ``normalize`` also serves models exported to .npz, whose loading promises to need nothing more.


# ---------------------------------------------------------------- augmentation

# The augmentations take uint8 images (B, H, W, C) or (B, H, W).  Every random draw has the batch as
# its last axis and is drawn with size b = len(images), so a generator drawing for a larger global
# batch can be sliced to any rank's part of it.

def random_shift(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by a random (dy, dx) in [-shift, shift]^2, zero filling: a crop of the padded image."""
    b, h, w = images.shape[:3]
    pad = ((0, 0), (shift, shift), (shift, shift)) + ((0, 0),) * (images.ndim - 3)
    padded = np.pad(images, pad)
    oy, ox = rng.integers(0, 2 * shift + 1, size=(2, b))
    # A (b, 2s+1, 2s+1, [C,] h, w) view of every crop; picking one per image copies whole rows (3x faster
    # than gathering single pixels with three broadcast index arrays).
    crops = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))[np.arange(b), oy, ox]
    return crops if images.ndim == 3 else np.ascontiguousarray(np.moveaxis(crops, 1, 3))  # (b, C, h, w) -> last


def random_hflip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image left-right with probability 1/2 (axis 2, the width, whatever the channels)."""
    flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = images[flip, :, ::-1]
    return out


def random_erase(images: np.ndarray, p: float, rng: np.random.Generator, fill) -> np.ndarray:
    """With probability p per image, set one random rectangle (2-25% of the area, aspect 0.3-3.3) to ``fill``
    (one uint8 value, or one per channel)."""
    b, h, w = images.shape[:3]
    chosen = rng.random(b) < p
    area = rng.uniform(0.02, 0.25, b) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3), b))
    eh = np.clip(np.rint(np.sqrt(area * aspect)), 1, h).astype(np.int64)
    ew = np.clip(np.rint(np.sqrt(area / aspect)), 1, w).astype(np.int64)
    y0 = (rng.random(b) * (h - eh + 1)).astype(np.int64)
    x0 = (rng.random(b) * (w - ew + 1)).astype(np.int64)
    ys, xs = np.arange(h), np.arange(w)
    in_rows = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None]) & chosen[:, None]  # (b, h)
    in_cols = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # (b, w)
    mask = in_rows[:, :, None] & in_cols[:, None, :]  # (b, h, w)
    if images.ndim == 4:
        mask = mask[..., None]
    return np.where(mask, np.asarray(fill, dtype=np.uint8), images)


@dataclass
class Augment:
    """Random training-time changes to uint8 images (B, H, W, C) or (B, H, W), vectorised over the batch.

    shift: random translation in [-shift, shift] pixels (zero padding, then a crop);
    hflip: mirror half the images (leave off for digits: a mirrored 2 is no 2);
    erase: probability of blanking one random rectangle (to ``fill``: the Loader gives the mean
    pixel of each channel).
    """

    shift: int = 0
    hflip: bool = False
    erase: float = 0.0

    def __post_init__(self):
        if self.shift < 0:
            raise DataError(f"augment shift must be >= 0, got {self.shift}")
        if not 0.0 <= self.erase <= 1.0:
            raise DataError(f"augment erase must be a probability in [0, 1], got {self.erase}")

    @property
    def changes_images(self) -> bool:
        return bool(self.shift or self.hflip or self.erase)

    def __call__(self, images: np.ndarray, rng: np.random.Generator, fill=0) -> np.ndarray:
        if self.shift:
            images = random_shift(images, self.shift, rng)
        if self.hflip:
            images = random_hflip(images, rng)
        if self.erase:
            images = random_erase(images, self.erase, rng, fill)
        return images


# ---------------------------------------------------------------- normalisation

def channel_stats(mean, std, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float64 arrays of one value per channel, from scalars (files and checkpoints
    written before per-channel statistics: one channel) or sequences.

    DataError unless both have the same length (``channels`` if given; a
    scalar then serves every channel), the mean is finite and the std > 0."""
    m = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    s = np.atleast_1d(np.asarray(std, dtype=np.float64))
    if channels is not None:
        m, s = (np.repeat(v, channels) if v.shape == (1,) else v for v in (m, s))
    if m.ndim != 1 or m.shape != s.shape or (channels is not None and len(m) != channels):
        raise DataError(f"pixel mean/std of {m.size}/{s.size} values for "
                        f"{channels if channels is not None else max(m.size, s.size)} channels")
    if not (np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all()):
        raise DataError(f"pixel std must be a number > 0 and the mean finite, got mean {m.tolist()} std {s.tolist()}")
    return m, s


def normalize(pixels, mean, std, dtype, xp=np):
    """Pixels (N, H, W) or (N, H, W, C) -> model input (N, H, W, C) in ``dtype`` on ``xp``.

    uint8 pixels are 0..255, float pixels 0..1: x = (pixel/255 - mean)/std
    (without the /255 for floats), computed in ``dtype`` in this order, with
    ``mean``/``std`` a scalar or one value per channel.  The
    one normalisation of the package: training and evaluation batches
    (``Loader``), ``predict`` and ``inference`` all go through it, so an image
    gives the model the same input whichever way it comes in.  The pixels are
    moved to ``xp`` before the cast, so uint8 crosses to a GPU at 1 byte a pixel.
    """
    x = xp.asarray(pixels)
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise ValueError(f"pixels of dtype {x.dtype}; expected uint8 (0..255) or floats (0..1)")
    if x.ndim == 3:
        x = x[..., None]  # grayscale: one channel, last
    if x.ndim != 4:
        raise ValueError(f"pixels of shape {tuple(x.shape)}; expected (N, H, W) or (N, H, W, C)")
    is_uint8 = x.dtype == np.uint8
    dtype = np.dtype(dtype)
    x = x.astype(dtype)  # always a fresh array: the in-place steps below never touch the caller's pixels
    if is_uint8:
        x /= 255
    mean, std = channel_stats(mean, std, x.shape[3])  # ValueError (DataError) on a channel count that differs
    x -= xp.asarray(mean, dtype=dtype)  # in the model dtype even when mean/std come as float64
    x /= xp.asarray(std, dtype=dtype)
    return x

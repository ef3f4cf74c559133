"""Training that does not depend on the rank count (``--data-order global``).

In the default ``shard`` order each rank shuffles the rows of its own
shards, so the global batch at step t is a different set of images on 1
rank and on 4.  Here an epoch's order is ONE permutation of the whole
training set, seeded by (seed, epoch) alone; global batch t is rows
``order[t*G:(t+1)*G]`` whatever the number of ranks, and rank r of N takes
the r-th of N equal slices of it.  The gradient mean over ranks is then the
mean over the same G images on any rank count, and random augmentation is
drawn for the global batch and sliced (:class:`BatchSlice`), so each image
gets the same change too.  A checkpoint's position (epoch, step) means the
same thing on any rank count: a run resumes on another one and continues
the same trajectory.

Every rank needs every shard: the images stay on disk (a shared file
system, as on any cluster) and are streamed chunk by chunk
(:mod:`ddp_cnn.data.stream`); the epoch's order is then a block shuffle over
the chunks of every shard, seeded by (seed, epoch) alone, so it keeps this
independence; labels and source indices (a few bytes a row) are read whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


# The images are read chunk by chunk through a bounded cache (ddp_cnn.data.stream); ``GlobalRows`` is the
# name they had here first.
from ddp_cnn.data.stream import ChunkCache, ChunkedRows as GlobalRows  # noqa: F401  (re-exported)


def open_global_train(data_dir: Path, cache: ChunkCache | None = None):
    """Every training shard of ``data_dir`` as one :class:`~ddp_cnn.data.shards.ShardData` whose images are a
    :class:`~ddp_cnn.data.stream.ChunkedRows` (global row i = the i-th row of the shards taken in order).
    DataError (one line naming the file) on a missing, damaged or mismatched shard."""
    from ddp_cnn.data.shards import find_shards
    from ddp_cnn.data.stream import open_chunked
    return open_chunked([(path, None, None) for path in find_shards(data_dir)], cache)


def take(images, selector):
    """``images[selector]`` without reading, for in-memory arrays and :class:`GlobalRows` alike."""
    return images.subset(selector) if isinstance(images, GlobalRows) else images[selector]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's global order: seeded by (seed, epoch) alone, the same on any rank count."""
    return np.random.default_rng([seed, epoch])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The global order of an epoch: one permutation of the n training rows, seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchSlice:
    """A NumPy Generator stand-in that draws for the whole global batch and returns this rank's slice.

    The augmentation functions draw with the batch as the last axis of every
    draw (``size=b`` or ``(k, b)``).  Drawn for ``total`` images and cut to
    ``[start, start + b)``, each image gets the numbers it would get in the
    same global batch on any rank count.
    """

    def __init__(self, rng: np.random.Generator, start: int, total: int):
        self.rng, self.start, self.total = rng, start, total

    def _whole(self, size):
        shape = (size,) if np.isscalar(size) else tuple(size)
        return shape[:-1] + (self.total,), shape[-1]

    def _cut(self, drawn, b):
        return drawn[..., self.start:self.start + b]

    def integers(self, low, high=None, size=None, **kw):
        whole, b = self._whole(size)
        return self._cut(self.rng.integers(low, high, size=whole, **kw), b)

    def random(self, size=None, **kw):
        whole, b = self._whole(size)
        return self._cut(self.rng.random(whole, **kw), b)

    def uniform(self, low=0.0, high=1.0, size=None):
        whole, b = self._whole(size)
        return self._cut(self.rng.uniform(low, high, whole), b)

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
system, as on any cluster) and :class:`GlobalRows` reads the chunks of rows
a batch needs with HDF5 partial reads, keeping them while memory allows;
labels and source indices (a few bytes a row) are read whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.errors import DataError

# What each rank keeps of the shards' images, decompressed: the shards are gzip-compressed in chunks
# of rows (512), and a random batch touches a chunk per image.  Kept whole chunks (least recently used
# out first) make a chunk's decompression happen once per run, not once per image read, while the
# training set fits (Fashion-MNIST: 47 MB); beyond it, chunks are read again as batches need them.
CACHE_BYTES = 1 << 30


class ChunkCache:
    """Decompressed chunks of rows, (file number, chunk number) -> array, up to ``limit`` bytes."""

    def __init__(self, limit: int = CACHE_BYTES):
        import threading
        from collections import OrderedDict
        self.limit, self.used, self.chunks, self.lock = limit, 0, OrderedDict(), threading.Lock()

    def get(self, key, read):
        with self.lock:
            if key in self.chunks:
                self.chunks.move_to_end(key)
                return self.chunks[key]
            block = read()
            self.chunks[key] = block
            self.used += block.nbytes
            while self.used > self.limit and len(self.chunks) > 1:
                self.used -= self.chunks.popitem(last=False)[1].nbytes
            return block


class GlobalRows:
    """The images of every training shard, read on demand: ``rows[idx]`` -> uint8 (len(idx), *image_shape).

    ``where`` maps each global row to (file number, row in that file);
    :meth:`subset` keeps a selection without reading anything (the
    validation hold-out).  Rows come from whole chunks read as contiguous
    hyperslabs and kept in a :class:`ChunkCache` shared by the subsets.
    """

    def __init__(self, paths, where: np.ndarray, image_shape: tuple, files=None, cache=None):
        import h5py
        self.paths, self.where, self.image_shape = list(paths), where, tuple(image_shape)
        self._files = files if files is not None else [h5py.File(p, "r") for p in self.paths]
        self._images = [f["images"] for f in self._files]
        self._chunk_rows = [(ds.chunks or (len(ds),))[0] or 1 for ds in self._images]
        self.cache = cache if cache is not None else ChunkCache()

    @property
    def shape(self) -> tuple:
        return (len(self.where),) + self.image_shape

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.where)

    def subset(self, selector) -> "GlobalRows":
        """The rows picked by ``selector`` (a boolean mask or indices), sharing the open files and the cache."""
        return GlobalRows(self.paths, self.where[selector], self.image_shape, self._files, self.cache)

    def _chunk(self, f: int, c: int) -> np.ndarray:
        def read():
            n = self._chunk_rows[f]
            try:
                block = self._images[f][c * n:(c + 1) * n]
            except OSError as exc:
                raise DataError(f"{self.paths[f]}: cannot read rows {c * n}:{(c + 1) * n} (corrupt file?): "
                                f"{exc}") from None
            return block.reshape((len(block),) + self.image_shape)
        return self.cache.get((f, c), read)

    def __getitem__(self, rows) -> np.ndarray:
        where = self.where[np.asarray(rows)]
        out = np.empty((len(where),) + self.image_shape, np.uint8)
        chunk_rows = np.asarray(self._chunk_rows)[where[:, 0]]
        chunk = where[:, 1] // chunk_rows
        keys = where[:, 0] * (1 << 32) + chunk
        for key in np.unique(keys):
            picked = np.flatnonzero(keys == key)
            f, c = int(key >> 32), int(key & 0xFFFFFFFF)
            out[picked] = self._chunk(f, c)[where[picked, 1] - c * self._chunk_rows[f]]
        return out

    def close(self) -> None:
        for f in self._files:
            f.close()


def open_global_train(data_dir: Path):
    """Every training shard of ``data_dir`` as one :class:`~ddp_cnn.data.ShardData` whose images are a
    :class:`GlobalRows` (global row i = the i-th row of the shards taken in order).  DataError (one
    line naming the file) on a missing, damaged or mismatched shard."""
    from data_tools import h5format
    from .data import ShardData, find_shards
    paths = find_shards(data_dir)
    labels, source_index, where, first = [], [], [], None
    for number, path in enumerate(paths):
        with h5format.open_checked(path) as f:
            attrs = h5format.check_structure(path, f)
            try:
                labels.append(f["labels"][:].astype(np.int64))
                source_index.append(f["source_index"][:])
            except OSError as exc:
                raise DataError(f"{path}: cannot read labels (corrupt file?): {exc}") from None
        if first is None:
            first = attrs
        elif attrs["sharding_id"] != first["sharding_id"] or attrs["image_shape"] != first["image_shape"]:
            raise DataError(f"{path}: from another sharding run than {paths[0]} (sharding_id differs)")
        n = len(labels[-1])
        where.append(np.stack([np.full(n, number), np.arange(n)], axis=1))
    # The image shape as the hyperslab reader returns it (a 3-D file may be read as (H, W, 1)).
    image_shape = h5format.read_rows(paths[0], 0, 0)[0].shape[1:]
    labels = np.concatenate(labels)
    if len(labels) and labels.max() >= len(first["class_names"]):
        raise DataError(f"{paths[0]}: label {labels.max()} but only {len(first['class_names'])} class names")
    images = GlobalRows(paths, np.concatenate(where).astype(np.int64), image_shape)
    return ShardData(images, labels, first, list(paths), np.concatenate(source_index))


def take(images, selector):
    """``images[selector]`` without reading, for in-memory arrays and :class:`GlobalRows` alike."""
    return images.subset(selector) if isinstance(images, GlobalRows) else images[selector]


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

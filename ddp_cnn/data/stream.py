"""Shards read as a stream of chunks: a rank's memory does not grow with the data set.

The images of a split stay in their HDF5 files.  :class:`ChunkedRows` reads
them one HDF5 chunk at a time (the unit the files are compressed in), on a
small thread pool, ahead of the step, into a :class:`ChunkCache` of bounded
size (``--data-cache-mb``).  Labels and source indices (a few bytes a row)
are held in memory.  An epoch's order is a block shuffle
(:func:`block_order`): the chunks are shuffled, then the rows inside each
window of ``window`` consecutive chunks, so one batch needs the chunks of
one or two windows, not a chunk per image, and each chunk is read once an
epoch.  The order depends on the seed, the epoch and the chunk layout of the
files only, so in the global data order it is the same on any rank count.
"""
from __future__ import annotations

import math
import os
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from data_tools.errors import DataError

DEFAULT_WINDOW = 16  # chunks whose rows are shuffled together (--shuffle-window)
READ_THREADS = 4
READ_AHEAD = 4  # chunk reads queued per read thread, at most, beyond the batch being assembled


def machine_memory() -> int:
    """Bytes of memory this process can still get: MemAvailable lowered by its cgroup's limit and its
    address-space limit (:mod:`ddp_cnn.system.memory`), else the physical memory."""
    from ddp_cnn.system.memory import _host_available
    return _host_available() or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_cache_mb(local_ranks: int = 1) -> float:
    """An eighth of the memory available, shared by the ranks on the node, within [64 MB, 4 GB] per rank."""
    return float(min(4096, max(64, machine_memory() / 8 / max(local_ranks, 1) / 2**20)))


class ChunkCache:
    """Decoded chunks, key -> uint8 array, within ``limit`` bytes.

    A chunk an epoch still needs is pinned (:meth:`request` .. :meth:`release`);
    released chunks stay for later epochs while there is room and leave least
    recently used first.  Reads run on a thread pool; :meth:`get` waits for one.
    """

    def __init__(self, limit_bytes: float, threads: int = READ_THREADS):
        self.limit = int(limit_bytes)
        self.blocks: dict = {}  # key -> Future of the block
        self.sizes: dict = {}  # key -> bytes (expected until read)
        self.pins: dict = {}  # key -> number of requests not yet released
        self.released: OrderedDict = OrderedDict()  # unpinned keys, least recently used first
        self.lock = threading.RLock()  # a read done before its callback is added calls it at once, here
        self.threads, self.origin = threads, "given"
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ddp_cnn-read")
        self.used = self.pinned = self.peak = 0  # bytes held, of them pinned, most held at once
        self.pending = 0  # reads submitted and not finished: kept short, so an early exit waits on few

    def pinned_bytes(self) -> int:
        return self.pinned

    def room_for(self, keys, size_of) -> bool:
        """Whether pinning ``keys`` keeps the pinned chunks within the limit."""
        with self.lock:
            extra = sum(size_of(k) for k in set(keys) if k not in self.pins)
            return self.pinned_bytes() + extra <= self.limit

    def request(self, key, size: int, read) -> None:
        """Pin ``key``; start reading it on the pool unless it is held already."""
        with self.lock:
            if key not in self.blocks:
                self.sizes[key] = size
                self.used += size
                self.blocks[key] = future = self.pool.submit(read)
                self.pending += 1
                future.add_done_callback(self._read_done)
            if key not in self.pins:
                self.pinned += self.sizes[key]
            self.pins[key] = self.pins.get(key, 0) + 1
            self.released.pop(key, None)
            self._evict()

    def _read_done(self, future) -> None:
        with self.lock:
            self.pending -= 1

    def get(self, key) -> np.ndarray:
        """The block of a requested key (waits for its read; re-raises its error)."""
        with self.lock:
            future: Future = self.blocks[key]
        return future.result()

    def release(self, key) -> None:
        with self.lock:
            left = self.pins.get(key, 0) - 1
            if left > 0:
                self.pins[key] = left
                return
            if self.pins.pop(key, None) is not None:
                self.pinned -= self.sizes[key]
            if key in self.blocks:
                self.released[key] = None
            self._evict()

    def _evict(self) -> None:
        self.peak = max(self.peak, self.used)
        while self.used > self.limit and self.released:
            key, _ = self.released.popitem(last=False)
            self.blocks.pop(key).cancel()
            self.used -= self.sizes.pop(key)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def block_order(rng: np.random.Generator, chunk_of_row: np.ndarray, window: int) -> np.ndarray:
    """A permutation of the rows: chunks in a random order, rows shuffled within each group of ``window``
    consecutive chunks of that order.  A window that takes in every chunk (0, or a small data set) is a
    full shuffle, the very permutation the in-memory loader draws from the same generator."""
    chunks, chunk_index = np.unique(chunk_of_row, return_inverse=True)
    if not window or len(chunks) <= window:
        return rng.permutation(len(chunk_of_row))
    place = np.empty(len(chunks), np.int64)
    place[rng.permutation(len(chunks))] = np.arange(len(chunks))
    return np.lexsort((rng.permutation(len(chunk_of_row)), place[chunk_index] // window))


class ChunkedRows:
    """The images of rows of HDF5 files, read a chunk at a time: ``rows[idx]`` -> uint8 (len(idx), *image_shape).

    ``row_key`` gives each row as file number << 32 | row in that file (8 bytes a row); :meth:`subset`
    keeps a selection without reading anything (the validation hold-out).
    Subsets share the open files and the cache.
    """

    def __init__(self, paths, row_key: np.ndarray, image_shape: tuple, files=None, cache: ChunkCache | None = None):
        import h5py
        self.paths, self.row_key, self.image_shape = list(paths), np.asarray(row_key, np.int64), tuple(image_shape)
        self._files = files if files is not None else [h5py.File(p, "r") for p in self.paths]
        self._images = [f["images"] for f in self._files]
        self.chunk_rows = np.array([(ds.chunks or (len(ds),))[0] or 1 for ds in self._images], np.int64)
        self.row_bytes = int(np.prod(self.image_shape))
        self.cache = cache if cache is not None else ChunkCache(1 << 30)
        self._token = id(self._files)  # the cache's keys are (token, chunk key): splits share one cache

    @property
    def shape(self) -> tuple:
        return (len(self.row_key),) + self.image_shape

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 1 + len(self.image_shape)

    def __len__(self) -> int:
        return len(self.row_key)

    def subset(self, selector) -> "ChunkedRows":
        """The rows picked by ``selector`` (a boolean mask or indices), sharing the open files and the cache."""
        return ChunkedRows(self.paths, self.row_key[selector], self.image_shape, self._files, self.cache)

    def chunk_keys(self, rows=slice(None)) -> np.ndarray:
        """The chunk of each of ``rows`` (default all) as file number << 32 | chunk number in that file."""
        key = self.row_key[rows]
        files = key >> 32
        return (files << 32) | ((key & 0xFFFFFFFF) // self.chunk_rows[files])

    @property
    def chunk_of_row(self) -> np.ndarray:
        return self.chunk_keys()

    def chunk_bytes(self, key=None) -> int:
        f = 0 if key is None else int(key >> 32)
        return int(self.chunk_rows[f]) * self.row_bytes

    def max_chunk_bytes(self) -> int:
        return int(self.chunk_rows.max()) * self.row_bytes

    # ---- reading a chunk
    def _read_chunk(self, key) -> np.ndarray:
        f, c = int(key >> 32), int(key & 0xFFFFFFFF)
        ds, n = self._images[f], int(self.chunk_rows[f])
        start, stop = c * n, min((c + 1) * n, len(ds))
        try:
            raw = self._direct(ds, start, n)
            if raw is None:
                block = ds[start:stop]
            else:
                block = np.frombuffer(raw, np.uint8)[:(stop - start) * self.row_bytes]
            return block.reshape((stop - start,) + self.image_shape)
        except (OSError, ValueError, KeyError, zlib.error) as exc:
            raise DataError(f"{self.paths[f]}: cannot read rows {start}:{stop} (corrupt file?): {exc}") from None

    def _direct(self, ds, start: int, n: int):
        """The chunk's bytes read raw and inflated here, so the pool's threads decompress in parallel (h5py
        serialises its own calls); None where the file's filters ask for h5py's own path (lzf, shuffle)."""
        if ds.chunks is None or ds.shuffle or ds.fletcher32 or ds.scaleoffset or \
                ds.compression not in (None, "gzip"):
            return None
        mask, raw = ds.id.read_direct_chunk((start,) + (0,) * (ds.ndim - 1))
        if mask:  # a filter was skipped for this chunk: let h5py decode it
            return None
        if ds.compression == "gzip":
            raw = zlib.decompress(raw)
        expected = n * self.row_bytes
        if len(raw) != expected:
            raise ValueError(f"chunk of {len(raw)} bytes, expected {expected}")
        return raw

    # ---- rows
    def __getitem__(self, rows) -> np.ndarray:
        """Any rows, read through the cache (pinned for the call only)."""
        rows = np.asarray(rows)
        keys = np.unique(self.chunk_keys(rows))
        for key in keys:
            self.cache.request((self._token, key), self.chunk_bytes(key), lambda k=key: self._read_chunk(k))
        try:
            return self._gather(rows)
        finally:
            for key in keys:
                self.cache.release((self._token, key))

    def _gather(self, rows) -> np.ndarray:
        in_file, keys = self.row_key[rows] & 0xFFFFFFFF, self.chunk_keys(rows)
        out = np.empty((len(rows),) + self.image_shape, np.uint8)
        by_chunk = np.argsort(keys, kind="stable")  # the rows of one chunk side by side
        starts = np.flatnonzero(np.r_[True, keys[by_chunk][1:] != keys[by_chunk][:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(rows)]):
            picked = by_chunk[start:stop]
            key = int(keys[picked[0]])
            first = (key & 0xFFFFFFFF) * int(self.chunk_rows[key >> 32])
            out[picked] = self.cache.get((self._token, key))[in_file[picked] - first]
        return out

    def batches(self, row_lists):
        """Yield ``self[rows]`` for each of ``row_lists`` (arrays of rows), reading chunks ahead on the pool
        as far as the cache has room: every chunk stays pinned from its first batch to its last."""
        row_lists = list(row_lists)
        keys = [np.unique(self.chunk_keys(rows)) for rows in row_lists]
        ahead = done = 0  # steps whose chunks are requested / released
        try:
            for step, rows in enumerate(row_lists):
                while ahead < len(keys) and (ahead <= step or (
                        self.cache.pending < READ_AHEAD * self.cache.threads and self.cache.room_for(
                            [(self._token, k) for k in keys[ahead]], lambda k: self.chunk_bytes(k[1])))):
                    for key in keys[ahead]:
                        self.cache.request((self._token, key), self.chunk_bytes(key),
                                           lambda k=key: self._read_chunk(k))
                    ahead += 1
                block = self._gather(rows)
                for key in keys[step]:  # one release per request: a chunk stays pinned until its last step
                    self.cache.release((self._token, key))
                done = step + 1
                yield block
        finally:  # left early: what was requested ahead becomes evictable
            for step in range(done, ahead):
                for key in keys[step]:
                    self.cache.release((self._token, key))

    def needed_bytes(self, batch: int, window: int) -> int:
        """Cache bytes one batch of ``batch`` rows can need at once: the chunks of every window its rows can
        come from (two when the batch is smaller than a window)."""
        chunks = len(np.unique(self.chunk_of_row))
        per_window = window or chunks
        window_rows = per_window * int(self.chunk_rows.min())
        return min(chunks, per_window * (math.ceil(batch / window_rows) + 1)) * self.max_chunk_bytes()

    def close(self) -> None:
        for f in self._files:
            f.close()


def open_chunked(reads, cache: ChunkCache | None = None):
    """Rows [start, stop) of each (path, start, stop) (None: the whole file) as one
    :class:`~ddp_cnn.data.shards.ShardData` whose images are a :class:`ChunkedRows`: labels and source
    indices read now, images when a batch needs them.  DataError (one line naming the file) on a
    missing, damaged or mismatched file."""
    from data_tools import h5format
    from ddp_cnn.data.shards import ShardData
    labels, source_index, row_key, first, paths = [], [], [], None, [p for p, _, _ in reads]
    for number, (path, start, stop) in enumerate(reads):
        with h5format.open_checked(path) as f:
            attrs = h5format.check_structure(path, f)
            rows = slice(start, stop)
            try:
                labels.append(f["labels"][rows].astype(np.int64))
                source_index.append(f["source_index"][rows])
            except OSError as exc:
                raise DataError(f"{path}: cannot read labels (corrupt file?): {exc}") from None
        if first is None:
            first = attrs
        elif attrs["sharding_id"] != first["sharding_id"] or attrs["image_shape"] != first["image_shape"]:
            raise DataError(f"{path}: from another sharding run than {paths[0]} (sharding_id differs)")
        n = len(labels[-1])
        row_key.append((np.int64(number) << 32) | (np.arange(n, dtype=np.int64) + (start or 0)))
    labels = np.concatenate(labels)
    if len(labels) and labels.max() >= len(first["class_names"]):
        raise DataError(f"{paths[0]}: label {labels.max()} but only {len(first['class_names'])} class names")
    images = ChunkedRows(paths, np.concatenate(row_key), first["image_shape"], cache=cache)
    return ShardData(images, labels, first, list(paths), np.concatenate(source_index))

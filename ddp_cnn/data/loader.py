"""Per-rank data: open this rank's rows, shuffle per epoch, the same steps on every rank, augment, prefetch.

The files are those of ``python -m data_tools.shard`` (format in
``data_tools/h5format.py``).  Three promises the training loop relies on:

* every rank runs the same number of steps per epoch (agreed over the
  communicator), so no rank waits forever in an allreduce;
* a batch depends only on (seed, epoch, rank, step), so a run resumed
  mid-epoch sees exactly the batches an uninterrupted run would;
* bad data raises :class:`DataError` (one line naming the file) on every
  rank at once, never on one rank while the others wait in a collective.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from data_tools.errors import DataError
from ddp_cnn.data.pixels import Augment, channel_stats, normalize
from ddp_cnn.data.shards import ShardData, find_shards, plan_reads, read_planned

__all__ = ["open_rank_data", "Loader"]


# ---------------------------------------------------------------- opening a rank's rows

def open_rank_data(data_dir, split: str, comm, *, slice_single: bool = False, data_order: str = "shard",
                   stream: bool = False, cache=None) -> ShardData:
    """Collective: this rank's rows of ``split`` ("train", "test" or "val") from ``data_dir``.

    train: with M shards and N ranks, M == N gives one shard per rank, M a
    multiple of N gives rank r the shards r, r+N, ...; otherwise DataError,
    unless ``slice_single``, which cuts the concatenated shards (usually one
    file) into N contiguous hyperslabs.  test/val: the single file cut the same
    way, so every sample is evaluated on exactly one rank.  Only the rows this
    rank needs are read.  With ``data_order`` "global", train is every
    shard on every rank (:mod:`ddp_cnn.data.order`).  Every rank raises the
    same DataError when any rank fails or when ranks read files of different
    sharding runs.  ``stream``: the images stay on disk, read chunk by chunk
    through ``cache`` (a :class:`ddp_cnn.data.stream.ChunkCache`) as batches need
    them, so memory does not grow with the data (ddp_cnn.data.stream).
    """
    data_dir = Path(data_dir)
    try:
        if split == "train" and data_order == "global" and stream:
            from ddp_cnn.data.order import open_global_train
            data, error = open_global_train(data_dir, cache), None
        elif split == "train" and data_order == "global":  # every shard, whole, on every rank
            data, error = read_planned([(path, None, None) for path in find_shards(data_dir)]), None
        elif stream:
            from ddp_cnn.data.stream import open_chunked
            reads = plan_reads(data_dir, split, comm.rank, comm.size, slice_single)
            data, error = open_chunked(reads, cache), None
        else:
            data, error = read_planned(plan_reads(data_dir, split, comm.rank, comm.size, slice_single)), None
        if split == "train" and not len(data):
            raise DataError(f"{', '.join(map(str, data.paths))}: no training rows for rank {comm.rank} "
                            "(an empty shard, or more ranks than rows with --slice-data); re-shard")
    except DataError as exc:
        data, error = None, str(exc)
    except MemoryError as exc:  # --data-in-memory with more rows than this rank can hold
        data, error = None, (f"{data_dir}: the {split} rows do not fit in this rank's memory ({exc}); "
                             "stream them (leave out --data-in-memory)")
    outcomes = comm.allgather_obj((error, data.attrs["sharding_id"] if data is not None else None))
    failed = [(r, e) for r, (e, _) in enumerate(outcomes) if e]
    if failed:  # the same line on every rank: the first failing rank's
        rank, message = failed[0]
        raise DataError(message if comm.size == 1 else f"{message} (rank {rank})")
    if len({sid for _, sid in outcomes}) > 1:
        raise DataError(f"{data_dir}: ranks read files of different sharding runs (sharding_id differs); re-shard")
    return data


# ---------------------------------------------------------------- batches

def _is_streamed(images) -> bool:
    from ddp_cnn.data.stream import ChunkedRows
    return isinstance(images, ChunkedRows)


def _device_scope(xp) -> Callable[[], contextlib.AbstractContextManager]:
    """A context that makes the prefetch thread use the caller's GPU (CuPy's current device is per thread)."""
    cuda = getattr(xp, "cuda", None)
    if cuda is None:
        return contextlib.nullcontext
    device_id = cuda.Device().id
    return lambda: cuda.Device(device_id)


def _prefetched(produce: Callable, items: Iterable, depth: int, scope) -> Iterator:
    """Yield produce(item) for each item, computed up to ``depth`` ahead in a background thread.

    An exception in the thread is re-raised here; closing the generator early
    stops the thread (it notices within 0.1 s of finishing its current item).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message) -> None:
        while not stop.is_set():
            try:
                q.put(message, timeout=0.1)
                return
            except queue.Full:
                pass

    def work() -> None:
        try:
            with scope():
                for item in items:
                    if stop.is_set():
                        return
                    put(("item", produce(item)))
        except BaseException as exc:  # handed to the consumer, who decides
            put(("error", exc))
            return
        put(("done", None))

    thread = threading.Thread(target=work, name="ddp_cnn-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value
    finally:
        stop.set()
        thread.join()


class Loader:
    """Batches (x, y) of one rank's data: x (B, H, W, C) in ``dtype`` on ``xp``, y (B,) int64 on ``xp``.

    x = :func:`normalize` (pixel/255 - mean)/std with the stored training mean/std
    unless given; channels last, as the model takes them (C = 1 for grayscale).
    With ``drop_last`` (training) the constructor is collective: every rank
    gets steps_per_epoch = min over ranks of len(data)//batch_size.  Without
    it (evaluation) each rank covers all its samples in ceil(len/batch) steps,
    a count that differs between ranks, so only reduce totals afterwards.
    ``data_order="global"``: ``data`` is every rank's (all the training rows),
    batch t is rows [t*G, (t+1)*G) of one order seeded by (seed, epoch), and
    this rank reads its share [r*G//N, (r+1)*G//N) of it (``batch_size``),
    so the batches do not depend on the rank count (ddp_cnn.data.order).
    Data opened with ``stream`` (images a :class:`ddp_cnn.data.stream.ChunkedRows`)
    is read chunk by chunk ahead of the step, and its order is a block shuffle
    over windows of ``window`` chunks (:func:`ddp_cnn.data.stream.block_order`).
    """

    def __init__(self, data: ShardData, *, batch_size: int, comm, seed: int, xp=np, dtype=np.float32,
                 shuffle: bool = True, drop_last: bool = True, augment: Augment | None = None,
                 prefetch: int = 2, mean: float | None = None, std: float | None = None, data_order: str = "shard",
                 global_batch: int | None = None, window: int | None = None):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise DataError(f"prefetch must be >= 0, got {prefetch}")
        self.data, self.batch_size, self.comm, self.seed = data, batch_size, comm, seed
        self.xp, self.dtype, self.shuffle, self.drop_last = xp, np.dtype(dtype), shuffle, drop_last
        self.augment, self.prefetch = augment, prefetch
        if data_order not in ("shard", "global"):
            raise DataError(f"data order must be shard or global, got {data_order!r}")
        # global (ddp_cnn.data.order): every rank holds every row; batch t of the epoch is the
        # same global batch on any rank count, and this rank takes its slice of it.
        self.data_order = data_order
        self.global_batch, self.start = batch_size, 0  # rows of this rank in each batch of the order
        if data_order == "global":
            # Rank r of N takes rows [r*G//N, (r+1)*G//N) of each global batch of G: G need not divide.
            g = self.global_batch = global_batch or batch_size * comm.size
            self.start = comm.rank * g // comm.size
            if batch_size != (comm.rank + 1) * g // comm.size - self.start:
                raise DataError(f"rank {comm.rank} of {comm.size}: batch size {batch_size} is not its share of "
                                f"the global batch {g}")
        try:  # one value per channel (a scalar: every channel)
            channels = data.images.shape[3] if len(data.images.shape) == 4 else 1
            self.mean, self.std = channel_stats(data.attrs["mean"] if mean is None else mean,
                                                data.attrs["std"] if std is None else std, channels)
        except DataError as exc:
            raise DataError(f"{exc} (from {data.paths[:1] or 'the caller'})") from None
        self.steps_per_epoch = self._agree_steps() if drop_last else math.ceil(len(data) / batch_size)
        self._scope = _device_scope(xp)
        self.wait_seconds = 0.0  # time the consumer waited for batches (reset by whoever reports it)
        self.streamed = _is_streamed(data.images)
        if self.streamed:
            from ddp_cnn.data.stream import DEFAULT_WINDOW
            self.window = DEFAULT_WINDOW if window is None else window
            if self.window < 0:
                raise DataError(f"shuffle window must be >= 0 chunks, got {self.window}")
            self._check_cache()

    def _check_cache(self) -> None:
        """DataError when the chunk cache cannot hold the chunks one batch needs at once."""
        images = self.data.images
        batch = self.global_batch if self.data_order == "global" else self.batch_size
        needed = images.needed_bytes(batch, self.window if self.shuffle else 1)
        if needed > images.cache.limit:
            mb = 2**20
            raise DataError(f"--data-cache-mb {images.cache.limit / mb:g}: too small for one batch of {batch} "
                            f"(the chunks of the shuffle windows it can draw from: {needed / mb:.1f} MB); give "
                            f"--data-cache-mb {math.ceil(needed / mb)} or more, or a smaller --shuffle-window")

    def describe(self) -> str:
        """One line for the start of a run: how this loader reads."""
        if not self.streamed:
            return "data: in memory, full shuffle each epoch"
        images = self.data.images
        return (f"data: streamed in chunks of {int(images.chunk_rows.max())} rows, chunk cache "
                f"{images.cache.limit / 2**20:.0f} MB per rank ({images.cache.origin}), "
                f"shuffle window {self.window or 'all'} chunks ({images.cache.threads} read threads)")

    def _agree_steps(self) -> int:
        smallest = self.comm.allreduce_scalar(len(self.data), "min")
        if self.data_order == "global":
            if smallest < self.global_batch:
                raise DataError(f"global batch {self.global_batch} is larger than the training set "
                                f"({smallest} samples): use a smaller batch size")
            return smallest // self.global_batch
        if smallest < self.batch_size:
            raise DataError(f"batch size {self.batch_size} per rank is larger than the smallest rank's data "
                            f"({smallest} samples): use a smaller batch size or fewer ranks")
        return smallest // self.batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of an epoch: a permutation of this rank's rows seeded by (seed, epoch, rank),
        or with the global order, of every row seeded by (seed, epoch)."""
        n = len(self.data)
        if not self.shuffle:
            return np.arange(n)
        if self.streamed:  # a block shuffle: chunks in a random order, rows within windows of chunks
            from ddp_cnn.data.order import epoch_rng
            from ddp_cnn.data.stream import block_order
            rng = (epoch_rng(self.seed, epoch) if self.data_order == "global"
                   else np.random.default_rng([self.seed, epoch, self.comm.rank]))
            return block_order(rng, self.data.images.chunk_of_row, self.window)
        if self.data_order == "global":
            from ddp_cnn.data.order import epoch_order
            return epoch_order(self.seed, epoch, n)
        return np.random.default_rng([self.seed, epoch, self.comm.rank]).permutation(n)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        """Batches start_step .. steps_per_epoch-1 of ``epoch``; identical whether or not the epoch was resumed."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        order = self.order(epoch)
        steps = range(start_step, self.steps_per_epoch)
        if self.streamed:  # the images of the coming batches, read chunk by chunk ahead of them
            items = zip(steps, self.data.images.batches(self.rows(order, s) for s in steps))
        else:
            items = ((s, None) for s in steps)

        def produce(item):
            step, images = item
            return self.batch(order, epoch, step, images)

        if self.prefetch == 0:
            return self._timed(produce(item) for item in items)
        return self._timed(_prefetched(produce, items, self.prefetch, self._scope))

    def _timed(self, batches: Iterator) -> Iterator:
        """The batches, adding the time spent waiting for each to ``wait_seconds``."""
        try:
            while True:
                started = time.perf_counter()
                try:
                    value = next(batches)
                except StopIteration:
                    return
                finally:
                    self.wait_seconds += time.perf_counter() - started
                yield value
        finally:
            batches.close()

    def rows(self, order: np.ndarray, step: int) -> np.ndarray:
        """This rank's data rows of batch ``step`` of the epoch whose sample order is ``order``."""
        start = step * self.global_batch + self.start
        return order[start:start + self.batch_size]

    def batch(self, order: np.ndarray, epoch: int, step: int, images: np.ndarray | None = None) -> tuple:
        """Batch ``step`` of the epoch whose sample order is ``order``, ready on the device (``images``:
        its rows' pixels when read already)."""
        rows = self.rows(order, step)
        images = self.data.images[rows] if images is None else images
        if self.augment is not None:
            if self.data_order == "global":  # drawn for the global batch, this rank's slice used
                from ddp_cnn.data.order import BatchSlice
                rng = BatchSlice(np.random.default_rng([self.seed, epoch, step, 1]), self.start, self.global_batch)
            else:
                rng = np.random.default_rng([self.seed, epoch, self.comm.rank, step, 1])
            images = self.augment(images, rng, fill=np.rint(self.mean * 255).astype(np.uint8))
        return self.to_device(images, self.data.labels[rows])

    def to_device(self, images: np.ndarray, labels: np.ndarray) -> tuple:
        """(x (B, H, W, C), y) on the device from uint8 images (B, H, W[, C]) and their labels."""
        xp = self.xp
        x = normalize(images, self.mean, self.std, self.dtype, xp)  # uint8 crosses: 4x fewer bytes than float32
        y = xp.asarray(labels)
        cuda = getattr(xp, "cuda", None)
        if cuda is not None:
            # Ready before the consumer touches it, whatever stream the consumer uses.
            cuda.get_current_stream().synchronize()
        return x, y

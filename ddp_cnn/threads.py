"""CPU parallelism inside one process.

Two ways, both with BLAS single-threaded (threadpoolctl) and NumPy releasing
the GIL in its loops and in BLAS, so the threads really run at once:

- Batch replicas (training, every model without BatchNorm): each thread runs
  the whole network, forward and backward, on its share of the batch, with a
  replica of the layers whose parameters are views of the one buffer; the
  shares' gradients are added in thread order.  One hand-over per step.
  :class:`ddp_cnn.model.Sequential` does this, with its threads in
  :func:`serial` mode.
- Per-layer split (evaluation, BatchNorm models): every heavy pass (GEMMs,
  im2col, activations, pooling, dropout, the optimizer) is split by images
  over the threads.  Dozens of hand-overs a step; on a VM whose cores are
  taken away now and then (steal time), every one of them waits for the
  slower thread, which made it 5-20% slower than the replicas here.

Why not BLAS threads: they parallelise only the GEMMs and spin between
them, so the memory-bound passes, a third of a CPU step, run on one core.

Splits are contiguous and fixed for a given thread count, and partial sums
are added in thread order, so a run is deterministic; results with
different thread counts differ by rounding only (like BLAS thread counts).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from . import _THREAD_VARS

_threads = 1
_pool: ThreadPoolExecutor | None = None
_blas_limit = None
_configured = False
_local = threading.local()  # .serial: this thread runs every pass itself (a replica's thread)

# Passes over fewer bytes than this run in the calling thread: handing work
# to another thread costs ~20-50 us, as much as ~1 MB of memory traffic.
MIN_PARALLEL_BYTES = 512 * 1024


def default_threads() -> int:
    """The thread count the environment asks for: OMP_NUM_THREADS (set by the user,
    or by ddp_cnn/__init__ to the cores per rank on this node), else every core."""
    for var in _THREAD_VARS:
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure(threads: int | None = None) -> int:
    """Split the CPU work over `threads` threads; returns the count.

    None keeps an earlier choice, or takes :func:`default_threads` the first
    time.  With more than one, BLAS is limited to one thread (threadpoolctl)
    until the next call, since the pool owns the cores; with one, BLAS keeps
    the threads the environment gave it.
    """
    global _threads, _pool, _blas_limit, _configured
    if threads is None:
        threads = _threads if _configured else default_threads()
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise ValueError(f"--threads: expected an int >= 1, got {threads!r}")
    threads, _configured = int(threads), True
    if threads == _threads and (threads == 1 or _pool is not None):
        return threads
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    if _blas_limit is not None:
        _blas_limit.restore_original_limits()
        _blas_limit = None
    _threads = threads
    if threads > 1:
        from threadpoolctl import threadpool_limits
        _blas_limit = threadpool_limits(limits=1, user_api="blas")
        _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="ddp_cnn-cpu")
    return threads


def count() -> int:
    """Threads the heavy passes are split over (1: everything runs in the caller)."""
    return _threads


@contextmanager
def serial():
    """Within this block the calling thread runs every pass itself, unsplit.

    For work that is already one share of the batch per thread (the model
    replicas of :class:`ddp_cnn.model.Sequential`): a pool thread must never
    wait on the pool it belongs to.
    """
    before = getattr(_local, "serial", False)
    _local.serial = True
    try:
        yield
    finally:
        _local.serial = before


def in_serial() -> bool:
    """Whether the calling thread is inside :func:`serial`."""
    return getattr(_local, "serial", False)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges over range(n), sizes differing by at most 1, none empty."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def plan(n: int, nbytes: int | None = None) -> list[tuple[int, int]]:
    """How :func:`parallel` splits range(n): one range per thread, or the whole
    of it when there is one thread or `nbytes` (the pass's memory traffic) is
    below MIN_PARALLEL_BYTES."""
    small = nbytes is not None and nbytes < MIN_PARALLEL_BYTES
    return split(n, 1 if _pool is None or small or in_serial() else _threads)


def run(ranges: list[tuple[int, int]], fn) -> None:
    """fn(part, start, stop) for each range of :func:`plan`, part 0 in the caller.

    An exception in any part is raised here after every part has finished.
    """
    if len(ranges) == 1:
        fn(0, *ranges[0])
        return
    futures = [_pool.submit(fn, i, a, b) for i, (a, b) in enumerate(ranges) if i > 0]
    try:
        fn(0, *ranges[0])
    finally:
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def parallel(n: int, fn, nbytes: int | None = None) -> int:
    """fn(part, start, stop) over range(n) split between the threads (:func:`plan`,
    :func:`run`); returns the number of parts."""
    ranges = plan(n, nbytes)
    run(ranges, fn)
    return len(ranges)

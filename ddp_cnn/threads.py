"""CPU parallelism inside one process: each layer's batch split over threads.

Why not BLAS threads: they parallelise only the GEMMs and spin between
them, so the memory-bound passes (im2col, activations, pooling, dropout,
the optimizer), a third of a CPU step, run on one core while the others
wait.  Here BLAS runs single-threaded and every heavy pass, GEMMs included,
is split by images over a small pool of threads; NumPy releases the GIL in
its loops and in BLAS, so the threads really run at once.

The split is contiguous and fixed for a given thread count, and partial
sums are added in thread order, so a run is deterministic; results with
different thread counts differ by rounding only (like BLAS thread counts).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from . import _THREAD_VARS

_threads = 1
_pool: ThreadPoolExecutor | None = None
_blas_limit = None
_configured = False

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
    return split(n, 1 if _pool is None or small else _threads)


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

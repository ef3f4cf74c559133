"""Mean of the flat gradient buffer over ranks, bucket by bucket, overlapping backward.

Parameters sit in the flat buffer in reverse layer order, so backward fills
``grads`` from offset 0 upwards.  A bucket is a contiguous slice made of whole
layers; it is *ready* when backward has passed its lowest layer, and its
allreduce starts right then, while the rest of backward runs.

Transports:
- ``mpi``: a worker thread runs blocking ``MPI_Allreduce`` bucket by bucket,
  in the same order on every rank, on host memory (staged through pinned host
  buffers on a GPU: the MPI here is not CUDA-aware).  A thread rather than
  ``Iallreduce`` because MPICH and Open MPI make little asynchronous progress
  without one, so the overlap would not happen.
- ``nccl``: ``ncclAllReduce`` in place on device memory on a side stream that
  waits on an event of the compute stream; nothing blocks the host.
- ``single``: nothing to do.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np


def plan_buckets(layer_ranges, bucket_bytes: int, itemsize: int):
    """Group layers (taken in backward order) into buckets of about `bucket_bytes`.

    layer_ranges: per layer index, its (start, end) in the flat buffer (empty
    when it has no parameters).  Returns [(start, end, trigger_layer)] in
    buffer order; trigger_layer is the layer whose backward completes the
    bucket.  bucket_bytes <= 0 gives one bucket, started after backward.
    """
    owned = [(i, a, b) for i, (a, b) in enumerate(layer_ranges) if b > a]
    owned.sort(key=lambda t: t[1])  # buffer order == backward order
    if not owned:
        return []
    if bucket_bytes <= 0:
        return [(owned[0][1], owned[-1][2], None)]
    buckets, start, trigger = [], None, None
    for i, a, b in owned:
        if start is None:
            start = a
        trigger = i
        if (b - start) * itemsize >= bucket_bytes:
            buckets.append((start, b, trigger))
            start = None
    if start is not None:
        buckets.append((start, owned[-1][2], trigger))
    return buckets


class GradReducer:
    """Averages ``grads`` over ``comm``; call begin(), layer_done(i) per layer in backward, finish()."""

    def __init__(self, comm, grads, layer_ranges, bucket_mb: float, backend, transport: str = "mpi"):
        self.comm, self.grads, self.backend = comm, grads, backend
        self.size = comm.size
        self.buckets = plan_buckets(layer_ranges, int(bucket_mb * 2**20), grads.dtype.itemsize)
        self.by_trigger = {trig: k for k, (_, _, trig) in enumerate(self.buckets) if trig is not None}
        self.transport = transport  # "mpi" or "nccl" also work with one rank (tests use that)
        self.comm_seconds = 0.0     # time the transport spent in collectives (thread or host)
        self.exposed_seconds = 0.0  # time the caller waited for them in finish()
        self.inverse = grads.dtype.type(1.0 / self.size)
        if self.transport == "mpi":
            self._setup_mpi()
        elif self.transport == "nccl":
            self._setup_nccl()

    # ---- lifecycle ----------------------------------------------------
    def begin(self) -> None:
        self.started = [False] * len(self.buckets)

    def layer_done(self, layer_index: int) -> None:
        k = self.by_trigger.get(layer_index)
        if k is not None and self.transport != "single":
            self._start(k)

    def finish(self) -> None:
        """Block until every bucket is averaged (on GPU: until the compute stream will see it)."""
        if self.transport == "single":
            return
        for k in range(len(self.buckets)):
            if not self.started[k]:
                self._start(k)
        t0 = time.perf_counter()
        if self.transport == "mpi":
            self._wait_mpi()
        else:
            self._wait_nccl()
        self.exposed_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.transport == "mpi" and self.worker is not None:
            self.jobs.put(None)
            self.worker.join()
            self.worker = None

    def _start(self, k: int) -> None:
        self.started[k] = True
        if self.transport == "mpi":
            self._start_mpi(k)
        else:
            self._start_nccl(k)

    # ---- MPI, host staged ----------------------------------------------
    def _setup_mpi(self):
        MPI = self.comm.MPI
        self.MPI = MPI
        self.threaded = MPI.Query_thread() >= MPI.THREAD_SERIALIZED
        self.worker = None
        if self.backend.is_gpu:
            import cupy
            import cupyx
            self.cupy = cupy
            self.host = cupyx.empty_pinned(self.grads.shape, self.grads.dtype)
            self.copy_stream = cupy.cuda.Stream(non_blocking=True)
            self.ready_events = [cupy.cuda.Event(disable_timing=True) for _ in self.buckets]
            self.done_event = cupy.cuda.Event(disable_timing=True)
        if self.threaded:
            self.jobs: queue.Queue = queue.Queue()
            self.results: queue.Queue = queue.Queue()
            self.worker = threading.Thread(target=self._worker_loop, name="grad-allreduce", daemon=True)
            self.worker.start()

    def _start_mpi(self, k):
        if self.backend.is_gpu:
            # Mark where the compute stream is; the worker copies once it gets there.
            self.ready_events[k].record(self.cupy.cuda.get_current_stream())
        if self.threaded:
            self.jobs.put(k)
        else:
            self._reduce_bucket(k)

    def _worker_loop(self):
        if self.backend.is_gpu:
            self.cupy.cuda.Device(self.backend.device_id).use()
        while True:
            k = self.jobs.get()
            if k is None:
                return
            try:
                self._reduce_bucket(k)
                self.results.put(None)
            except BaseException as exc:  # handed to the main thread, which raises it
                self.results.put(exc)

    def _reduce_bucket(self, k):
        a, b, _ = self.buckets[k]
        t0 = time.perf_counter()
        if self.backend.is_gpu:
            with self.copy_stream:
                self.copy_stream.wait_event(self.ready_events[k])
                self.grads[a:b].get(out=self.host[a:b], stream=self.copy_stream, blocking=True)
            self.comm.comm.Allreduce(self.MPI.IN_PLACE, self.host[a:b], op=self.MPI.SUM)
            with self.copy_stream:
                self.grads[a:b].set(self.host[a:b], stream=self.copy_stream)
                self.grads[a:b] *= self.inverse
        else:
            view = self.grads[a:b]
            self.comm.comm.Allreduce(self.MPI.IN_PLACE, view, op=self.MPI.SUM)
            view *= self.inverse
        self.comm_seconds += time.perf_counter() - t0

    def _wait_mpi(self):
        if self.threaded:
            errors = [self.results.get() for _ in self.buckets]
            for exc in errors:
                if exc is not None:
                    raise exc
        if self.backend.is_gpu:
            self.done_event.record(self.copy_stream)
            self.cupy.cuda.get_current_stream().wait_event(self.done_event)

    # ---- NCCL ------------------------------------------------------------
    def _setup_nccl(self):
        import cupy
        from cupy.cuda import nccl
        self.cupy, self.nccl = cupy, nccl
        uid = nccl.get_unique_id() if self.comm.rank == 0 else None
        uid = self.comm.bcast_obj(uid)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.comm.rank)
        self.nccl_dtype = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                           np.dtype(np.float64): nccl.NCCL_FLOAT64}[np.dtype(self.grads.dtype)]
        self.comm_stream = cupy.cuda.Stream(non_blocking=True)
        self.ready_events = [cupy.cuda.Event(disable_timing=True) for _ in self.buckets]
        self.done_event = cupy.cuda.Event(disable_timing=True)

    def _start_nccl(self, k):
        a, b, _ = self.buckets[k]
        self.ready_events[k].record(self.cupy.cuda.get_current_stream())
        self.comm_stream.wait_event(self.ready_events[k])
        view = self.grads[a:b]
        self.nccl_comm.allReduce(view.data.ptr, view.data.ptr, b - a, self.nccl_dtype, self.nccl.NCCL_SUM,
                                 self.comm_stream.ptr)
        with self.comm_stream:
            view *= self.inverse

    def _wait_nccl(self):
        self.done_event.record(self.comm_stream)
        self.cupy.cuda.get_current_stream().wait_event(self.done_event)

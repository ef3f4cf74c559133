"""MPI over mpi4py.  Gradients are averaged on host memory (staged from a GPU: the MPIs
seen on the GPU machines are not CUDA-aware and segfault on device pointers).

``allreduce_mean`` hands the view to one progress thread, which runs blocking
``MPI_Allreduce`` calls in submission order (the same on every rank) on a
duplicate of the communicator, so they never interleave with the main
thread's collectives.  A thread rather than ``Iallreduce``: MPICH and Open
MPI make little asynchronous progress without one, so nothing would overlap.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager

import numpy as np

from ddp_cnn.dist.comm.base import CollectiveTimeout, Communicator, Handle, check_op, remaining

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


class ThreadHandle(Handle):
    """Completed by the progress thread; ``wait`` re-raises its error here."""

    def __init__(self, size: int, on_gpu: bool):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.size, self.on_gpu = size, on_gpu
        self.gpu_done = None  # a CUDA event the compute stream waits for (GPU views)

    def wait(self, deadline=None):
        if not self.done.wait(remaining(deadline)):
            raise CollectiveTimeout(f"allreduce of {self.size} gradient values not complete by its deadline: "
                                    "a rank stalled, died or lost its network link", what="the gradient allreduce")
        if self.error is not None:
            raise self.error
        if self.gpu_done is not None:
            import cupy
            cupy.cuda.get_current_stream().wait_event(self.gpu_done)


class Watchdog:
    """Ends the job when a blocking collective of the main thread outlives ``timeout`` seconds.

    A blocking MPI call cannot be interrupted from Python, so a thread of
    its own watches the one in progress and, past its deadline, prints one
    line naming it and aborts every rank.  ``timeout`` None: no limit.
    """

    def __init__(self, comm):
        self.comm, self.timeout = comm, None
        self.current = None  # (what, deadline) of the collective in progress
        self.thread = None

    @contextmanager
    def watch(self, what: str):
        if not self.timeout:
            yield
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="ddp_cnn-watchdog", daemon=True)
            self.thread.start()
        watched = (what, time.monotonic() + self.timeout)  # a new tuple each time: identity names this call
        self.current = watched
        try:
            yield
        finally:
            self.current = None

    def _run(self):
        from ddp_cnn.dist.faults import abort_lost_rank
        while True:
            time.sleep(0.25)
            current = self.current
            # Still the same call, and past its deadline, when looked at once more: a collective
            # that completed meanwhile (or the next one) is never blamed.
            if current is not None and time.monotonic() > current[1] and self.current is current:
                abort_lost_rank(self.comm, current[0], self.timeout, step=self.comm.step)


class MPIComm(Communicator):
    name = "mpi"

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # Node-local rank picks the GPU: ranks sharing memory share a node.
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.threaded = MPI.Query_thread() >= MPI.THREAD_SERIALIZED
        self.grad_comm = self.comm.Dup()  # the progress thread's own: never mixed with the main thread's calls
        # Point-to-point only, for naming a rank that missed a deadline while a collective hangs (census)
        self.census_comm = self.comm.Dup()
        self.multiple = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._jobs: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._staging: dict = {}  # (device pointer, size) -> pinned host buffer, CUDA events
        self.watchdog = Watchdog(self)

    # ---- the gradient path ---------------------------------------------
    def allreduce_mean(self, view) -> Handle:
        on_gpu = not isinstance(view, np.ndarray)
        handle = ThreadHandle(view.size, on_gpu)
        if on_gpu:  # the copy to the host starts once the compute stream has produced the view
            import cupy
            stage = self._stage(view)
            stage["ready"].record(cupy.cuda.get_current_stream())
        if not self.threaded:  # no progress thread: the allreduce blocks here, under the watchdog
            with self.watchdog.watch(f"an allreduce of {view.size} gradient values"):
                self._reduce(view, handle)
            return handle
        if self._worker is None:
            self._jobs = queue.Queue()
            self._worker = threading.Thread(target=self._progress, name="ddp_cnn-allreduce", daemon=True)
            self._worker.start()
        self._jobs.put((view, handle))
        return handle

    def _progress(self):
        device = None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            view, handle = job
            if handle.on_gpu and device is None:  # CuPy's current device is per thread
                device = view.device
                device.use()
            self._reduce(view, handle)

    def _reduce(self, view, handle):
        handle.started = time.perf_counter()
        try:
            if handle.on_gpu:
                self._reduce_staged(view, handle)
            else:
                self.grad_comm.Allreduce(self.MPI.IN_PLACE, view, op=self.MPI.SUM)
                view *= view.dtype.type(1.0 / self.size)
        except BaseException as exc:  # handed to the waiting thread, which raises it
            handle.error = exc
        handle.completed = time.perf_counter()
        handle.done.set()

    def _stage(self, view) -> dict:
        key = (view.data.ptr, view.size)
        if key not in self._staging:
            import cupy
            import cupyx
            self._staging[key] = {"host": cupyx.empty_pinned(view.shape, view.dtype),
                                  "stream": cupy.cuda.Stream(non_blocking=True),
                                  "ready": cupy.cuda.Event(disable_timing=True),
                                  "done": cupy.cuda.Event(disable_timing=True)}
        return self._staging[key]

    def _reduce_staged(self, view, handle):
        stage = self._stage(view)
        host, stream = stage["host"], stage["stream"]
        with stream:
            stream.wait_event(stage["ready"])
            view.get(out=host, stream=stream, blocking=True)
        self.grad_comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        with stream:
            view.set(host, stream=stream)
            view *= view.dtype.type(1.0 / self.size)
            stage["done"].record(stream)
        handle.gpu_done = stage["done"]

    def close(self):
        if self._worker is not None:
            self._jobs.put(None)
            # A thread stuck in an allreduce that will never complete (the reason we are
            # closing after a CollectiveTimeout) must not hang the exit: it is a daemon.
            self._worker.join(timeout=1.0)
            self._worker = None

    # ---- small collectives, from the main thread, each under the watchdog ------
    def _op(self, op):
        check_op(op)
        return getattr(self.MPI, _OPS[op])

    def allreduce_scalar(self, value, op="sum"):
        with self.watchdog.watch("an allreduce of a number"):
            return self.comm.allreduce(value, op=self._op(op))

    def allreduce_host(self, array, op="sum"):
        src = np.ascontiguousarray(array)
        out = np.empty_like(src)
        with self.watchdog.watch(f"an allreduce of {src.size} values"):
            self.comm.Allreduce(src, out, op=self._op(op))
        return out

    def bcast_obj(self, obj, root=0):
        with self.watchdog.watch(f"a broadcast from rank {root}"):
            return self.comm.bcast(obj, root=root)

    def allgather_obj(self, obj):
        with self.watchdog.watch("an allgather"):
            return self.comm.allgather(obj)

    def gather_obj(self, obj, root=0):
        with self.watchdog.watch(f"a gather to rank {root}"):
            return self.comm.gather(obj, root=root)

    def barrier(self):
        with self.watchdog.watch("a barrier"):
            self.comm.Barrier()

    def set_timeout(self, seconds):
        self.watchdog.timeout = seconds or None

    def census(self, position, grace):
        """Send ``position`` to every other rank and gather theirs for ``grace`` seconds (see the base
        class).  Non-blocking point-to-point on a communicator of its own, from whichever thread
        found the deadline passed while another may sit in the stuck collective: needs
        MPI_THREAD_MULTIPLE.  A stopped, dead or cut-off rank never sends."""
        if not self.multiple:
            return None
        others = [r for r in range(self.size) if r != self.rank]
        # Never waited for (a silent rank never receives); kept, so their buffers outlive the sends
        self._census_sends = [self.census_comm.isend(position, dest=r, tag=7) for r in others]
        pending = {r: self.census_comm.irecv(source=r, tag=7) for r in others}
        answered = {self.rank: position}
        end = time.monotonic() + grace
        while pending and time.monotonic() < end:
            for r, request in list(pending.items()):
                done, value = request.test()
                if done:
                    answered[r] = value
                    del pending[r]
            time.sleep(0.05)
        return answered

    def abort(self, code=1):
        self.comm.Abort(code)


__all__ = ["MPIComm", "ThreadHandle"]

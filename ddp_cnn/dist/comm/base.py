"""The Communicator interface every transport implements, and the handle of a pending allreduce.

Every method documented as "collective" must be called by every rank, in the
same order.  Object collectives (``*_obj``) pickle Python values and are for
start-up and bookkeeping; ``allreduce_host`` sums small host arrays
(metrics); ``allreduce_mean`` is the gradient path: non-blocking, in place,
on a flat view of the gradient buffer.
"""
from __future__ import annotations

import os
import time

import numpy as np

OPS = ("sum", "min", "max")


class CollectiveTimeout(RuntimeError):
    """A collective did not complete by its deadline: a rank stalled, died or lost its link.
    ``what`` names the collective for the line that ends the job."""

    def __init__(self, message: str, what: str = "the gradient allreduce"):
        super().__init__(message)
        self.what = what


class Handle:
    """A pending ``allreduce_mean``.  ``wait(deadline)`` returns once the mean is in place.

    ``started``/``completed``: ``time.perf_counter()`` when the reduction began and ended on the host
    (the trace's allreduce spans end at ``completed``); None where the host never sees it (NCCL).
    """

    started: float | None = None
    completed: float | None = None

    def wait(self, deadline: float | None = None) -> None:
        """Block until done, or raise CollectiveTimeout past ``deadline`` (a time.monotonic() value; None: no limit)."""


class DoneHandle(Handle):
    """A collective that completed inside the call (one rank, or an MPI without a progress thread)."""

    def __init__(self):
        self.started = self.completed = time.perf_counter()


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"allreduce: op must be one of {list(OPS)}, got {op!r}")


class Communicator:
    """The interface: who this rank is, and the collectives training needs."""

    name: str
    rank: int
    size: int
    local_rank: int   # rank among the processes of this node: picks the GPU
    local_size: int
    step: int | None = None  # the global step in progress, set by the Trainer: deadline lines name it

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_mean(self, view) -> Handle:
        """Collective, non-blocking: replace ``view`` (a contiguous 1-D slice of host or device
        memory) by its mean over ranks.  Do not touch ``view`` until the handle's wait returns."""
        raise NotImplementedError

    def allreduce_scalar(self, value, op: str = "sum"):
        """Collective: reduce one Python number over ranks with op in sum|min|max."""
        raise NotImplementedError

    def allreduce_host(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Collective: reduce a small host array (metrics, confusion matrix); returns a new array."""
        raise NotImplementedError

    def bcast_obj(self, obj, root: int = 0):
        """Collective: rank root's picklable object, on every rank."""
        raise NotImplementedError

    def allgather_obj(self, obj) -> list:
        """Collective: the list of every rank's object, in rank order."""
        raise NotImplementedError

    def gather_obj(self, obj, root: int = 0) -> list | None:
        """Collective: on rank root, the list of every rank's object in rank order; None elsewhere."""
        everyone = self.allgather_obj(obj)
        return everyone if self.rank == root else None

    def barrier(self) -> None:
        """Collective: wait until every rank gets here."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort)."""
        os._exit(code)

    def census(self, position: dict, grace: float) -> dict | None:
        """For the ranks whose deadline passed: each rank that answers within ``grace`` seconds,
        mapped to the ``position`` it sent (this rank's own included); None where the transport
        cannot ask without the collective that is stuck."""
        return {self.rank: position} if self.size == 1 else None

    def set_timeout(self, seconds: float | None) -> None:
        """From now on, a blocking collective that takes longer than ``seconds`` ends the job with one
        line naming it (None or 0: no limit).  One process has nothing to wait for."""

    def close(self) -> None:
        """Stop background threads; the communicator is not used for gradients afterwards."""

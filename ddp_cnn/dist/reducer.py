"""Mean of the flat gradient buffer over ranks, bucket by bucket, overlapping backward.

Parameters sit in the flat buffer in reverse layer order, so backward fills
the gradients from offset 0 upwards.  A bucket is a contiguous slice made of
whole layers; it is *ready* when backward has passed its lowest layer, and
its ``allreduce_mean`` starts right then, while the rest of backward runs.
The reducer only plans buckets and orders them; the communicator moves
the bytes.

The buffer has one element more than the gradients: the step's flag, which
rides in the last bucket.  Each rank adds 0 x (max + min) of each bucket
before starting it, which turns the flag into NaN when the rank's gradient
holds a NaN or an infinity (and never overflows on finite values), and adds
its stop request (1 or 0) just before the last bucket starts, so a signal
that arrives during backward still counts for this step, and a checkpoint
request (ranks + 1, or 0: rank 0's clock under --checkpoint-every-seconds).
After the mean, the flag is identical on every rank: NaN when any rank's
gradient was not finite, else ranks x flag = stops + (ranks + 1) x checkpoint
(:meth:`GradReducer.requests`).  No other collective, and no host
synchronisation, is needed to agree on any of them.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ddp_cnn.system.trace import NO_TRACE


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
    """Averages ``buffer`` (gradients + the flag) over ``comm``.

    Per step: ``begin(stop)``, ``layer_done(i)`` after each layer's backward
    (pass it as the model's ``on_layer_done``), ``finish(deadline)``; then
    :attr:`flag` holds the agreed flag.  With gradient accumulation,
    ``accumulate()`` after each earlier micro-batch's backward.
    """

    def __init__(self, comm, buffer, layer_ranges, bucket_mb: float = 4.0, tracer=NO_TRACE):
        self.comm, self.buffer = comm, buffer
        self.tracer = tracer  # a ddp_cnn.system.trace.Tracer: each bucket's allreduce as a span (--trace)
        self.n = buffer.size - 1  # gradients; buffer[n] is the flag
        planned = plan_buckets(layer_ranges, int(bucket_mb * 2**20), buffer.dtype.itemsize)
        if not planned:  # a model without parameters still agrees on the flag
            planned = [(0, 0, None)]
        a, _, trigger = planned[-1]
        self.buckets = planned[:-1] + [(a, self.n + 1, trigger)]  # the last bucket carries the flag
        self.by_trigger = {trig: k for k, (_, _, trig) in enumerate(self.buckets) if trig is not None}
        # Summed over steps: from the first bucket's start to the last one's completion (the
        # allreduces in flight), and the part of that the caller waited in finish() (not hidden
        # behind backward).  exposed <= comm by construction.
        self.comm_seconds = 0.0
        self.exposed_seconds = 0.0
        self.handles: list = []
        # --accumulate: the earlier micro-batches' gradients, summed; added into each bucket as it starts.
        self.accumulated, self.pending, self.add = None, False, None

    @property
    def flag(self):
        """The agreed flag (a 0-d view of the buffer): NaN = non-finite, > 0 = stop requested."""
        return self.buffer[self.n]

    def accumulate(self) -> None:
        """Add the gradients backward just wrote (an earlier micro-batch's) to the accumulator."""
        grads = self.buffer[:self.n]
        if self.accumulated is None:
            self.accumulated = grads.copy()
        elif self.pending:
            self.accumulated += grads
        else:
            self.accumulated[...] = grads
        self.pending = True

    def requests(self, flag: float) -> tuple[bool, bool]:
        """(stop, checkpoint) agreed in the flag (a float of :attr:`flag`): any rank asked to stop;
        a rank asked for a checkpoint.  Both False for a NaN flag."""
        if math.isnan(flag):
            return False, False
        size = self.comm.size
        total = round(flag * size)
        return total % (size + 1) > 0, total > size

    def begin(self, stop=False, loss=None, checkpoint=False) -> None:
        """Start a step.  ``stop``: this rank's stop request, or a callable asked for it when the
        last bucket starts (as late as possible); ``checkpoint``: likewise, its checkpoint request;
        ``loss``: this rank's loss (device scalar), whose non-finite value counts as a non-finite
        gradient."""
        self.handles = [None] * len(self.buckets)
        self.issued = [None] * len(self.buckets)  # perf_counter() when each bucket's allreduce was issued
        self.first_start = None
        self.stop, self.checkpoint = stop, checkpoint
        self.add, self.pending = (self.accumulated if self.pending else None), False
        self.buffer[self.n] = 0.0
        if loss is not None:
            with np.errstate(invalid="ignore"):
                self.buffer[self.n:] += loss * 0

    def layer_done(self, layer_index: int) -> None:
        k = self.by_trigger.get(layer_index)
        if k is not None:
            self._start(k)

    def _start(self, k: int) -> None:
        a, b, _ = self.buckets[k]
        grads = self.buffer[a:min(b, self.n)]
        if self.add is not None:  # the earlier micro-batches' share of this bucket
            grads += self.add[a:min(b, self.n)]
        if grads.size:
            # 0 x (max + min): 0 when every value is finite, NaN otherwise (on the device, no sync).
            with np.errstate(invalid="ignore"):
                self.buffer[self.n:] += grads.max() * 0 + grads.min() * 0
        if b > self.n and (self.stop() if callable(self.stop) else self.stop):
            self.buffer[self.n:] += 1.0
        if b > self.n and (self.checkpoint() if callable(self.checkpoint) else self.checkpoint):
            self.buffer[self.n:] += self.comm.size + 1.0
        self.issued[k] = time.perf_counter()
        if self.first_start is None:
            self.first_start = self.issued[k]
        self.handles[k] = self.comm.allreduce_mean(self.buffer[a:b])

    def finish(self, deadline: float | None = None) -> None:
        """Start what backward did not, and wait (until ``deadline``, time.monotonic()) for every bucket."""
        t0 = time.perf_counter()
        for k, handle in enumerate(self.handles):
            if handle is None:
                self._start(k)
        for handle in self.handles:
            handle.wait(deadline)
        done = time.perf_counter()
        self.comm_seconds += done - self.first_start
        self.exposed_seconds += done - t0
        if self.tracer.enabled:
            self._trace(t0, done)

    def _trace(self, waited_from: float, done: float) -> None:
        """Each bucket's allreduce from issue to completion, in a lane of its own (they overlap backward
        and one another), and this step's wait for them on the main lane.  A handle that does not know
        when it completed (NCCL: the host never sees it) ends its span when the wait did."""
        size = self.buffer.dtype.itemsize
        for k, ((a, b, _), handle, issued) in enumerate(zip(self.buckets, self.handles, self.issued)):
            completed = handle.completed if handle.completed is not None else done
            args = {"bucket": k, "bytes": (b - a) * size}
            if handle.started is not None:  # behind the buckets issued before it, in the progress thread
                args["queued_ms"] = round(max(0.0, handle.started - issued) * 1e3, 3)
            self.tracer.add(f"allreduce bucket {k}", "allreduce", issued, completed, lane=f"allreduce {k}", **args)
        self.tracer.add("allreduce wait", "allreduce", waited_from, done)

    def close(self) -> None:
        self.comm.close()

"""NCCL between GPUs, one GPU per rank; MPI (the communicator it wraps) for everything else.

``allreduce_mean`` runs ``ncclAllReduce`` in place on device memory, on a side
stream that first waits for the compute stream to have produced the view;
the handle's ``wait`` makes the compute stream wait for it in turn.  Nothing
blocks the host, so a deadline cannot be enforced here: the host never waits.
"""
from __future__ import annotations

import numpy as np

from ddp_cnn.dist.comm.base import Communicator, Handle


class StreamHandle(Handle):
    def __init__(self, event):
        self.event = event

    def wait(self, deadline=None):
        import cupy
        cupy.cuda.get_current_stream().wait_event(self.event)


class NCCLComm(Communicator):
    name = "nccl"

    def __init__(self, world: Communicator):
        import cupy
        from cupy.cuda import nccl
        self.world, self.cupy, self.nccl = world, cupy, nccl
        self.rank, self.size = world.rank, world.size
        self.local_rank, self.local_size = world.local_rank, world.local_size
        uid = world.bcast_obj(nccl.get_unique_id() if world.rank == 0 else None)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._events: dict = {}  # view pointer -> (ready, done) events, made once per bucket

    def allreduce_mean(self, view):
        cupy = self.cupy
        key = view.data.ptr
        if key not in self._events:
            self._events[key] = (cupy.cuda.Event(disable_timing=True), cupy.cuda.Event(disable_timing=True))
        ready, done = self._events[key]
        ready.record(cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)
        self.nccl_comm.allReduce(view.data.ptr, view.data.ptr, view.size, self.dtypes[np.dtype(view.dtype)],
                                 self.nccl.NCCL_SUM, self.stream.ptr)
        with self.stream:
            view *= view.dtype.type(1.0 / self.size)
        done.record(self.stream)
        return StreamHandle(done)

    # Everything but the gradients goes over MPI.
    def allreduce_scalar(self, value, op="sum"):
        return self.world.allreduce_scalar(value, op)

    def allreduce_host(self, array, op="sum"):
        return self.world.allreduce_host(array, op)

    def bcast_obj(self, obj, root=0):
        return self.world.bcast_obj(obj, root)

    def allgather_obj(self, obj):
        return self.world.allgather_obj(obj)

    def gather_obj(self, obj, root=0):
        return self.world.gather_obj(obj, root)

    def barrier(self):
        self.world.barrier()

    def set_timeout(self, seconds):
        self.world.set_timeout(seconds)

    def abort(self, code=1):
        self.world.abort(code)

    def close(self):
        self.world.close()

"""What the Trainer does when a rank is lost: shrink and go on (ULFM), or end for the supervisor (restart).

``--on-rank-loss shrink``: every rank holds the whole model and optimizer
state, so a dead rank takes nothing with it but its share of the step in
flight.  The survivors' pending collective fails (ULFM: no deadline
involved), they shrink the communicator (:mod:`ddp_cnn.dist.comm.ulfm`), agree
on the newest state one of them holds complete, take it from that rank,
rebuild what depends on the rank count (each rank's share of the global
batch and of the evaluation splits, the gradient buckets, the watchdog,
rank 0's role: console, metrics, checkpoints and the run-dir lock) and
redo the interrupted step.  With ``--data-order global`` the global
batches do not depend on the rank count, so the run stays on the
trajectory of an uninterrupted one.  Fewer survivors than ``--min-ranks``:
a checkpoint, then exit :data:`EXIT_BELOW_MIN_RANKS` for the supervisor.

``restart``: the job ends on the lost rank (deadline or MPI error) and a
supervisor restarts it from the newest checkpoint: any MPI, any data order.
"""
from __future__ import annotations

import os
import signal
import time

from ddp_cnn.system.backend import to_host

from ddp_cnn.dist.faults import EXIT_BELOW_MIN_RANKS
from ddp_cnn.dist.launcher import hostname

MODES = ("auto", "shrink", "restart")


def choose(mode: str, world, data_order: str, min_ranks: int, local_batch_size=None,
           gpu: bool = False) -> tuple[str, str]:
    """(shrink|restart, why) for ``--on-rank-loss mode``; ValueError (one line, the same on every rank)
    for a choice that cannot work here.  Local: every rank decides alike from the same launcher."""
    if mode not in MODES:
        raise ValueError(f"--on-rank-loss: expected one of {'|'.join(MODES)}, got {mode!r}")
    if min_ranks < 1 or min_ranks > world.size:
        raise ValueError(f"--min-ranks {min_ranks}: expected 1 to the {world.size} rank(s) of this job")
    if mode == "restart":
        return "restart", "--on-rank-loss restart"
    if world.size == 1:
        why = "one rank has nobody to go on without it"
        if mode == "shrink":
            raise ValueError(f"--on-rank-loss shrink: {why}")
        return "restart", why
    from ddp_cnn.dist.comm import ulfm
    ok, why = ulfm.support() if getattr(world, "name", "") == "mpi" else (False, f"--comm {world.name}")
    if not ok:
        if mode == "shrink":
            raise ValueError(f"--on-rank-loss shrink: needs an MPI with ULFM; {why}")
        return "restart", why
    if gpu:
        why = "GPU ranks: NCCL cannot be shrunk by the MPI, and the host-staged path is untested"
        if mode == "shrink":
            raise ValueError(f"--on-rank-loss shrink: {why}")
        return "restart", why
    if local_batch_size:
        why = "--local-batch-size makes the global batch depend on the rank count"
        if mode == "shrink":
            raise ValueError(f"--on-rank-loss shrink: {why}; give --batch-size (the global batch) instead")
        return "restart", why
    if data_order != "global":
        why = ("--data-order shard ties each shard to a rank: a lost rank's shards would leave the epoch "
               "(--data-order global keeps the trajectory on any rank count)")
        if mode == "shrink":
            raise ValueError(f"--on-rank-loss shrink: {why}")
        return "restart", why
    return "shrink", why + ", --data-order global"


class AfterShrink:
    """The Trainer's side of a shrink: its state for the other survivors, and what it rebuilds on the
    new communicator (a mixin of :class:`ddp_cnn.run.trainer.Trainer`: the methods use its attributes)."""

    def state_for_peers(self) -> dict:
        """Everything a survivor needs to continue from this rank's position (host arrays)."""
        return {"params": to_host(self.model.params), "optim": {k: to_host(v) for k, v in self.opt.state_dict().items()},
                "buffers": {k: to_host(v) for k, v in self.model.named_buffers().items()},
                "position": (self.epoch, self.step_in_epoch, self.global_step), "skipped": self.skipped,
                "best_val": self.best_val}

    def adopt_state(self, state: dict) -> None:
        self.model.params[...] = self.xp.asarray(state["params"])
        self.opt.load_state_dict(state["optim"])
        for name, buf in self.model.named_buffers().items():
            buf[...] = self.xp.asarray(state["buffers"][name])
        self.epoch, self.step_in_epoch, self.global_step = state["position"]
        self.skipped, self.best_val = state["skipped"], state["best_val"]

    def rebuild(self) -> None:
        """Collective over the new communicator ``self.world``: each rank's share of the global batch
        and of the evaluation splits, the gradient transport and buckets, and rank 0's role."""
        from ddp_cnn.dist import comm as comm_mod
        from ddp_cnn.run import rundir
        from ddp_cnn.run.config import batch_sizes
        from ddp_cnn.dist.faults import install_abort_hook
        from ddp_cnn.model.layers import BatchNorm
        from ddp_cnn.model.layers.normalization import SyncStatistics
        from ddp_cnn.run.progress import RootLog
        from ddp_cnn.dist.reducer import GradReducer
        from ddp_cnn.data.splits import open_data
        cfg, world, model = self.config, self.world, self.model
        install_abort_hook(world)
        if isinstance(self.log, RootLog):
            self.log.root = world.is_root
        self.metrics.is_root = world.is_root
        self.global_batch, self.local_batch = batch_sizes(cfg, world.rank, world.size)
        train, self.val_data, self.test_data = open_data(cfg, world)
        if cfg.data_order != "global":  # the global order's rows are every rank's: kept, with their read cache
            self.train_data = train
        self.train_loader, self.val_loader, self.test_loader = self._loaders()
        if self.train_loader.steps_per_epoch != self.steps_per_epoch:
            raise RuntimeError(f"after the shrink an epoch has {self.train_loader.steps_per_epoch} steps, "
                               f"not {self.steps_per_epoch}")
        self.comm, _ = comm_mod.for_device(world, model.backend, cfg.comm)
        comm_seconds, exposed = self.reducer.comm_seconds, self.reducer.exposed_seconds
        self.reducer = GradReducer(self.comm, model.grad_buffer, list(zip(model.layer_offsets, model.layer_ends)),
                                   cfg.bucket_mb, tracer=self.tracer)
        self.reducer.comm_seconds, self.reducer.exposed_seconds = comm_seconds, exposed
        for layer in model.layers:
            if cfg.sync_bn and isinstance(layer, BatchNorm):
                layer.sync = SyncStatistics(self.comm, cfg.collective_timeout)
        if world.is_root and self.lock.fd is None:  # rank 0 died: its successor holds the run dir now
            self.lock.acquire(warn=self.log)
            for path in rundir.remove_dead_temps(self.checkpoint_dir):
                self.log(f"removed {path}: the temporary file of a checkpoint writer that died")
            self.metrics.truncate_after(self.global_step)  # what the dead rank 0 logged of a step redone


# ---- fault injection for the tests: this process kills itself with SIGKILL, as kill -9 would ------
def kill_points() -> list[tuple[int, int, str]]:
    """$DDP_CNN_KILL_AT: "RANK:STEP:WHERE[,...]" (world ranks; WHERE: step|checkpoint|evaluation|write)."""
    spec = os.environ.get("DDP_CNN_KILL_AT", "")
    points = []
    for part in filter(None, spec.split(",")):
        rank, step, where = part.split(":")
        points.append((int(rank), int(step), where))
    return points


def maybe_die(where: str, world_rank: int, step: int) -> None:
    """SIGKILL this process at a test's kill point (``write``: rank 0 halfway into the checkpoint file)."""
    for rank, at, point in kill_points():
        if (rank, at) != (world_rank, step):
            continue
        if point == where:
            _record_kill_time()
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "write" and where == "checkpoint":  # after the temporary file is written, before its rename
            from ddp_cnn.run import checkpoint as ckpt

            def die(path):
                _record_kill_time()
                os.kill(os.getpid(), signal.SIGKILL)
            ckpt.fsync_file = die


def _record_kill_time() -> None:
    """$DDP_CNN_KILL_LOG: the moment of the kill, for bench/ (time from the kill to the next step)."""
    log = os.environ.get("DDP_CNN_KILL_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{time.time():.6f}\n")


class LiveRecovery:
    """Runs the Trainer's loop; on a lost rank (shrink mode) shrinks and runs it again from the agreed state."""

    def __init__(self, trainer, mode: str, why: str, min_ranks: int):
        self.trainer, self.mode, self.why, self.min_ranks = trainer, mode, why, min_ranks
        world = trainer.world
        self.world_ranks = self._world_ranks(world)
        self.hosts = world.allgather_obj(hostname()) if mode == "shrink" else None  # by world rank
        self.shrinks = 0

    @staticmethod
    def _world_ranks(world) -> list[int]:
        if getattr(world, "name", "") != "mpi":
            return list(range(world.size))
        from ddp_cnn.dist.comm import ulfm
        return ulfm.world_ranks(world)

    @property
    def world_rank(self) -> int:
        """This process's rank in the job as launched (the rank numbers change after a shrink)."""
        return self.world_ranks[self.trainer.world.rank]

    def leave(self, status: int) -> None:
        """After a shrink: end this process now with ``status``, without MPI_Finalize.

        Open MPI 5.0.11's MPI_Finalize was seen spinning forever on the survivors of a rank killed in
        the middle of an allreduce (its finalize still waits for the dead process), which keeps
        mpirun from ending.  Everything of ours is on disk by now (the Trainer's last barrier); the
        launcher removes the job's shared memory and session files when its processes are gone.
        """
        if not self.shrinks:
            return
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    def describe(self) -> str:
        return f"on a lost rank: {self.mode} ({self.why})"

    def run(self, loop):
        """``loop()`` to its end; after each lost rank (shrink mode), the shrink, then ``loop()`` again."""
        from ddp_cnn.dist.comm import ulfm
        while True:
            try:
                return loop()
            except Exception as exc:
                if self.mode != "shrink" or not ulfm.is_rank_loss(exc):
                    raise
                failed_at, seen_at = time.perf_counter(), time.time()
            status = self.recover(failed_at, seen_at)
            if status is not None:
                return status

    def recover(self, failed_at: float, seen_at: float):
        """Collective over the survivors: shrink, agree on the state, rebuild; None to go on, or an exit status."""
        from ddp_cnn.dist.comm import ulfm
        t = self.trainer
        old_ranks = self.world_ranks
        step_seen = t.global_step
        while True:  # one more rank may die while we recover: then recover again
            try:
                world = ulfm.shrink(t.world)
                t.world = world
                self.world_ranks = self._world_ranks(world)
                source, state = self._agree_state(world)
                t.adopt_state(state)
                t.rebuild()
                self._checkpoint_if_missed(world)
                break
            except Exception as exc:
                if not ulfm.is_rank_loss(exc):
                    raise
        lost = [r for r in old_ranks if r not in self.world_ranks]
        self.shrinks += 1
        if world.size < self.min_ranks:
            return self._below_min_ranks(lost)
        seconds = time.perf_counter() - failed_at
        where = ", ".join(f"rank {r} on {self.hosts[r]}" for r in lost)
        took_over = (f"; world rank {self.world_ranks[0]} takes over rank 0's role" if 0 in lost else "")
        t.log(f"lost {where} at global step {step_seen}: {world.size} ranks go on from global step "
              f"{t.global_step} (agreed; state from world rank {self.world_ranks[source]}), recovered in "
              f"{seconds * 1e3:.0f} ms{took_over}")
        t.metrics.write({"kind": "shrink", "step": t.global_step, "epoch": t.epoch, "lost_ranks": lost,
                         "lost_hosts": [self.hosts[r] for r in lost], "world_size": world.size,
                         "world_ranks": self.world_ranks, "state_from": self.world_ranks[source],
                         "recovery_ms": round(seconds * 1e3, 3), "failure_seen_at": round(seen_at, 6)})
        return None

    def _checkpoint_if_missed(self, world) -> None:
        """The --checkpoint-every checkpoint of the agreed step, when the loss interrupted its writing."""
        t = self.trainer
        every, step = t.config.checkpoint_every, t.global_step
        if not (every and step and step % every == 0):
            return
        from ddp_cnn.run import checkpoint as ckpt
        if not world.bcast_obj(ckpt.checkpoint_path(t.checkpoint_dir, step).exists() if world.is_root else None):
            t.save_checkpoint()

    def _agree_state(self, world):
        """The survivors agree on the newest state one of them holds complete, and each takes it.

        A survivor may have applied an update the others did not (its allreduce completed before the
        rank died; theirs failed): never assumed either way, the position of every survivor is
        gathered and the most advanced one's state broadcast.  Updates are applied only after a whole
        allreduce, so any survivor's state is a complete one.
        """
        t = self.trainer
        positions = world.allgather_obj((t.global_step, t.epoch, t.step_in_epoch))
        source = max(range(world.size), key=lambda r: (positions[r][0], positions[r][1], -r))
        state = world.bcast_obj(t.state_for_peers() if world.rank == source else None, root=source)
        world.comm.Agree(1)  # every survivor got it (fails alike everywhere if one more rank died)
        return source, state

    def _below_min_ranks(self, lost):
        t = self.trainer
        t.log(f"lost world rank(s) {lost}: {t.world.size} rank(s) left, fewer than --min-ranks {self.min_ranks}; "
              f"checkpoint at global step {t.global_step}, exit {EXIT_BELOW_MIN_RANKS} for the supervisor "
              "(resume with --resume latest)")
        t.metrics.write({"kind": "shrink", "step": t.global_step, "epoch": t.epoch, "lost_ranks": lost,
                         "world_size": t.world.size, "below_min_ranks": self.min_ranks})
        t.save_checkpoint()
        t.world.barrier()
        return EXIT_BELOW_MIN_RANKS


"""What a checkpoint holds and how a run comes back from one: the Trainer's state.

Parameters, optimizer state and BatchNorm statistics; the position (epoch,
step in the epoch, global step); the epoch's running sums so far, so that a
resumed epoch reports all of its steps; the best validation accuracy.  Rank 0
writes, every rank restores from rank 0's broadcast.  A mixin of
:class:`ddp_cnn.run.trainer.Trainer`: the methods use its attributes.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ddp_cnn.dist.agree import SetupError, agreed
from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.run import rundir
from ddp_cnn.run.shrink import maybe_die
from ddp_cnn.system.backend import to_host


class RunState:
    """The Trainer's save, restore and bookkeeping methods (see the module docstring)."""

    def record(self) -> dict:
        """The settings as metrics and checkpoints record them: the config, with the paths
        resolved and the name of the model trained (a built model brings its own)."""
        return {**self.config.record(), "model": self.model.name, "run_dir": str(self.run_dir),
                "metrics": str(self.metrics_path), "checkpoint_dir": str(self.checkpoint_dir)}

    def _restore_or_broadcast(self):
        """Rank 0's parameters (fresh or from the checkpoint) and optimizer state, on every rank."""
        state = None
        if self.world.is_root:
            state = ({k: self.resume[k] for k in ("params", "optim", "buffers", "meta", "path")}
                     if self.resume is not None else {"params": to_host(self.model.params)})
        state = self.world.bcast_obj(state)
        self.model.params[...] = self.xp.asarray(state["params"])
        if "optim" not in state:
            if self.config.overwrite and self.world.is_root:
                rundir.clear(self.checkpoint_dir)
            agreed(self.world, lambda: (self.metrics.start(), self._record_restart()))
            return
        if "ema" in state["optim"] and not self.opt.ema:
            self.log(f"warning: {state['path']} holds a moving average of the weights (--ema), which this "
                     "run without --ema drops: later checkpoints, evaluate and export use the raw weights")
        self.opt.load_state_dict(state["optim"])
        for name, buf in self.model.named_buffers().items():
            buf[...] = self.xp.asarray(state["buffers"][name])
        meta = state["meta"]
        self.epoch, self.step_in_epoch, self.global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        if self.step_in_epoch > self.steps_per_epoch:  # same global batch, another rank count: other rounding
            raise SetupError(f"checkpoint {state['path']}: saved at step {self.step_in_epoch} of an epoch, which has "
                             f"{self.steps_per_epoch} steps on {self.world.size} rank(s); resume on the rank count "
                             f"that wrote it ({meta['world_size']})")
        self.best_val = meta.get("best_val_acc", -1.0)
        so_far = meta.get("epoch_so_far") if self.step_in_epoch else None
        if so_far:  # rank 0 carries the epoch's sums so far; the epoch's allreduce adds them in
            mine = so_far if self.world.is_root else {"loss": 0.0, "correct": 0, "seen": 0}
            self.sums = self._new_sums(mine["loss"], mine["correct"], mine["seen"], so_far["seconds"],
                                       so_far.get("comm", 0.0), so_far.get("exposed", 0.0))
        if meta["world_size"] != self.world.size and self.config.data_order != "global":
            self.log(f"warning: checkpoint was written by {meta['world_size']} ranks, resuming on "
                     f"{self.world.size}: the data order differs from the original run (--data-order global "
                     "keeps it on any rank count)")
        self.log(f"resumed from {state['path']} at epoch {self.epoch + 1}/{self.config.epochs}, step "
                 f"{self.step_in_epoch}/{self.steps_per_epoch} (global step {self.global_step})")
        record = {"kind": "resume", "step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                  "from": state["path"], "world_size": self.world.size, "saved_by_world_size": meta["world_size"],
                  "processes": self.processes}
        agreed(self.world, lambda: (self.metrics.truncate_after(self.global_step), self._record_restart(),
                                    self.metrics.write(record)))

    def _record_restart(self):
        """Started again by ddp_cnn.supervise: its account of why ($DDP_CNN_RESTART, JSON) as a
        ``restart`` record, written here so that the run's own bookkeeping keeps it in order."""
        told = os.environ.get("DDP_CNN_RESTART")
        if told:
            try:
                record = json.loads(told)
            except ValueError:
                record = {"reason": told}
            self.metrics.write({"kind": "restart", "step": self.global_step, **record})

    def sync_buffers(self):
        """Average BatchNorm statistics over ranks (each rank saw its own batches; with --sync-bn
        they saw the global batch's, bitwise the same on every rank, which stay untouched)."""
        if self.config.sync_bn:
            return
        for buf in self.model.named_buffers().values():
            buf[...] = self.xp.asarray(self.world.allreduce_host(to_host(buf)) / self.world.size)

    def save_checkpoint(self):
        with self.tracer.span("checkpoint", "checkpoint"):  # --trace: every checkpoint, wherever it is asked for
            path = self._save_checkpoint()
        self.checkpoint_clock = time.monotonic()  # --checkpoint-every-seconds counts from here
        return path

    def _save_checkpoint(self):
        self.sync_buffers()
        totals, seconds = self._epoch_totals()  # so that a resumed epoch reports all of its steps
        maybe_die("checkpoint", self.recovery.world_rank, self.global_step)  # tests: lost while rank 0 writes
        if not self.world.is_root:
            return None
        attrs = self.train_data.attrs
        meta = {"model": self.model.describe(), "config": self.record(), "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step, "seed": self.config.seed,
                "world_size": self.world.size, "global_batch": self.global_batch,
                "sharding_id": attrs.get("sharding_id"), "class_names": self.class_names,
                "mean": np.ravel(attrs["mean"]).astype(float).tolist(),  # one per channel
                "std": np.ravel(attrs["std"]).astype(float).tolist(),
                "teacher": self.distiller.record if self.distiller else None,
                "best_val_acc": self.best_val,
                "epoch_so_far": {"loss": totals[0], "correct": int(totals[1]), "seen": int(totals[2]),
                                 "seconds": seconds, "comm": self.reducer.comm_seconds,
                                 "exposed": self.reducer.exposed_seconds}}
        optim_state = {k: to_host(v) for k, v in self.opt.state_dict().items()}
        buffers = {k: to_host(v) for k, v in self.model.named_buffers().items()}
        started = time.perf_counter()
        path = ckpt.save(self.checkpoint_dir, self.global_step, to_host(self.model.params), optim_state,
                         buffers, meta, keep=self.config.keep, warn=self.log)
        self.metrics.write({"kind": "checkpoint", "step": self.global_step, "path": str(path),
                            "write_seconds": round(time.perf_counter() - started, 4)})
        return path

    def check_replicas(self):
        digest = ckpt.params_digest(to_host(self.model.params))
        everyone = self.world.allgather_obj(digest)
        if len(set(everyone)) != 1:
            raise RuntimeError(f"replicas diverged at step {self.global_step}: parameter digests "
                               + ", ".join(d[:12] for d in everyone))

    def _new_sums(self, loss=0.0, correct=0, seen=0, seconds=0.0, comm=0.0, exposed=0.0) -> dict:
        """The epoch's running sums (this rank's part; rank 0 also holds what a resumed run saved)."""
        return {"loss": self.xp.asarray(loss, dtype=np.float64), "correct": self.xp.asarray(correct, dtype=np.int64),
                "seen": seen, "seconds": seconds, "comm": comm, "exposed": exposed}

    def _epoch_totals(self):
        """Collective: (loss sum, correct, images) of the epoch so far over every rank, and its seconds."""
        sums = self.sums
        totals = self.world.allreduce_host(np.array([float(to_host(sums["loss"])), float(to_host(sums["correct"])),
                                                     sums["seen"]]))
        return totals, sums["seconds"] + time.perf_counter() - self.part_started

"""The library Trainer: any :class:`~ddp_cnn.model.Sequential` + HDF5 shards -> data-parallel training.

The same loop as ``python -m ddp_cnn.train``: each rank reads its part of
the data, computes gradients with our layers, averages them over ranks in
buckets that overlap backward, and applies the same optimizer step.  Rank 0
alone prints, logs and saves; evaluation is distributed; checkpoints resume
exactly.  Runs unchanged in one process or under ``mpirun``::

    from ddp_cnn import Trainer
    Trainer(model, data="data/fashion-mnist", epochs=2, run_dir="runs/mine").fit()

Every method is called on every rank unless its name or docstring says root.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ddp_cnn.data.loader import Loader
from ddp_cnn.data.pixels import Augment
from ddp_cnn.data.shards import DataError
from ddp_cnn.data.splits import class_names_of, open_data
from ddp_cnn.dist import comm as comm_mod
from ddp_cnn.dist.agree import SetupError, agreed
from ddp_cnn.dist.comm import CollectiveTimeout
from ddp_cnn.dist.faults import (EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE, StopFlag,
                                  abort_job, abort_lost_rank, install_abort_hook, maybe_fail)
from ddp_cnn.dist.reducer import GradReducer
from ddp_cnn.model import optim
from ddp_cnn.model.layers import BatchNorm, SoftmaxCrossEntropy
from ddp_cnn.model.layers.normalization import SyncStatistics
from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.run import rundir, startup
from ddp_cnn.run.config import TrainConfig, batch_shares, batch_sizes
from ddp_cnn.run.evaluation import split_scores
from ddp_cnn.run.progress import Progress, RootLog
from ddp_cnn.run.runstate import RunState
from ddp_cnn.run.shrink import AfterShrink, LiveRecovery, choose as choose_on_rank_loss, maybe_die
from ddp_cnn.run.step import compute_gradients, step_timeout
from ddp_cnn.system.nospace import DiskFull
from ddp_cnn.system.trace import Tracer


class Trainer(RunState, AfterShrink):
    """Trains ``model`` data-parallel over the ranks of ``comm`` (default: MPI under mpirun, else one process).

    ``config`` (a :class:`TrainConfig`) and keyword overrides set everything
    else: the data folder, batch size, optimizer, schedule, checkpoints,
    evaluation.  ``rank_data``: (train, val, test) already opened with
    :func:`open_data` (else ``config.data`` is opened); ``distiller``: a
    :class:`~ddp_cnn.inference.distill.Distiller`.
    Start-up problems raise :class:`SetupError` on every rank.
    """

    def __init__(self, model, config: TrainConfig | None = None, *, comm=None, rank_data=None, distiller=None,
                 log=None, **overrides):
        self.config = cfg = replace(config or TrainConfig(), **overrides)
        self.world = comm if comm is not None else comm_mod.create(cfg.comm)
        install_abort_hook(self.world)
        self.world.set_timeout(cfg.collective_timeout)  # every blocking collective gets the deadline
        self.log = log or RootLog(self.world)
        self.model, self.distiller = model, distiller
        # Dropout masks are keyed by rank, except in the global order, where a row's mask follows
        # from its place in the global batch (the same on any rank count, on the CPU).
        model.rank = 0 if cfg.data_order == "global" else self.world.rank
        self.xp = model.xp
        self.run_dir = Path(cfg.run_dir or f"runs/{model.name}")
        self.metrics_path = Path(cfg.metrics) if cfg.metrics else self.run_dir / "metrics.jsonl"
        self.metrics = rundir.MetricsLog(self.metrics_path, self.world.is_root)
        self.checkpoint_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else self.run_dir / "checkpoints"
        rank, size = self.world.rank, self.world.size
        self.global_batch, self.local_batch = agreed(self.world, lambda: batch_sizes(cfg, rank, size))
        # A lost rank: shrink and go on (ULFM), or end for the supervisor (ddp_cnn.run.shrink).
        on_rank_loss = agreed(self.world, lambda: choose_on_rank_loss(
            cfg.on_rank_loss, self.world, cfg.data_order, cfg.min_ranks, cfg.local_batch_size, model.backend.is_gpu))
        self.recovery = LiveRecovery(self, *on_rank_loss, cfg.min_ranks)
        agreed(self.world, lambda: startup.prepare_run_dir(self.world, cfg, self.run_dir, self.checkpoint_dir,
                                                           self.metrics_path))
        self.train_data, self.val_data, self.test_data = (rank_data if rank_data is not None
                                                          else open_data(cfg, self.world))
        self.class_names = class_names_of(self.train_data)
        self.opt, self.resume = agreed(self.world, self._optimizer_and_resume)
        startup.check_same_everywhere(self.world, cfg, model, distiller, self.train_data)
        self.augment = agreed(self.world, lambda: Augment(shift=cfg.augment_shift, hflip=cfg.hflip, erase=cfg.erase))
        self.train_loader, self.val_loader, self.test_loader = agreed(self.world, self._loaders)
        agreed(self.world, lambda: startup.check_batch_memory(model, *self._micro_batch()))
        self.comm, reason = agreed(self.world, lambda: comm_mod.for_device(self.world, model.backend, cfg.comm))
        if self.world.size > 1 and model.backend.is_gpu:  # NCCL or host staging: say which, and why
            self.log(f"comm: {reason}")
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.schedule = optim.Schedule(
            self.opt.lr, cfg.epochs * self.steps_per_epoch, cfg.schedule,
            warmup=round(cfg.warmup_epochs * self.steps_per_epoch),
            step_size=max(1, round(cfg.step_epochs * self.steps_per_epoch)), gamma=cfg.gamma, min_lr=cfg.min_lr)
        self.loss_fn = SoftmaxCrossEntropy(cfg.label_smoothing, distiller.weight if distiller else 0.0,
                                           distiller.temperature if distiller else 1.0)
        self.epoch = self.step_in_epoch = self.global_step = self.skipped = 0
        self.sums, self.part_started = self._new_sums(), time.perf_counter()
        self.best_val = -1.0  # the best validation accuracy so far (-1: none yet)
        # Which process is which rank, for a supervisor told only that a pid died (start/resume records)
        self.processes = self.world.allgather_obj((comm_mod.hostname(), os.getpid()))
        self.checkpoint_due, self.checkpoint_clock = False, time.monotonic()  # --checkpoint-every-seconds
        self.first_step = True  # this process's first step compiles the CPU kernels: run.step.step_timeout
        self.lock = rundir.RunLock(self.run_dir)  # from here on this job writes in the run dir
        agreed(self.world, lambda: startup.lock_run_dir(self.world, self.lock, self.checkpoint_dir, self.log))
        try:
            self._restore_or_broadcast()
        except SetupError:
            self.lock.release()
            raise
        self.tracer = Tracer(self.world.rank, enabled=bool(cfg.trace))  # --trace: a timeline of the steps
        self.reducer = GradReducer(self.comm, model.grad_buffer, list(zip(model.layer_offsets, model.layer_ends)),
                                   cfg.bucket_mb, tracer=self.tracer)
        if cfg.sync_bn:  # batch statistics over the global batch, through the gradients' communicator
            for layer in model.layers:
                if isinstance(layer, BatchNorm):
                    layer.sync = SyncStatistics(self.comm, cfg.collective_timeout)
        self.stop = StopFlag()

    # ---- setup (each step local, then agreed) ----------------------------
    def _optimizer_and_resume(self):
        cfg, model = self.config, self.model
        smallest, setting = self._micro_batch()
        model.check_trainable(self.train_data.images.shape[1:], len(self.class_names), smallest, cfg.data, setting)
        if cfg.sync_bn and not any(isinstance(layer, BatchNorm) for layer in model.layers):
            raise ValueError(f"--sync-bn: model {model.name!r} has no batch norm layers")
        if cfg.ema and model.named_buffers():
            raise ValueError(f"--ema: not for a model with batch norm ({model.name}): its running statistics "
                             "belong to the raw weights, not to their average")
        lr = cfg.lr * self.global_batch / cfg.lr_base_batch if cfg.scale_lr else cfg.lr
        opt = optim.create(cfg.optimizer, model.params, model.grads, lr, momentum=cfg.momentum, beta1=cfg.beta1,
                           beta2=cfg.beta2, eps=cfg.eps, rho=cfg.rho, l2=cfg.l2, weight_decay=cfg.weight_decay,
                           decay_ranges=model.decay_ranges, ema=cfg.ema)
        if not (cfg.resume and self.world.is_root):  # rank 0 reads it; everyone receives it in the broadcast
            return opt, None
        run = {"global_batch": self.global_batch, "optimizer": cfg.optimizer, "val_fraction": cfg.val_fraction,
               "data_order": cfg.data_order, "shuffle_window": cfg.shuffle_window,
               "data_in_memory": cfg.data_in_memory,
               "sharding_id": self.train_data.attrs.get("sharding_id")}
        return opt, ckpt.load_for_resume(cfg.resume, self.checkpoint_dir, model.describe(),
                                         self.distiller.record if self.distiller else None, run, warn=self.log)

    def _micro_batch(self):
        return startup.micro_batch(self.config, self.local_batch, self.global_batch, self.world.size)

    def _loaders(self):
        cfg, dtype = self.config, self.model.backend.dtype
        train = Loader(self.train_data, batch_size=self.local_batch, comm=self.world, seed=cfg.seed, xp=self.xp,
                       dtype=dtype, augment=self.augment, data_order=cfg.data_order, global_batch=self.global_batch,
                       window=cfg.shuffle_window)

        def scoring(data):  # every row once, normalised with the training statistics
            return None if data is None else Loader(
                data, batch_size=cfg.eval_batch_size, comm=self.world, seed=cfg.seed, xp=self.xp, dtype=dtype,
                shuffle=False, drop_last=False, mean=self.train_data.attrs["mean"], std=self.train_data.attrs["std"])
        return train, scoring(self.val_data), scoring(self.test_data)

    # ---- the loop ----------------------------------------------------------
    def train_step(self, x, y, soft=None):
        """Gradient, allreduce, update (or a skip agreed by every rank).  Returns (loss, correct, stop)."""
        cfg = self.config
        timeout = step_timeout(cfg.collective_timeout, first=self.first_step)
        deadline = time.monotonic() + timeout if timeout > 0 else None
        loss, correct = compute_gradients(
            self.model, self.loss_fn, self.reducer, x, y, self.global_step, soft=soft, deadline=deadline,
            poison=cfg.inject_nan == (self.world.rank, self.global_step), stop=lambda: self.stop.requested,
            checkpoint=self._checkpoint_due_here,
            micro_batches=cfg.accumulate, share=self.local_batch * self.world.size / self.global_batch,
            first_row=self.train_loader.start)
        # The flag is bitwise the same on every rank, so this decision is too.  Reading it
        # is free on the CPU; on a GPU it is the step's one synchronisation.
        flag = float(self.reducer.flag)
        self.first_step = False
        stop, self.checkpoint_due = self.reducer.requests(flag)
        if math.isnan(flag):
            if not cfg.skip_nonfinite:
                raise FloatingPointError(f"non-finite loss or gradient at global step {self.global_step} "
                                         f"(epoch {self.epoch + 1}); lower --lr or use --skip-nonfinite")
            self.skipped += 1
            self.log(f"warning: skipped the update of step {self.global_step}: non-finite loss or gradient")
        else:
            with self.tracer.span("optimizer", "optimizer"):
                self.opt.step(self.schedule(self.global_step))
        return loss, correct, stop

    def _checkpoint_due_here(self) -> bool:
        """--checkpoint-every-seconds: rank 0's clock alone decides (the flag carries it to every rank)."""
        every = self.config.checkpoint_every_seconds
        return bool(every) and self.world.is_root and time.monotonic() - self.checkpoint_clock >= every

    def fit(self) -> int:
        """Train to ``config.epochs`` (or ``max_steps``).  Returns 0, EXIT_PREEMPTED (75: stopped
        by a signal after a checkpoint; resume with ``resume="latest"``), EXIT_DISK_FULL (74: no space
        for a checkpoint or the metrics; the earlier checkpoints are intact) or EXIT_DIVERGED (65)."""
        cfg = self.config
        self.stop.install()
        self.tracer.instrument(self.model)
        try:
            distiller = self.distiller
            if distiller is not None and distiller.cache is None and not self.augment.changes_images:
                distiller.cache_rows(Loader(self.train_data, batch_size=256, comm=self.world, seed=0, xp=self.xp,
                                            dtype=self.model.backend.dtype, shuffle=False, drop_last=False))
            self._log_start()
            status = self.recovery.run(self._train_to_end)  # again from the agreed step after a shrink
            if status is not None:
                return status
        except FloatingPointError as exc:  # raised on every rank at the same step
            if self.world.is_root:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_DIVERGED
        except DiskFull as exc:  # rank 0 alone writes; the other ranks wait in the next collective
            message = startup.disk_full_message(exc, self.global_step, self.checkpoint_dir)
            if self.world.size > 1:
                abort_job(self.world, message, EXIT_DISK_FULL)
            else:
                print(message, file=sys.stderr, flush=True)
            return EXIT_DISK_FULL
        except CollectiveTimeout as exc:  # a rank stalled, died or lost its link: name it, once
            abort_lost_rank(self.world, exc.what, cfg.collective_timeout, step=self.global_step)
        except DataError as exc:  # a shard chunk read by the global order turned out damaged (on this
            # rank only): the job cannot go on, and a restart would meet it again
            abort_job(self.world, f"error: [rank {self.world.rank}] global step {self.global_step}: {exc}", EXIT_USAGE)
        finally:
            self.tracer.restore(self.model)
            self.reducer.close()
            self.stop.uninstall()
            self.lock.release()
        self.world.set_timeout(None)  # the caller's communicator, as it was given
        self.log(f"done: {self.global_step} steps; metrics in {self.metrics_path}")
        return 0

    def _train_to_end(self):
        """The epochs, the final test and the trace, from wherever the run stands; None or an exit status."""
        # checked before each epoch: a run resumed from its --max-steps checkpoint trains no further step
        while self.epoch < self.config.epochs and not self._max_steps_reached():
            status = self.run_epoch()
            if status is not None:
                return status
        self._final_test()
        self.write_trace()
        self.world.barrier()  # nobody returns before rank 0's last checkpoint is on disk
        return None

    def _log_start(self):
        model, world, backend = self.model, self.world, self.model.backend
        self.log(f"ddp_cnn: {world.size} rank(s), {backend.name}, {np.dtype(backend.dtype).name}, "
                 f"comm={self.comm.name}, model={model.name} ({model.num_params:,} params), "
                 f"global batch {self.global_batch} ({batch_shares(self.global_batch, world.size)}/rank"
                 + (f", {self.config.accumulate} micro-batches" if self.config.accumulate > 1 else "")
                 + f"), {self.steps_per_epoch} steps/epoch, {len(self.reducer.buckets)} gradient bucket(s)"
                 + (", batch norm over the global batch" if self.config.sync_bn else "")
                 + (", global data order" if self.config.data_order == "global" else ""))
        self.log(self.train_loader.describe())
        if world.size > 1:
            self.log(self.recovery.describe())
        if self.distiller is not None:
            self.log(self.distiller.describe())
        if self.val_loader is None and self.test_loader is not None:
            self.log("no validation split (shard with --val-fraction, or train with --val-fraction): epochs are not "
                     "scored and no best checkpoint is kept; the test set is scored once, at the end")
        if self.global_step == 0:
            from ddp_cnn.model.network import format_summary
            self.log(format_summary(model))
            self.metrics.write({"kind": "start", "step": 0, "model": model.name, "params": model.num_params,
                                "world_size": world.size, "device": backend.name, "comm": self.comm.name,
                                "global_batch": self.global_batch, "class_names": self.class_names,
                                "config": self.record(), "processes": self.processes})

    def run_epoch(self):
        cfg, sums = self.config, self.sums
        self.reducer.comm_seconds, self.reducer.exposed_seconds = sums["comm"], sums["exposed"]
        end = self.step_in_epoch + cfg.max_steps - self.global_step if cfg.max_steps else None  # where it stops
        progress = Progress(self.config.progress if self.world.is_root else "off", self.epoch, cfg.epochs,
                            self.steps_per_epoch, self.step_in_epoch, self.world.size, end=end)
        # The epoch's sample order, to look the cached soft targets up by row.
        cached = self.distiller is not None and self.distiller.cache is not None
        order = self.train_loader.order(self.epoch) if cached else None
        self.part_started = time.perf_counter()
        for x, y in self.tracer.iterate(self.train_loader.epoch(self.epoch, start_step=self.step_in_epoch)):
            maybe_fail(cfg.fail_at, self.world.rank, self.global_step)
            self.world.step = self.global_step  # named by a deadline's line
            maybe_die("step", self.recovery.world_rank, self.global_step)
            soft = None
            if self.distiller is not None:
                soft = self.distiller.targets(x, self.train_loader.rows(order, self.step_in_epoch) if cached else None)
            with self.tracer.span("step", "step", step=self.global_step):
                loss, correct, stop = self.train_step(x, y, soft)
            sums["loss"] += loss.astype(np.float64) * y.shape[0]
            sums["correct"] += correct
            sums["seen"] += y.shape[0]
            self.global_step += 1
            self.step_in_epoch += 1
            progress.update(loss, y.shape[0])
            self._after_step(loss)
            if stop:  # agreed inside the gradient allreduce: every rank stops at this step
                return self._preempted()
            if self._max_steps_reached():
                break
        progress.close()
        # A signal that came after the last step's flag went out: agreed here, once an epoch,
        # so that neither the evaluation nor the end-of-epoch checkpoint runs first.
        if self.world.allreduce_scalar(int(self.stop.requested), "max"):
            return self._preempted()
        self._end_epoch()
        return None

    def _max_steps_reached(self) -> bool:
        return bool(self.config.max_steps) and self.global_step >= self.config.max_steps

    def _preempted(self) -> int:
        self.save_checkpoint()
        self.write_trace()
        self.world.barrier()
        self.log(f"stopped by a signal at global step {self.global_step}; checkpoint written; "
                 "continue with --resume latest")
        return EXIT_PREEMPTED

    def _after_step(self, loss):
        cfg, step = self.config, self.global_step
        if cfg.log_every and step % cfg.log_every == 0:
            # Each rank's mean weighted by its share (the global order may cut the batch unevenly).
            mean_loss = self.world.allreduce_scalar(float(loss) * self.local_batch, "sum") / self.global_batch
            self.metrics.write({"kind": "step", "step": step, "epoch": self.epoch, "loss": mean_loss,
                                "lr": self.schedule(step - 1)})
            self.log(f"step {step}: loss {mean_loss:.4f}, lr {self.schedule(step - 1):.3g}")
        if cfg.check_replicas and step % cfg.check_replicas == 0:
            self.check_replicas()
        ends_epoch = self.step_in_epoch >= self.steps_per_epoch or (cfg.max_steps and step >= cfg.max_steps)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (self.checkpoint_due and not ends_epoch):
            self.save_checkpoint()  # a time-based one waits for the epoch's own when that comes next

    def _end_epoch(self):
        cfg = self.config
        epoch_done = self.step_in_epoch >= self.steps_per_epoch
        totals, elapsed = self._epoch_totals()
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, "complete": epoch_done,
                  "train_loss": totals[0] / max(totals[2], 1), "train_acc": totals[1] / max(totals[2], 1),
                  "images_per_s": totals[2] / elapsed if elapsed > 0 else 0.0, "seconds": elapsed,
                  "lr": self.schedule(self.global_step - 1), "skipped_steps": self.skipped,
                  # the longest any rank's steps waited for their batches (data not ready in time)
                  "data_wait_seconds": self.world.allreduce_scalar(self.train_loader.wait_seconds, "max")}
        self.train_loader.wait_seconds = 0.0
        if self.world.size > 1:  # one process communicates nothing: no comm figures, rather than a misnamed one
            record.update({"comm_seconds": self.reducer.comm_seconds,
                           "comm_exposed_seconds": self.reducer.exposed_seconds,
                           "compute_seconds": elapsed - self.reducer.exposed_seconds})
        if self.val_loader is not None and ((self.epoch + 1) % cfg.eval_every == 0 or self.epoch + 1 == cfg.epochs):
            record.update(self.score("val", self.val_loader))
        if epoch_done:
            self.epoch += 1
            self.step_in_epoch = 0
            self.sums, self.part_started = self._new_sums(), time.perf_counter()
        self.metrics.write(record)
        self.log(f"epoch {record['epoch'] + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc'] * 100:.2f}%"
                 + (f", val loss {record['val_loss']:.4f} acc {record['val_acc'] * 100:.2f}%"
                    if "val_acc" in record else "")
                 + f", {record['images_per_s']:.0f} img/s, "
                 + (f"comm {record['comm_seconds']:.2f}s (exposed {record['comm_exposed_seconds']:.2f}s) of "
                    if "comm_seconds" in record else "")
                 + f"{elapsed:.2f}s")
        improved = record.get("val_acc", -1.0) > self.best_val
        self.best_val = max(self.best_val, record.get("val_acc", -1.0))
        path = self.save_checkpoint()
        if improved and path is not None:  # root: the best so far by validation accuracy, kept apart
            ckpt.keep_as_best(path)
            self.log(f"best validation accuracy so far: {path.parent / ckpt.BEST_NAME}")

    def score(self, split: str, loader) -> dict:
        """Collective: the model (the --ema average, if kept) on one split, as ``{split}_*`` metrics."""
        maybe_die("evaluation", self.recovery.world_rank, self.global_step)
        with self.tracer.span("evaluation", "evaluation", split=split):
            self.sync_buffers()
            with self.opt.averaged_weights():
                return split_scores(split, self.model, loader, self.world, len(self.class_names))

    def write_trace(self) -> None:
        """Collective: the --trace timeline so far, every rank's spans in one file (rank 0 writes it)."""
        self.tracer.write(self.world, self.config.trace, log=self.log, meta={
            "model": self.model.name, "global_batch": self.global_batch, "world_size": self.world.size,
            "comm": self.comm.name, "device": self.model.backend.name, "global_step": self.global_step,
            "bucket_bytes": [(b - a) * self.model.grad_buffer.dtype.itemsize for a, b, _ in self.reducer.buckets]})

    def _final_test(self):
        """Collective: the test set, scored once, on the final model."""
        if self.test_loader is None:
            return
        last = self.epoch - 1 if self.step_in_epoch == 0 and self.epoch > 0 else self.epoch  # as its epoch record says
        record = {"kind": "test", "step": self.global_step, "epoch": last, **self.score("test", self.test_loader)}
        self.metrics.write(record)
        self.log(f"test (final model, scored once): loss {record['test_loss']:.4f} acc {record['test_acc'] * 100:.2f}% "
                 f"({record['test_count']} images)")


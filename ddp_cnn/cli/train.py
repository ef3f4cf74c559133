"""``python -m ddp_cnn.train``: data-parallel training, one process per GPU (or CPU core).

Under ``mpirun -n N`` every rank reads its own shard, computes gradients with
our layers, averages them over ranks (bucketed, overlapping backward) and
applies the same optimizer step.  Rank 0 alone prints, logs and saves.
Without mpirun the same command trains in one process.

A thin layer over the library: flags (or a TOML recipe) -> one
:class:`~ddp_cnn.run.config.TrainConfig` -> data, model and teacher (each step's
errors agreed by every rank) -> :class:`~ddp_cnn.run.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ddp_cnn.cli.argtypes import (RankZeroParser, fraction, non_negative_float, non_negative_int, positive_float,
                                  positive_int, weight)
from ddp_cnn.data.splits import class_names_of, open_data
from ddp_cnn.dist import comm as comm_mod
from ddp_cnn.dist.agree import SetupError, agreed
from ddp_cnn.dist.faults import EXIT_USAGE, install_abort_hook, parse_fail_at
from ddp_cnn.model import modelfile
from ddp_cnn.model import network as model_mod
from ddp_cnn.model import optim
from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.run.config import TrainConfig
from ddp_cnn.run.progress import MODES, RootLog
from ddp_cnn.run.trainer import Trainer
from ddp_cnn.system.backend import get_backend

D = TrainConfig()


# ---- flags and config ---------------------------------------------------

def model_name(text):
    if text in model_mod.ARCHITECTURES or modelfile.is_model_file(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                     f"{', '.join(sorted(model_mod.ARCHITECTURES))}, or a model file FILE.toml)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: nothing added where the help already says it, or to an on/off flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = RankZeroParser(
        prog="python -m ddp_cnn.train",
        description="Train a CNN data-parallel over MPI ranks (mpirun -n N python -m ddp_cnn.train ...), "
                    "or in one process without mpirun.",
        formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--config", metavar="TOML", help="TOML file with any of these flags as keys "
                   "(dashes or underscores); flags given on the command line override it")
    for add in (_data_flags, _model_flags, _optimisation_flags, _system_flags, _output_flags):
        add(p)
    return p


def _data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default=D.data, help="folder of HDF5 shards made by `python -m data_tools.shard`")
    g.add_argument("--slice-data", action="store_true",
                   help="with fewer train shards than ranks, slice shard files by rank instead of refusing")
    g.add_argument("--data-order", default=D.data_order, choices=["shard", "global"],
                   help="shard: each rank shuffles the rows of its own shards (reads each shard once); global: "
                        "one shuffle of the whole training set per epoch, each rank reading its part of every "
                        "global batch from whichever shard holds it (shards on a shared file system), so training "
                        "does not depend on the rank count and a run resumes on another rank count")
    g.add_argument("--data-cache-mb", type=positive_float, default=D.data_cache_mb, metavar="MB",
                   help="streamed data: decoded HDF5 chunks each rank keeps, read ahead of the step by a thread "
                        "pool; it must hold the chunks of two shuffle windows (a clear error says when it cannot) "
                        "(default: an eighth of the memory available (cgroup and ulimit -v included) shared by the node's "
                        "ranks, 64-4096 MB, printed at start)")
    g.add_argument("--shuffle-window", type=non_negative_int, default=D.shuffle_window, metavar="CHUNKS",
                   help="streamed data: each epoch shuffles the order of the chunks, then the rows within each "
                        "window of this many consecutive chunks (more: a better shuffle for more cache; 0: the "
                        "whole set, which needs a cache as large as the data)")
    g.add_argument("--data-in-memory", action="store_true",
                   help="read each rank's training rows (every row in the global order) into memory at start "
                        "and shuffle them fully each epoch, instead of streaming chunks; for data that fits")
    g.add_argument("--val-fraction", type=fraction, default=D.val_fraction,
                   help="hold this part of the training rows out for validation (each epoch is scored on them "
                        "and the best checkpoint kept) when --data has no val.h5 (data_tools.shard "
                        "--val-fraction makes one); 0: none")
    g.add_argument("--augment-shift", type=non_negative_int, default=D.augment_shift,
                   help="random translation by up to this many pixels (zero padding)")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (clothes yes, digits no)")
    g.add_argument("--erase", type=fraction, default=D.erase, help="probability of random erasing of one rectangle")


def _model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=D.model, type=model_name, metavar="NAME|FILE.toml",
                   help=f"architecture ({', '.join(sorted(model_mod.ARCHITECTURES))}), or a model file: one "
                        "[[layers]] table per layer, e.g. models/small-cnn.toml (default: lenet; with --resume, "
                        "the model the checkpoint holds)")
    g.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="remove the dropout layers")
    g.add_argument("--dropout-rate", type=fraction, default=D.dropout_rate,
                   help="one rate for every dropout layer (default: the architecture's own: "
                        "fmnist-cnn .25/.25/.5, mlp .2, lenet .25, fmnist-vgg .1/.2)")
    g.add_argument("--batchnorm", action="store_true", help="fmnist-cnn and mlp: batch norm after each conv/hidden dense layer")
    g.add_argument("--sync-bn", action="store_true",
                   help="batch norm statistics over the global batch (per-channel sums allreduced in forward and "
                        "backward; SyncBatchNorm), so N ranks compute what one rank does with the whole batch; "
                        "default: each rank's own batch, as PyTorch DDP")
    g.add_argument("--width", type=positive_int, default=D.width,
                   help="fmnist-vgg: filters of the first stage, doubled at each of the next two (default 64)")
    g.add_argument("--activation", default=D.activation, choices=["relu", "leaky_relu", "prelu", "elu", "tanh", "sigmoid"],
                   help="activation (default: the architecture's own)")
    g.add_argument("--dtype", default=D.dtype, choices=["float32", "float64"], help="float type of the math")
    g.add_argument("--label-smoothing", type=fraction, default=D.label_smoothing, help="label smoothing of the cross-entropy")
    g.add_argument("--teacher", metavar="CHECKPOINT",
                   help="knowledge distillation: a checkpoint (.h5) of a model trained on the same data, or a "
                        "run folder (its newest checkpoint); the model also learns to match its softened "
                        "predictions (its --ema average if it kept one)")
    g.add_argument("--distill-weight", type=weight, default=None,
                   help="with --teacher: weight of the teacher's soft targets in the loss, the labels get the "
                        "rest (default 0.5)")
    g.add_argument("--distill-temperature", type=positive_float, default=None,
                   help="with --teacher: softmax temperature of both models' logits in the soft term (default 4)")


def _optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=D.epochs, help="epochs to train")
    g.add_argument("--max-steps", type=non_negative_int, default=D.max_steps,
                   help="stop after this many optimizer steps in total (0: no limit)")
    g.add_argument("--batch-size", type=positive_int, default=D.batch_size,
                   help="global batch (summed over ranks); must be divisible by the number of ranks, except "
                        "with --data-order global")
    g.add_argument("--local-batch-size", type=positive_int, default=D.local_batch_size,
                   help="per-rank batch; overrides --batch-size (global = local x ranks)")
    g.add_argument("--accumulate", type=positive_int, default=D.accumulate, metavar="K",
                   help="split each rank's batch into K micro-batches, forward and backward one at a time, and "
                        "allreduce and step once (the same update with 1/K of the activation memory); "
                        "micro-batches differ by at most one image when K does not divide the batch")
    g.add_argument("--optimizer", default=D.optimizer, choices=optim.OPTIMIZERS, help="update rule")
    g.add_argument("--lr", type=positive_float, default=D.lr, help="base learning rate")
    g.add_argument("--scale-lr", action="store_true",
                   help="linear scaling rule: lr x global batch / --lr-base-batch")
    g.add_argument("--lr-base-batch", type=positive_int, default=D.lr_base_batch, help="reference batch of the scaling rule")
    g.add_argument("--momentum", type=fraction, default=D.momentum, help="momentum/nesterov coefficient")
    g.add_argument("--beta1", type=fraction, default=D.beta1, help="Adam beta1")
    g.add_argument("--beta2", type=fraction, default=D.beta2, help="Adam beta2")
    g.add_argument("--eps", type=positive_float, default=D.eps, help="Adam/RMSprop/AdaGrad epsilon (default: per optimizer)")
    g.add_argument("--rho", type=fraction, default=D.rho, help="RMSprop decay")
    g.add_argument("--weight-decay", type=non_negative_float, default=D.weight_decay,
                   help="decoupled weight decay on weights (default: 0.01 for adamw, none for the others; "
                        "0 turns it off)")
    g.add_argument("--l2", type=non_negative_float, default=D.l2, help="L2 penalty added to the weight gradients")
    g.add_argument("--ema", type=fraction, default=D.ema,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
                        "evaluate, report and export it instead of the raw weights (0: off)")
    g.add_argument("--schedule", default=D.schedule, choices=optim.Schedule.KINDS, help="LR schedule")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=D.warmup_epochs, help="linear LR warmup length")
    g.add_argument("--step-epochs", type=positive_float, default=D.step_epochs, help="step schedule: decay period in epochs")
    g.add_argument("--gamma", type=positive_float, default=D.gamma, help="step schedule: decay factor")
    g.add_argument("--min-lr", type=non_negative_float, default=D.min_lr, help="cosine schedule: final LR")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (on every rank) an update whose averaged gradient is not finite, instead of stopping")


def _system_flags(p):
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=D.seed, help="seed of init, data order, augmentation and dropout")
    g.add_argument("--device", default=D.device, choices=["auto", "cpu", "gpu"],
                   help="auto: the GPU of this rank's node-local rank when CuPy sees one")
    g.add_argument("--comm", default=D.comm, choices=["auto", "mpi", "nccl", "single"],
                   help="gradient transport; auto: NCCL when every rank owns a distinct GPU, else MPI")
    g.add_argument("--collective-timeout", type=non_negative_float, default=D.collective_timeout,
                   help="seconds a rank waits on the others (each step's gradient allreduce, and every other "
                        "MPI collective) before it ends the job with one line (a stalled or unreachable rank); "
                        "0: no limit. With NCCL the gradient allreduce itself is not waited on by the host")
    g.add_argument("--on-rank-loss", default=D.on_rank_loss, choices=["auto", "shrink", "restart"],
                   help="when a rank dies: shrink (the survivors go on without a restart, on the same trajectory; "
                        "needs an MPI with ULFM, Open MPI 5 under `mpirun --with-ft ulfm`, and --data-order "
                        "global) or restart (the job ends; python -m ddp_cnn.supervise restarts it from the newest "
                        "checkpoint); auto: shrink where it can, else restart, said at start")
    g.add_argument("--min-ranks", type=positive_int, default=D.min_ranks,
                   help="after a shrink, fewer ranks than this end the job: a checkpoint, then exit 76 for the "
                        "supervisor to restart it (default: 1)")
    g.add_argument("--bucket-mb", type=non_negative_float, default=D.bucket_mb,
                   help="allreduce bucket size in MB; 0: one allreduce of the whole buffer after backward")
    g.add_argument("--check-replicas", type=non_negative_int, default=D.check_replicas,
                   help="every N steps, verify that all ranks hold bitwise-identical parameters (0: never)")
    g.add_argument("--fail-at", metavar="RANK:STEP", default=D.fail_at,
                   help=argparse.SUPPRESS)  # testing: raise on RANK at global step STEP (also $DDP_CNN_FAIL_AT)
    g.add_argument("--inject-nan", metavar="RANK:STEP", default=D.inject_nan,
                   help=argparse.SUPPRESS)  # testing: RANK's gradient turns NaN at STEP (also $DDP_CNN_NAN_AT)


def _output_flags(p):
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", default=D.run_dir, help="folder for metrics and checkpoints (default: runs/MODEL)")
    g.add_argument("--metrics", default=D.metrics, help="JSON-lines metrics file (default: RUN_DIR/metrics.jsonl)")
    g.add_argument("--checkpoint-dir", default=D.checkpoint_dir, help="checkpoint folder (default: RUN_DIR/checkpoints)")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=D.checkpoint_every,
                   help="also checkpoint every N steps (0: only at the end of each epoch)")
    g.add_argument("--checkpoint-every-seconds", type=non_negative_float, default=D.checkpoint_every_seconds,
                   metavar="S", help="also checkpoint after the first step that ends S seconds or more after the "
                        "last checkpoint (rank 0's clock, agreed by every rank through the gradient allreduce), so "
                        "a restart loses at most S seconds plus a step of work (0: off)")
    g.add_argument("--keep", type=non_negative_int, default=D.keep,
                   help="checkpoints to keep: the newest that verify (0: all); a corrupt one is renamed .corrupt, "
                        "never counted")
    g.add_argument("--resume", nargs="?", const="latest", default=D.resume, metavar="PATH|latest|auto",
                   help="continue from a checkpoint file, or the newest valid one in the checkpoint folder "
                        "(latest: refused when the run dir does not exist; auto, for requeued jobs: also "
                        "starts a new run when there is nothing to resume yet, and says so)")
    g.add_argument("--eval-every", type=non_negative_int, default=D.eval_every,
                   help="score the validation split every N epochs; the test set is scored once, at the end "
                        "(0: no evaluation at all)")
    g.add_argument("--eval-batch-size", type=positive_int, default=D.eval_batch_size, help="evaluation batch per rank")
    g.add_argument("--log-every", type=non_negative_int, default=D.log_every,
                   help="also write a metrics line every N steps (0: per epoch only)")
    g.add_argument("--progress", default=D.progress, choices=MODES,
                   help="what rank 0 shows during an epoch: a tqdm bar (bar), a line every 5 s with loss, img/s "
                        "and time left (lines), nothing (off); auto: the bar on a terminal, else lines "
                        "(as under mpirun); on: an older spelling of bar")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --run-dir (its metrics and checkpoints); without it a "
                        "run dir that holds a run is refused unless --resume")
    g.add_argument("--trace", metavar="FILE", default=D.trace,
                   help="write a timeline of every rank's steps to FILE (Chrome trace-event JSON, for "
                        "https://ui.perfetto.dev): data wait, forward and backward per layer, each gradient "
                        "bucket's allreduce, optimizer, checkpoints, evaluation; python -m ddp_cnn.report "
                        "--trace FILE draws one step")


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """TOML keys -> argparse defaults; unknown keys and bad values are usage errors."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"--config {path}: not valid TOML ({exc})")
    actions = {a.dest: a for a in parser._actions}
    values = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            parser.error(f"--config {path}: unknown key {key!r}")
        action = actions[dest]
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"--config {path}: key {key!r}: {exc}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: key {key!r}: expected one of {sorted(action.choices)}, got {value!r}")
        values[dest] = value
    return values


def parse_args(argv=None) -> TrainConfig:
    """The command line (and its --config recipe) as one TrainConfig; usage errors exit 2."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    for flag, value in (("--distill-weight", args.distill_weight), ("--distill-temperature", args.distill_temperature)):
        if args.teacher is None and value is not None:
            parser.error(f"{flag}: only with --teacher CHECKPOINT")
    for name in ("distill_weight", "distill_temperature"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(D, name))
    if args.model is None and not args.resume:  # a resume without --model takes the checkpoint's (build_model)
        args.model = "lenet"
    try:
        args.fail_at = parse_fail_at(args.fail_at)
        args.inject_nan = parse_fail_at(args.inject_nan, env="DDP_CNN_NAN_AT", flag="--inject-nan")
    except ValueError as exc:
        parser.error(str(exc))
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def arch_kwargs(cfg: TrainConfig) -> dict:
    """The architecture's keyword arguments from the model flags; ValueError for flags that do not fit it.

    A model file, or the checkpoint's model (``--resume`` without ``--model``), brings its own layers:
    every model flag is refused there, whether or not the checkpoint exists yet, so a requeued job
    that repeats its command line gets the same answer each time.
    """
    if cfg.model not in model_mod.ARCHITECTURES:
        owner = f"--model {cfg.model}" if cfg.model else "--resume without --model (the checkpoint's model)"
        for flag, given in (("--no-dropout", not cfg.dropout), ("--dropout-rate", cfg.dropout_rate is not None),
                            ("--activation", cfg.activation), ("--width", cfg.width is not None),
                            ("--batchnorm", cfg.batchnorm)):
            if given:
                raise ValueError(f"{flag}: only for the named architectures; {owner} brings its own layers")
        return {}
    kw = {"dropout": cfg.dropout}
    if cfg.dropout_rate is not None:
        if not cfg.dropout:
            raise ValueError("--dropout-rate: the model has no dropout layers with --no-dropout")
        kw["dropout_rate"] = cfg.dropout_rate
    if cfg.activation:
        kw["activation"] = cfg.activation
    if cfg.width is not None:
        if cfg.model != "fmnist-vgg":
            raise ValueError(f"--width: only for --model fmnist-vgg (got {cfg.model})")
        kw["width"] = cfg.width
    if cfg.batchnorm:
        if cfg.model not in ("fmnist-cnn", "mlp"):
            raise ValueError(f"--batchnorm: only for --model fmnist-cnn or mlp (got {cfg.model}); "
                             "fmnist-vgg always has batch norm")
        kw["batchnorm"] = True
    return kw


def build_model(cfg: TrainConfig, backend, train_data):
    """The model for the data's image shape and classes: a named architecture, a model file, or
    (``--resume`` without ``--model``) the one the checkpoint holds, rebuilt from its description."""
    shape = tuple(int(v) for v in train_data.images.shape[1:])
    shape = shape + (1,) if len(shape) == 2 else shape
    classes, kw = len(class_names_of(train_data)), arch_kwargs(cfg)  # refuses model flags that do not fit
    if cfg.model is None:
        desc = resumed_description(cfg)
        if desc is not None:
            return model_mod.from_description(desc, backend, seed=cfg.seed)
    if modelfile.is_model_file(cfg.model):
        return modelfile.load(cfg.model, shape, backend, seed=cfg.seed, num_classes=classes)
    return model_mod.build(cfg.model or "lenet", backend, seed=cfg.seed, input_shape=shape, num_classes=classes, **kw)


def resumed_description(cfg: TrainConfig) -> dict | None:
    """The model description of the checkpoint ``--resume`` continues; None when there is none yet.

    ``latest`` looks where the Trainer will: --checkpoint-dir, else RUN_DIR/checkpoints, the run dir
    defaulting to runs/lenet (the default model's) since there is no model name to go by.  Every
    rank reads it; the Trainer reads it again on rank 0, and warns there about corrupt files.
    """
    if not cfg.resume:
        return None
    if cfg.resume not in ckpt.NEWEST:
        return ckpt.load(cfg.resume)["meta"].get("model")
    folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path(cfg.run_dir or "runs/lenet") / "checkpoints"
    state = ckpt.load_latest(folder, warn=lambda message: None)
    return state["meta"].get("model") if state else None


def main(argv=None) -> int:
    cfg = parse_args(argv)
    world = comm_mod.create("single" if cfg.comm == "single" else "auto")
    install_abort_hook(world)
    try:
        # Each step ends with the ranks agreeing on errors, so a rank that fails
        # never leaves the others waiting in a collective it skipped.
        backend = agreed(world, lambda: get_backend(cfg.device, cfg.dtype, world.local_rank, world.local_size))
        data = open_data(cfg, world)
        model = agreed(world, lambda: build_model(cfg, backend, data[0]))
        distiller = None
        if cfg.teacher:
            from ddp_cnn.inference.distill import Distiller
            distiller = agreed(world, lambda: Distiller.load(cfg.teacher, backend, model, class_names_of(data[0]),
                                                             data[0].attrs, cfg.distill_weight,
                                                             cfg.distill_temperature))
        trainer = Trainer(model, cfg, comm=world, rank_data=data, distiller=distiller, log=RootLog(world))
    except SetupError as exc:  # raised on every rank at once
        if world.is_root:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    status = trainer.fit()
    trainer.recovery.leave(status)  # after a shrink: ends here, without MPI_Finalize (ddp_cnn.run.shrink)
    return status


if __name__ == "__main__":
    sys.exit(main())

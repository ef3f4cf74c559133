"""``python -m ddp_cnn.train``: data-parallel training, one process per GPU (or CPU).

Under ``mpirun -n N`` every rank reads its own shard, computes gradients with
our layers, averages them over ranks (bucketed, overlapping backward) and
applies the same optimizer step.  Rank 0 alone prints, logs and saves.
Without mpirun the same command trains in one process.

Reads top to bottom like the run: flags, setup (each rank on its own, errors
agreed before any collective), the consistency check and broadcast, the
loop, evaluation and checkpoints.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from . import blas, threads
from . import checkpoint as ckpt
from . import comm as comm_mod
from . import model as model_mod
from . import optim
from .backend import get_backend, to_host
from .evaluate import evaluate, to_model_layout
from .faults import (EXIT_FAILED, EXIT_PREEMPTED, EXIT_USAGE, StopFlag, install_abort_hook, maybe_fail,
                     parse_fail_at)
from .layers import SoftmaxCrossEntropy

DEFAULT_DATA = "data/fashion-mnist"


# ---- flags and config ---------------------------------------------------

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def weight(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddp_cnn.train",
        description="Train a CNN data-parallel over MPI ranks (mpirun -n N python -m ddp_cnn.train ...), "
                    "or in one process without mpirun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="TOML", help="TOML file with any of these flags as keys "
                   "(dashes or underscores); flags given on the command line override it")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DEFAULT_DATA, help="folder of HDF5 shards made by `python -m data_tools.shard`")
    g.add_argument("--slice-data", action="store_true",
                   help="with fewer train shards than ranks, slice shard files by rank instead of refusing")
    g.add_argument("--augment-shift", type=non_negative_int, default=0,
                   help="random translation by up to this many pixels (zero padding)")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (clothes yes, digits no)")
    g.add_argument("--erase", type=fraction, default=0.0, help="probability of random erasing of one rectangle")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="lenet", choices=sorted(model_mod.ARCHITECTURES), help="architecture")
    g.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="remove the dropout layers (dropout kept: %(default)s)")
    g.add_argument("--dropout-rate", type=fraction, default=None,
                   help="one rate for every dropout layer; default %(default)s: the architecture's own "
                        "(fmnist-cnn .25/.25/.5, mlp .2, lenet .25, fmnist-vgg .1/.2)")
    g.add_argument("--batchnorm", action="store_true", help="fmnist-cnn and mlp: batch norm after each conv/hidden dense layer")
    g.add_argument("--width", type=positive_int, default=None,
                   help="fmnist-vgg: filters of the first stage, doubled at each of the next two (default 64)")
    g.add_argument("--activation", default=None, choices=["relu", "leaky_relu", "prelu", "elu", "tanh", "sigmoid"],
                   help="activation (default: the architecture's own)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="float type of the math")
    g.add_argument("--label-smoothing", type=fraction, default=0.0, help="label smoothing of the cross-entropy")
    g.add_argument("--teacher", metavar="CHECKPOINT",
                   help="knowledge distillation: a checkpoint (.h5) of a model trained on the same data, or a "
                        "run folder (its newest checkpoint); the model also learns to match its softened "
                        "predictions (its --ema average if it kept one)")
    g.add_argument("--distill-weight", type=weight, default=None,
                   help="with --teacher: weight of the teacher's soft targets in the loss, the labels get the "
                        "rest (default 0.5)")
    g.add_argument("--distill-temperature", type=positive_float, default=None,
                   help="with --teacher: softmax temperature of both models' logits in the soft term (default 4)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=2, help="epochs to train")
    g.add_argument("--max-steps", type=non_negative_int, default=0,
                   help="stop after this many optimizer steps in total (0: no limit)")
    g.add_argument("--batch-size", type=positive_int, default=128,
                   help="global batch (summed over ranks); must be divisible by the number of ranks")
    g.add_argument("--local-batch-size", type=positive_int, default=None,
                   help="per-rank batch; overrides --batch-size (global = local x ranks)")
    g.add_argument("--optimizer", default="adam", choices=optim.OPTIMIZERS, help="update rule")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="base learning rate")
    g.add_argument("--scale-lr", action="store_true",
                   help="linear scaling rule: lr x global batch / --lr-base-batch")
    g.add_argument("--lr-base-batch", type=positive_int, default=256, help="reference batch of the scaling rule")
    g.add_argument("--momentum", type=fraction, default=0.9, help="momentum/nesterov coefficient")
    g.add_argument("--beta1", type=fraction, default=0.9, help="Adam beta1")
    g.add_argument("--beta2", type=fraction, default=0.999, help="Adam beta2")
    g.add_argument("--eps", type=positive_float, default=None, help="Adam/RMSprop/AdaGrad epsilon (default: per optimizer)")
    g.add_argument("--rho", type=fraction, default=0.9, help="RMSprop decay")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                   help="decoupled weight decay on weights (adamw default: 0.01)")
    g.add_argument("--l2", type=non_negative_float, default=0.0, help="L2 penalty added to the weight gradients")
    g.add_argument("--ema", type=fraction, default=0.0,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
                        "evaluate, report and export it instead of the raw weights (0: off)")
    g.add_argument("--schedule", default="constant", choices=optim.Schedule.KINDS, help="LR schedule")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=0.0, help="linear LR warmup length")
    g.add_argument("--step-epochs", type=positive_float, default=10.0, help="step schedule: decay period in epochs")
    g.add_argument("--gamma", type=positive_float, default=0.1, help="step schedule: decay factor")
    g.add_argument("--min-lr", type=non_negative_float, default=0.0, help="cosine schedule: final LR")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (on every rank) an update whose averaged gradient is not finite, instead of stopping")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation and dropout")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: the GPU of this rank's node-local rank when CuPy sees one")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU: N threads, BLAS single-threaded in each; in training each thread runs the "
                        "network on its share of the batch (models with batch norm: each layer's work is "
                        "split instead) (default: $OMP_NUM_THREADS, which ddp_cnn sets to the cores per rank "
                        "on a node; 1: BLAS with its own threads only)")
    g.add_argument("--blas", default="numpy", choices=blas.CHOICES,
                   help="CPU only (ignored on a GPU): who runs the layers' GEMMs: NumPy's own BLAS, or Intel "
                        "MKL (`pip install mkl`; fmnist-cnn steps 1.07-1.16x faster on an Intel VM, see "
                        "bench/RESULTS.md)")
    g.add_argument("--comm", default="auto", choices=["auto", "mpi", "nccl", "single"],
                   help="gradient transport; auto: NCCL when every rank owns a distinct GPU, else MPI")
    g.add_argument("--bucket-mb", type=non_negative_float, default=4.0,
                   help="allreduce bucket size in MB; 0: one allreduce of the whole buffer after backward")
    g.add_argument("--check-replicas", type=non_negative_int, default=0,
                   help="every N steps, verify that all ranks hold bitwise-identical parameters (0: never)")
    g.add_argument("--fail-at", metavar="RANK:STEP", default=None,
                   help="testing: raise on RANK at global step STEP (also $DDP_CNN_FAIL_AT)")
    g.add_argument("--inject-nan", metavar="RANK:STEP", default=None,
                   help="testing: make RANK's gradient NaN at global step STEP (also $DDP_CNN_NAN_AT)")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", default=None, help="folder for metrics and checkpoints (default: runs/MODEL)")
    g.add_argument("--metrics", default=None, help="JSON-lines metrics file (default: RUN_DIR/metrics.jsonl)")
    g.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: RUN_DIR/checkpoints)")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="also checkpoint every N steps (0: only at the end of each epoch)")
    g.add_argument("--keep", type=non_negative_int, default=3, help="checkpoints to keep (0: all)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH|latest",
                   help="continue from a checkpoint file, or the newest valid one in the checkpoint folder")
    g.add_argument("--eval-every", type=non_negative_int, default=1, help="evaluate every N epochs (0: never)")
    g.add_argument("--eval-batch-size", type=positive_int, default=1000, help="evaluation batch per rank")
    g.add_argument("--log-every", type=non_negative_int, default=0,
                   help="also write a metrics line every N steps (0: per epoch only)")
    g.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                   help="tqdm bar on rank 0 (auto: when stderr is a terminal)")
    return p


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    args.run_dir = Path(args.run_dir or f"runs/{args.model}")
    args.metrics = Path(args.metrics) if args.metrics else args.run_dir / "metrics.jsonl"
    args.checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else args.run_dir / "checkpoints"
    for flag, value in (("--distill-weight", args.distill_weight), ("--distill-temperature", args.distill_temperature)):
        if args.teacher is None and value is not None:
            parser.error(f"{flag}: only with --teacher CHECKPOINT")
    args.distill_weight = 0.5 if args.distill_weight is None else args.distill_weight
    args.distill_temperature = 4.0 if args.distill_temperature is None else args.distill_temperature
    try:
        args.fail_at = parse_fail_at(args.fail_at)
        args.inject_nan = parse_fail_at(args.inject_nan, env="DDP_CNN_NAN_AT", flag="--inject-nan")
    except ValueError as exc:
        parser.error(str(exc))
    return args


# ---- setup ----------------------------------------------------------------

class Log:
    """Rank 0 prints; everyone else stays quiet."""

    def __init__(self, comm):
        self.root = comm.is_root

    def __call__(self, *parts):
        if self.root:
            print(*parts, flush=True)


def arch_kwargs(args) -> dict:
    kw = {"dropout": args.dropout}
    if args.dropout_rate is not None:
        if not args.dropout:
            raise ValueError("--dropout-rate: the model has no dropout layers with --no-dropout")
        kw["dropout_rate"] = args.dropout_rate
    if args.activation:
        kw["activation"] = args.activation
    if args.width is not None:
        if args.model != "fmnist-vgg":
            raise ValueError(f"--width: only for --model fmnist-vgg (got {args.model})")
        kw["width"] = args.width
    if args.batchnorm:
        if args.model not in ("fmnist-cnn", "mlp"):
            raise ValueError(f"--batchnorm: only for --model fmnist-cnn or mlp (got {args.model}); "
                             "fmnist-vgg always has batch norm")
        kw["batchnorm"] = True
    return kw


def setup_device(args, comm) -> dict:
    """Local checks and the device binding; no collective.  Raises on bad input."""
    if args.local_batch_size:
        local_batch = args.local_batch_size
        global_batch = local_batch * comm.size
    else:
        if args.batch_size % comm.size:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {comm.size} ranks; "
                             f"use a multiple of {comm.size} or --local-batch-size")
        global_batch, local_batch = args.batch_size, args.batch_size // comm.size
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: no such folder; make it with "
                         f"`python -m data_tools.shard --out {args.data} --shards {comm.size}`")
    backend = get_backend(args.device, args.dtype, comm.local_rank, comm.local_size, args.threads)
    if not backend.is_gpu:
        blas.use(args.blas)
    return dict(backend=backend, global_batch=global_batch, local_batch=local_batch)


def setup_data(args, comm) -> dict:
    """Collective: this rank's train rows and test slice (DataError on every rank at once)."""
    from .data import open_rank_data
    train_data = open_rank_data(args.data, "train", comm, slice_single=args.slice_data)
    test_data = open_rank_data(args.data, "test", comm) if args.eval_every else None
    return dict(train_data=train_data, test_data=test_data)


def setup_model(args, comm, log, s) -> dict:
    """Model, optimizer and (rank 0) the checkpoint to resume; no collective.  Raises on bad input."""
    from .data import Augment
    image_shape = tuple(int(v) for v in s["train_data"].images.shape[1:])
    class_names = list(s["train_data"].attrs.get("class_names") or [str(i) for i in range(10)])
    model = model_mod.build(args.model, s["backend"], seed=args.seed, input_shape=image_shape + (1,),
                            num_classes=len(class_names), **arch_kwargs(args))
    model.rank = comm.rank
    if args.ema and model.named_buffers():
        raise ValueError(f"--ema: not for a model with batch norm ({args.model}): its running statistics "
                         "belong to the raw weights, not to their average")
    lr = args.lr * s["global_batch"] / args.lr_base_batch if args.scale_lr else args.lr
    opt = optim.create(args.optimizer, model.params, model.grads, lr, momentum=args.momentum, beta1=args.beta1,
                       beta2=args.beta2, eps=args.eps, rho=args.rho, l2=args.l2, weight_decay=args.weight_decay,
                       decay_ranges=model.decay_ranges, ema=args.ema)
    resume = None
    if args.resume and comm.is_root:  # rank 0 reads, everyone receives it in the broadcast
        if args.resume == "latest":
            resume = ckpt.load_latest(args.checkpoint_dir, warn=log)
            if resume is None:
                log(f"--resume latest: no valid checkpoint in {args.checkpoint_dir}; starting from scratch")
        else:
            resume = ckpt.load(args.resume)
        if resume is not None and resume["meta"]["model"] != model.describe():
            hint = ("; fmnist-cnn checkpoints from before its max-pools moved ahead of the activations "
                    "evaluate, predict and export, but do not resume" if args.model == "fmnist-cnn" else "")
            raise ckpt.CheckpointError(f"checkpoint {resume['path']}: holds a {resume['meta']['model']['name']} "
                                       f"model that differs from --model {args.model} with these flags{hint}")
    augment = Augment(shift=args.augment_shift, hflip=args.hflip, erase=args.erase)
    teacher = None
    if args.teacher:
        from .inference import load_teacher
        teacher = load_teacher(args.teacher, s["backend"], model, class_names, s["train_data"].attrs)
    before = (resume or {}).get("meta", {}).get("teacher") or {}
    if resume is not None and before.get("sha256") != (teacher.digest if teacher is not None else None):
        log(f"warning: the checkpoint was trained with teacher {before.get('source', 'none')}; the run goes on "
            f"with {teacher.source if teacher is not None else 'none'}")
    return dict(model=model, opt=opt, lr=lr, class_names=class_names, resume=resume, augment=augment,
                teacher=teacher)


def agree_on_errors(comm, error):
    """Collective: the first rank's error message, or None when every rank is fine."""
    errors = comm.allgather_obj(error)
    for rank, err in enumerate(errors):
        if err is not None:
            return f"{err}" if comm.size == 1 else f"{err} (rank {rank})"
    return None


def identity(args, s) -> dict:
    """What must be equal on every rank before step 1."""
    config = {k: str(v) for k, v in sorted(vars(args).items()) if k not in ("fail_at", "inject_nan", "progress")}
    teacher = s.get("teacher")
    return {"model": hashlib.sha256(json.dumps(s["model"].describe(), sort_keys=True).encode()).hexdigest(),
            "num_params": s["model"].num_params,
            "teacher": teacher.digest if teacher is not None else None,
            "dataset": s["train_data"].attrs.get("sharding_id"),
            "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()}


def check_same_everywhere(comm, ident) -> str | None:
    everyone = comm.allgather_obj(ident)
    for key in ident:
        values = [e[key] for e in everyone]
        if len(set(map(str, values))) > 1:
            what = {"model": "model architecture", "num_params": "parameter count",
                    "teacher": "--teacher weights (a run folder that resolved to different checkpoints?)",
                    "dataset": "dataset (sharding_id of the shards: shards from different sharding runs?)",
                    "config": "training configuration (flags or code)"}[key]
            return f"ranks disagree on the {what}: " + ", ".join(f"rank {r}: {str(v)[:12]}" for r, v in enumerate(values))
    return None


def choose_transport(args, comm, backend, log) -> str:
    """single / mpi / nccl, with the reason logged."""
    if comm.size == 1 and args.comm != "nccl":
        return "single"
    if args.comm == "mpi" or not backend.is_gpu:
        if args.comm == "nccl":
            raise ValueError("--comm nccl: needs --device gpu (NCCL runs between GPUs)")
        return "mpi"
    owners = comm.allgather_obj((comm_mod.hostname(), backend.device_id))
    distinct = len(set(owners)) == len(owners)
    try:
        from cupy.cuda import nccl  # noqa: F401
        have_nccl = True
    except Exception:
        have_nccl = False
    if args.comm == "nccl" and not (distinct and have_nccl):
        raise ValueError("--comm nccl: " + ("CuPy has no NCCL" if not have_nccl else
                                            "ranks share a GPU, and NCCL cannot pair ranks on one GPU"))
    if distinct and have_nccl:
        return "nccl"
    log("comm: using MPI with host staging: " + ("CuPy has no NCCL" if not have_nccl else
                                                 "ranks share GPUs, which NCCL cannot pair"))
    return "mpi"


# ---- the run ----------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    comm = comm_mod.create("single" if args.comm == "single" else "auto")
    install_abort_hook(comm)
    log = Log(comm)
    from .data import DataError, Loader

    # Each phase ends with the ranks agreeing on errors, so a rank that fails
    # never leaves the others waiting in a collective it skipped.
    s: dict = {}
    error = None
    for phase in (lambda: setup_device(args, comm), lambda: setup_data(args, comm),
                  lambda: setup_model(args, comm, log, s)):
        try:
            s.update(phase())
        except (ValueError, RuntimeError, OSError, DataError) as exc:
            error = str(exc)
        error = agree_on_errors(comm, error)
        if error is not None:
            break
    if error is None:
        error = check_same_everywhere(comm, identity(args, s))
    if error is None:
        try:
            s["train_loader"] = Loader(s["train_data"], batch_size=s["local_batch"], comm=comm, seed=args.seed,
                                       xp=s["backend"].xp, dtype=s["backend"].dtype, augment=s["augment"])
            s["test_loader"] = (Loader(s["test_data"], batch_size=args.eval_batch_size, comm=comm, seed=args.seed,
                                       xp=s["backend"].xp, dtype=s["backend"].dtype, shuffle=False, drop_last=False,
                                       mean=s["train_data"].attrs["mean"], std=s["train_data"].attrs["std"])
                                if s["test_data"] is not None else None)
            s["transport"] = choose_transport(args, comm, s["backend"], log)
        except (ValueError, DataError) as exc:  # raised identically on every rank (agreed values)
            error = str(exc)
    if error is not None:
        if comm.is_root:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return Trainer(args, comm, log, s).run()


def forward_backward_allreduce(model, loss_fn, reducer, x, y, step: int, poison: bool = False, teacher=None,
                               soft=None):
    """One step's gradient, averaged over ranks into ``model.grads``.  Returns (loss, correct) on device.

    Collective: every rank calls it once per step.  Each bucket's allreduce
    starts as soon as backward has produced it.  Distillation: `soft` holds
    the teacher's logits for this batch, or else a `teacher` model computes
    them from the same (augmented) batch.
    """
    logits = model.forward(to_model_layout(x, model), train=True, step=step)
    if soft is None and teacher is not None:
        soft = teacher.forward(to_model_layout(x, teacher), train=False)
    loss = loss_fn.forward(logits, y, soft)
    correct = (logits.argmax(axis=1) == y).sum()
    dlogits = loss_fn.backward()
    if poison:  # --inject-nan: this rank's gradient turns NaN, as after an overflow
        dlogits[...] = float("nan")
    reducer.begin()
    # One rank has no bucket to start: without a hook, the model's replicas add their
    # gradients at the end, split over the threads, rather than layer by layer in one.
    model.backward(dlogits, None if reducer.transport == "single" else reducer.layer_done)
    reducer.finish()
    return loss, correct


def teacher_logits_by_row(teacher, data, loader, chunk: int = 256):
    """The teacher's logits for every row of this rank's data, normalised as the loader does.

    Without augmentation an image's soft targets never change, so the teacher
    labels each row once and every step looks its batch up, instead of
    running the teacher at every step.
    """
    parts = []
    for a in range(0, len(data), chunk):
        x, _ = loader.to_device(data.images[a:a + chunk], data.labels[a:a + chunk])
        parts.append(teacher.forward(to_model_layout(x, teacher), train=False))
    return loader.xp.concatenate(parts)


class Trainer:
    """The loop.  Every method is called on every rank unless its name says root."""

    def __init__(self, args, comm, log, s):
        self.args, self.comm, self.log = args, comm, log
        self.__dict__.update(s)
        self.xp = self.backend.xp
        self.loss_fn = SoftmaxCrossEntropy(args.label_smoothing, args.distill_weight if self.teacher is not None
                                           else 0.0, args.distill_temperature)
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        total = args.epochs * self.steps_per_epoch
        self.schedule = optim.Schedule(
            self.lr, total, args.schedule, warmup=round(args.warmup_epochs * self.steps_per_epoch),
            step_size=max(1, round(args.step_epochs * self.steps_per_epoch)), gamma=args.gamma, min_lr=args.min_lr)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.restore_or_broadcast()
        from .reducer import GradReducer
        ranges = list(zip(self.model.layer_offsets, self.model.layer_ends))
        self.reducer = GradReducer(comm, self.model.grads, ranges, args.bucket_mb, self.backend, self.transport)
        self.stop = StopFlag()
        self.stop.install()
        self.skipped = 0
        self.soft_targets = None
        self.teacher_record = None
        if self.teacher is not None:
            self.teacher_record = {"source": self.teacher.source, "sha256": self.teacher.digest,
                                   "describe": f"{self.teacher.name}, {self.teacher.num_params:,} params"}
            if not self.augment.changes_images:
                self.soft_targets = teacher_logits_by_row(self.teacher, self.train_data, self.train_loader)
                self.teacher = None  # its logits are all it was needed for

    # ---- state -----------------------------------------------------------
    def restore_or_broadcast(self):
        """Rank 0's parameters (fresh or from the checkpoint) and optimizer state, on every rank."""
        state = None
        if self.comm.is_root:
            if self.resume is not None:
                state = {k: self.resume[k] for k in ("params", "optim", "buffers", "meta", "path")}
            else:
                state = {"params": to_host(self.model.params)}
        state = self.comm.bcast_obj(state)
        self.model.params[...] = self.xp.asarray(state["params"])
        if "optim" in state:
            if "ema" in state["optim"] and not self.opt.ema:
                self.log(f"warning: {state['path']} holds a moving average of the weights (--ema), which this "
                         "run without --ema drops: later checkpoints, evaluate and export use the raw weights")
            self.opt.load_state_dict(state["optim"])
            for name, buf in self.model.named_buffers().items():
                buf[...] = self.xp.asarray(state["buffers"][name])
            meta = state["meta"]
            self.epoch, self.step_in_epoch, self.global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
            if meta["world_size"] != self.comm.size:
                self.log(f"warning: checkpoint was written by {meta['world_size']} ranks, resuming on "
                         f"{self.comm.size}: the data order differs from the original run")
            self.log(f"resumed from {state['path']} at epoch {self.epoch} "
                     f"step {self.step_in_epoch} (global step {self.global_step})")
            self.truncate_metrics_after(self.global_step)
        elif self.comm.is_root:
            self.args.metrics.parent.mkdir(parents=True, exist_ok=True)
            self.args.metrics.write_text("")

    def sync_buffers(self):
        """Average BatchNorm statistics over ranks (each rank saw its own batches)."""
        for buf in self.model.named_buffers().values():
            buf[...] = self.xp.asarray(self.comm.allreduce_host(to_host(buf)) / self.comm.size)

    def save_checkpoint(self):
        self.sync_buffers()
        if not self.comm.is_root:
            return
        meta = {"model": self.model.describe(), "config": {k: str(v) for k, v in vars(self.args).items()},
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "seed": self.args.seed, "world_size": self.comm.size, "global_batch": self.global_batch,
                "sharding_id": self.train_data.attrs.get("sharding_id"), "class_names": self.class_names,
                "mean": float(self.train_data.attrs["mean"]), "std": float(self.train_data.attrs["std"]),
                "teacher": self.teacher_record}
        optim_state = {k: to_host(v) for k, v in self.opt.state_dict().items()}
        buffers = {k: to_host(v) for k, v in self.model.named_buffers().items()}
        path = ckpt.save(self.args.checkpoint_dir, self.global_step, to_host(self.model.params), optim_state,
                         buffers, meta, keep=self.args.keep)
        self.write_metrics({"kind": "checkpoint", "step": self.global_step, "path": str(path)})

    def write_metrics(self, record):
        if self.comm.is_root:
            with open(self.args.metrics, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def truncate_metrics_after(self, step):
        """On resume, drop what the interrupted run logged after its checkpoint (no duplicate steps)."""
        if not self.comm.is_root or not self.args.metrics.exists():
            return
        kept = [line for line in self.args.metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.args.metrics.write_text("".join(line + "\n" for line in kept))

    def check_replicas(self):
        digest = ckpt.params_digest(to_host(self.model.params))
        everyone = self.comm.allgather_obj(digest)
        if len(set(everyone)) != 1:
            raise RuntimeError(f"replicas diverged at step {self.global_step}: parameter digests "
                               + ", ".join(d[:12] for d in everyone))

    # ---- loop ------------------------------------------------------------
    def train_step(self, x, y, soft=None):
        """Forward, backward with bucketed allreduce, finiteness check, update.  Returns (loss, correct) on device."""
        model = self.model
        poison = self.args.inject_nan == (self.comm.rank, self.global_step)
        loss, correct = forward_backward_allreduce(model, self.loss_fn, self.reducer, x, y, self.global_step, poison,
                                                   self.teacher, soft)
        # The averaged gradient is bitwise identical on every rank, so this test agrees
        # everywhere without another collective: a NaN on any rank has spread to all.
        if not bool(self.xp.isfinite(model.grads).all()):
            if not self.args.skip_nonfinite:
                raise FloatingPointError(f"non-finite gradient at global step {self.global_step} "
                                         f"(epoch {self.epoch}); lower --lr or use --skip-nonfinite")
            self.skipped += 1
            self.log(f"warning: skipped the update of step {self.global_step}: non-finite gradient")
        else:
            self.opt.step(self.schedule(self.global_step))
        return loss, correct

    def run(self) -> int:
        args, comm = self.args, self.comm
        cpu = "" if self.backend.is_gpu else f" ({threads.count()} thread(s), BLAS {blas.current()})"
        self.log(f"ddp_cnn: {comm.size} rank(s), {self.backend.name}{cpu}, {np.dtype(self.backend.dtype).name}, "
                 f"comm={self.reducer.transport}, model={self.model.name} ({self.model.num_params:,} params), "
                 f"global batch {self.global_batch} ({self.local_batch}/rank), {self.steps_per_epoch} steps/epoch, "
                 f"{len(self.reducer.buckets)} gradient bucket(s)")
        if self.teacher_record is not None:
            self.log(f"distilling from {self.teacher_record['source']} ({self.teacher_record['describe']}): "
                     f"weight {args.distill_weight}, temperature {args.distill_temperature}"
                     + ("; its logits computed once per image (no augmentation)" if self.soft_targets is not None
                        else "; it runs on every (augmented) batch"))
        if self.global_step == 0:
            from .summary import format_summary
            self.log(format_summary(self.model))
            self.write_metrics({"kind": "start", "step": 0, "model": self.model.name, "params": self.model.num_params,
                                "world_size": comm.size, "device": self.backend.name, "comm": self.reducer.transport,
                                "global_batch": self.global_batch, "class_names": self.class_names,
                                "config": {k: str(v) for k, v in sorted(vars(args).items())}})
        try:
            while self.epoch < args.epochs:
                status = self.run_epoch()
                if status is not None:
                    return status
                if args.max_steps and self.global_step >= args.max_steps:
                    break
        except FloatingPointError as exc:  # raised on every rank at the same step
            if comm.is_root:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        finally:
            self.reducer.close()
        comm.barrier()  # nobody exits before rank 0's last checkpoint is on disk
        self.log(f"done: {self.global_step} steps; metrics in {args.metrics}")
        return 0

    def run_epoch(self):
        args, comm, xp = self.args, self.comm, self.xp
        loss_sum = xp.zeros((), np.float64)
        correct_sum = xp.zeros((), np.int64)
        seen = 0
        self.reducer.comm_seconds = self.reducer.exposed_seconds = 0.0
        bar = self.progress_bar()
        # The epoch's sample order, to look the cached soft targets up by row.
        order = self.train_loader.order(self.epoch) if self.soft_targets is not None else None
        t0 = time.perf_counter()
        for x, y in self.train_loader.epoch(self.epoch, start_step=self.step_in_epoch):
            maybe_fail(args.fail_at, comm.rank, self.global_step)
            soft = None
            if order is not None:  # the teacher's logits of the rows this batch holds
                soft = self.soft_targets[xp.asarray(self.train_loader.rows(order, self.step_in_epoch))]
            loss, correct = self.train_step(x, y, soft)
            loss_sum += loss.astype(np.float64) * y.shape[0]
            correct_sum += correct
            seen += y.shape[0]
            self.global_step += 1
            self.step_in_epoch += 1
            if bar is not None:
                bar.update(1)
                if self.step_in_epoch % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss):.4f}",
                                    img_s=f"{seen * comm.size / (time.perf_counter() - t0):.0f}")
            if args.log_every and self.global_step % args.log_every == 0:
                mean_loss = comm.allreduce_scalar(float(loss), "sum") / comm.size
                self.write_metrics({"kind": "step", "step": self.global_step, "epoch": self.epoch,
                                    "loss": mean_loss, "lr": self.schedule(self.global_step - 1)})
            if args.check_replicas and self.global_step % args.check_replicas == 0:
                self.check_replicas()
            if args.checkpoint_every and self.global_step % args.checkpoint_every == 0:
                self.save_checkpoint()
            # Every rank learns whether any rank was signalled, at the same step.
            if comm.allreduce_scalar(int(self.stop.requested), "max"):
                self.save_checkpoint()
                comm.barrier()
                self.log(f"stopped by a signal at global step {self.global_step}; checkpoint written; "
                         "continue with --resume latest")
                return EXIT_PREEMPTED
            if args.max_steps and self.global_step >= args.max_steps:
                break
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        epoch_done = self.step_in_epoch >= self.steps_per_epoch
        totals = comm.allreduce_host(np.array([float(to_host(loss_sum)), float(to_host(correct_sum)), seen]))
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, "complete": epoch_done,
                  "train_loss": totals[0] / max(totals[2], 1), "train_acc": totals[1] / max(totals[2], 1),
                  "images_per_s": totals[2] / elapsed if elapsed > 0 else 0.0, "seconds": elapsed,
                  "comm_seconds": self.reducer.comm_seconds, "comm_exposed_seconds": self.reducer.exposed_seconds,
                  "compute_seconds": elapsed - self.reducer.exposed_seconds, "lr": self.schedule(self.global_step - 1),
                  "skipped_steps": self.skipped}
        if args.eval_every and self.test_loader is not None and (
                (self.epoch + 1) % args.eval_every == 0 or self.epoch + 1 == args.epochs):
            self.sync_buffers()
            with self.opt.averaged_weights():  # --ema: the average is the model
                result = evaluate(self.model, self.test_loader, comm, len(self.class_names))
            record.update(test_loss=result["loss"], test_acc=result["accuracy"], test_count=result["count"],
                          confusion=result["confusion"].tolist())
        if epoch_done:
            self.epoch += 1
            self.step_in_epoch = 0
        self.write_metrics(record)
        self.log(f"epoch {record['epoch'] + 1}/{args.epochs}: train loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc'] * 100:.2f}%"
                 + (f", test loss {record['test_loss']:.4f} acc {record['test_acc'] * 100:.2f}%"
                    if "test_acc" in record else "")
                 + f", {record['images_per_s']:.0f} img/s, comm {record['comm_seconds']:.2f}s "
                   f"(exposed {record['comm_exposed_seconds']:.2f}s) of {elapsed:.2f}s")
        self.save_checkpoint()
        return None

    def progress_bar(self):
        if not self.comm.is_root:
            return None
        show = self.args.progress == "on" or (self.args.progress == "auto" and sys.stderr.isatty())
        if not show:
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}",
                    unit="step", leave=False, dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())

"""One typed configuration for a training run: what ``python -m ddp_cnn.train`` parses and
what :class:`ddp_cnn.Trainer` reads.  The command line's defaults are these."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    # data
    data: str = "data/fashion-mnist"
    slice_data: bool = False
    data_order: str = "shard"        # shard: each rank shuffles its own rows; global: one order for every rank count
    data_cache_mb: float | None = None  # chunk cache per rank when streaming; None: sized for the machine
    shuffle_window: int = 16         # chunks whose rows are shuffled together when streaming (0: all)
    data_in_memory: bool = False     # read a rank's rows whole at start (full shuffle) instead of streaming
    val_fraction: float = 0.0        # held out of the training rows for validation when there is no val.h5
    augment_shift: int = 0
    hflip: bool = False
    erase: float = 0.0
    # model (the command line builds it from these; a library user passes a built model)
    model: str | None = None         # a name or FILE.toml; the CLI's None: lenet, or with --resume the checkpoint's
    dropout: bool = True
    dropout_rate: float | None = None
    batchnorm: bool = False
    sync_bn: bool = False            # batch statistics over the global batch (allreduced), not each rank's
    width: int | None = None
    activation: str | None = None
    dtype: str = "float32"
    label_smoothing: float = 0.0
    teacher: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    # optimisation
    epochs: int = 2
    max_steps: int = 0
    batch_size: int = 128
    local_batch_size: int | None = None
    accumulate: int = 1              # micro-batches per optimizer step (one allreduce per step)
    optimizer: str = "adam"
    lr: float = 1e-3
    scale_lr: bool = False
    lr_base_batch: int = 256
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float | None = None
    rho: float = 0.9
    weight_decay: float | None = None  # None: the optimizer's default (0.01 for adamw, 0 otherwise)
    l2: float = 0.0
    ema: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    step_epochs: float = 10.0
    gamma: float = 0.1
    min_lr: float = 0.0
    skip_nonfinite: bool = False
    # system
    seed: int = 0
    device: str = "auto"
    comm: str = "auto"
    bucket_mb: float = 4.0
    collective_timeout: float = 600.0
    on_rank_loss: str = "auto"       # shrink (ULFM: the survivors go on) | restart (the supervisor) | auto
    min_ranks: int = 1               # fewer survivors after a shrink: checkpoint, exit for the supervisor
    check_replicas: int = 0
    fail_at: tuple | None = None     # testing: (rank, step) that raises
    inject_nan: tuple | None = None  # testing: (rank, step) whose gradient turns NaN
    # output
    run_dir: str | None = None       # default runs/MODEL
    metrics: str | None = None       # default RUN_DIR/metrics.jsonl
    checkpoint_dir: str | None = None  # default RUN_DIR/checkpoints
    checkpoint_every: int = 0
    checkpoint_every_seconds: float = 0.0  # also checkpoint when rank 0's clock says this much time has passed
    keep: int = 3
    resume: str | None = None        # a checkpoint file, "latest" or "auto" (see --resume)
    eval_every: int = 1
    eval_batch_size: int = 1000
    log_every: int = 0
    progress: str = "auto"           # auto | bar | lines | off (ddp_cnn.run.progress)
    overwrite: bool = False          # replace the run already in run_dir
    trace: str | None = None         # a Chrome trace-event timeline of every rank's steps (ddp_cnn.system.trace)
    config: str | None = None        # the TOML recipe these settings came from (train --config)

    # Settings that may differ between ranks without changing what is computed.
    LOCAL_ONLY = ("fail_at", "inject_nan", "progress", "data_cache_mb")

    def record(self) -> dict:
        """Every setting, sorted, as JSON values (metrics, checkpoints, the ranks' identity check)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(asdict(self).items())}


def batch_sizes(cfg: TrainConfig, rank: int, size: int) -> tuple[int, int]:
    """(global batch, this rank's batch); ValueError (one line) for sizes that cannot work.

    ``--local-batch-size`` fixes each rank's; otherwise ``--batch-size`` is the
    global batch, split evenly (it must divide) or, in the global data order,
    as rows [r*G//N, (r+1)*G//N) of each batch (shares differ by at most one)."""
    if cfg.local_batch_size:
        global_batch, local = cfg.local_batch_size * size, cfg.local_batch_size
    elif cfg.data_order == "global":
        if cfg.batch_size < size:
            raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {size} ranks")
        global_batch, local = cfg.batch_size, (rank + 1) * cfg.batch_size // size - rank * cfg.batch_size // size
    elif cfg.batch_size % size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {size} ranks; "
                         f"use a multiple of {size}, --local-batch-size or --data-order global")
    else:
        global_batch, local = cfg.batch_size, cfg.batch_size // size
    if local < cfg.accumulate:
        raise ValueError(f"--accumulate {cfg.accumulate}: more micro-batches than the {local} images of "
                         f"rank {rank}'s batch")
    return global_batch, local


def batch_shares(global_batch: int, ranks: int) -> str:
    """Images per rank: "32", or "42-43" where the global order cuts the batch unevenly."""
    low, high = global_batch // ranks, -(-global_batch // ranks)
    return str(low) if low == high else f"{low}-{high}"

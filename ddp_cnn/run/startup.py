"""A run's start-up checks, each one local (the Trainer has every rank agree on it, so that a mistake stops
every rank at once with one line) and one line when the disk fills: plain functions of what they check."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ddp_cnn.dist.agree import require_same
from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.run import rundir
from ddp_cnn.run.config import TrainConfig
from ddp_cnn.system import memory


def prepare_run_dir(world, config, run_dir: Path, checkpoint_dir: Path, metrics_path: Path) -> None:
    """Rank 0: the run dir refused when it holds another run (unless resuming or overwriting), the trace's
    folder writable."""
    if not world.is_root:
        return
    trace = config.trace
    if trace:
        if Path(trace).is_dir():
            raise ValueError(f"--trace {trace}: is a folder; give the trace's file name")
        try:
            rundir.check_writable(Path(trace).parent)
        except ValueError as exc:
            raise ValueError(f"--trace {trace}: {exc}") from None
    if config.resume == "latest":
        rundir.check_resumable(run_dir, checkpoint_dir, bool(config.checkpoint_dir))
    rundir.prepare(metrics_path, checkpoint_dir, run_dir, resume=bool(config.resume), overwrite=config.overwrite)


def lock_run_dir(world, lock, checkpoint_dir: Path, log) -> None:
    """Rank 0: this job's lock on the run dir, and the temporary files of dead checkpoint writers removed."""
    if world.is_root:
        lock.acquire(warn=log)
        for path in rundir.remove_dead_temps(checkpoint_dir):
            log(f"removed {path}: the temporary file of a checkpoint writer that died")


def micro_batch(config, local_batch: int, global_batch: int, world_size: int):
    """(images per rank in one forward, the flags that made it: None for --local-batch-size)."""
    smallest = local_batch // config.accumulate  # the smallest micro-batch
    return smallest, (f"--accumulate {config.accumulate} of {local_batch} images per rank: micro-batches of "
                      f"{smallest}" if config.accumulate > 1 else None if config.local_batch_size
                      else f"--batch-size {global_batch} on {world_size} rank(s): {smallest} per rank")


def check_batch_memory(model, smallest: int, setting: str | None) -> None:
    """TooLarge (one line) when one batch's activations cannot fit: before the first step allocates them."""
    memory.check_batch(model.name, model.layers, model.backend, smallest, setting or f"--local-batch-size {smallest}")


def check_same_everywhere(world, config, model, distiller, train_data) -> None:
    """Collective: SetupError on every rank when the ranks disagree on what they are about to train."""
    cfg = {k: v for k, v in config.record().items() if k not in TrainConfig.LOCAL_ONLY}
    ident = {"model": _sha(model.describe()), "num_params": model.num_params,
             "teacher": distiller.digest if distiller else None,
             "dataset": train_data.attrs.get("sharding_id"), "config": _sha(cfg)}
    require_same(world, ident, {
        "model": "model architecture", "num_params": "parameter count",
        "teacher": "--teacher weights (a run folder that resolved to different checkpoints?)",
        "dataset": "dataset (sharding_id of the shards: shards from different sharding runs?)",
        "config": "training configuration (flags or code)"})


def disk_full_message(exc, global_step: int, checkpoint_dir: Path) -> str:
    """Rank 0: one line naming what could not be written, the checkpoint that survives, the way on."""
    newest = None
    for path in reversed(ckpt.list_checkpoints(checkpoint_dir)):
        try:
            ckpt.verify(path)
            newest = path
            break
        except ckpt.CheckpointError:
            continue
    kept = (f"the earlier checkpoints are intact (newest: {newest})" if newest is not None
            else "no checkpoint was written before it")
    return (f"error: global step {global_step}: {exc}; nothing half-written is left, {kept}; free space "
            f"there (or move the run dir), then run the same command with --resume latest")


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

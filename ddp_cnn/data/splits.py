"""A training run's three splits: the rows each rank trains on, validates on (model selection,
every epoch) and tests on (once, at the end).

Validation comes from the data folder's ``val.h5`` (``data_tools.shard
--val-fraction``) or, when there is none, from ``--val-fraction`` of the
training rows held out at load time.  The held-out rows are chosen by a
fixed hash of each row's index in its source file, so they are the same
images whatever the number of ranks, the sharding or the seed.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ddp_cnn.data.loader import open_rank_data
from ddp_cnn.data.order import take
from ddp_cnn.data.pixels import channel_stats
from ddp_cnn.data.shards import DataError, ShardData


def holdout_mask(source_index: np.ndarray, fraction: float) -> np.ndarray:
    """True for the rows held out for validation: splitmix64(index) / 2**64 < fraction."""
    z = np.asarray(source_index, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def hold_out(data: ShardData, fraction: float, part: tuple[int, int] | None = None) -> tuple[ShardData, ShardData]:
    """(train, val): ``data`` without and with its held-out rows (:func:`holdout_mask`).

    ``part`` (rank, size): ``data`` is every rank's (the global order), so
    the validation rows are cut by rank, each scored on exactly one.
    """
    if data.source_index is None:
        raise DataError(f"{data.paths[0]}: no source_index to hold validation rows out by; re-shard")
    held = val = holdout_mask(data.source_index, fraction)
    if part is not None:
        rank, size = part
        val = np.flatnonzero(held)
        val = val[rank * len(val) // size:(rank + 1) * len(val) // size]

    def rows(picked):
        return replace(data, images=take(data.images, picked), labels=data.labels[picked],
                       source_index=data.source_index[picked])
    return rows(~held), rows(val)


def open_data(config, comm) -> tuple[ShardData, ShardData | None, ShardData | None]:
    """Collective: this rank's (train, val, test) rows of the ``config.data`` folder (a TrainConfig);
    val and test are None without evaluation (``eval_every`` 0), val also without a validation split.

    Problems raise :class:`ddp_cnn.dist.agree.SetupError` on every rank at once.
    """
    from ddp_cnn.dist.agree import SetupError, agreed
    folder = Path(config.data)
    # Rank 0 looks, every rank follows: node-local copies of the data must not send ranks down different paths.
    has_val = comm.bcast_obj((folder / "val.h5").exists() if comm.is_root else None)

    def check():
        if not folder.is_dir():
            raise ValueError(f"--data {config.data}: no such folder; make it with "
                             f"`python -m data_tools.shard --out {config.data} --shards {comm.size}`")
        if config.val_fraction and has_val:
            raise ValueError(f"--val-fraction: {folder} has a validation split already (val.h5); drop the flag")
    agreed(comm, check)
    stream = {"stream": not config.data_in_memory, "cache": None if config.data_in_memory else chunk_cache(config, comm)}
    train = agreed(comm, lambda: open_rank_data(folder, "train", comm, slice_single=config.slice_data,
                                                data_order=config.data_order, **stream))
    agree_on_attributes(train, comm)
    val = None
    if config.val_fraction:  # held out whether or not it is scored: the training rows never depend on it
        part = (comm.rank, comm.size) if config.data_order == "global" else None
        train, val = agreed(comm, lambda: hold_out(train, config.val_fraction, part))
    if not config.eval_every:
        return train, None, None
    if has_val:
        val = agreed(comm, lambda: open_rank_data(folder, "val", comm, **stream))
    test = agreed(comm, lambda: open_rank_data(folder, "test", comm, **stream))
    for name, split in (("validation", val), ("test", test)):
        if split is not None and not comm.allreduce_scalar(len(split), "sum"):
            raise SetupError(f"--data {config.data}: the {name} split has no rows"
                             + (f" (--val-fraction {config.val_fraction} is too small)" if name == "validation"
                                and config.val_fraction else ""))
    return train, val, test


def chunk_cache(config, comm):
    """The one chunk cache of this rank's splits: --data-cache-mb, else sized for the machine."""
    from ddp_cnn.data.stream import ChunkCache, default_cache_mb
    mb = config.data_cache_mb or default_cache_mb(getattr(comm, "local_size", 1))
    cache = ChunkCache(mb * 2**20)
    cache.origin = "--data-cache-mb" if config.data_cache_mb else "default: 1/8 of the memory available, per rank"
    return cache


def agree_on_attributes(train: ShardData, comm) -> None:
    """Collective: SetupError on every rank unless every rank's shards carry the same, usable pixel
    mean/std and class names (a rank that normalised differently would train another problem)."""
    from ddp_cnn.dist.agree import SetupError, agreed, require_same
    first = train.paths[0] if train.paths else "the training shards"
    attrs = train.attrs

    def usable():  # one mean/std per channel (old files: one number)
        try:
            return channel_stats(attrs.get("mean", np.nan), attrs.get("std", 0.0))
        except (DataError, TypeError) as exc:
            raise DataError(f"{first}: {exc} (re-shard)") from None
    mean, std = agreed(comm, usable)
    try:
        require_same(comm, {"mean": mean.tolist(), "std": std.tolist(),
                            "classes": list(attrs.get("class_names") or [])},
                     {"mean": "training pixel mean of their shards (files of different sharding runs?)",
                      "std": "training pixel std of their shards (files of different sharding runs?)",
                      "classes": "class names of their shards"})
    except SetupError as exc:
        raise SetupError(f"{first}: {exc}") from None


def class_names_of(data) -> list[str]:
    """The class names stored with the shards (digits 0-9 when there are none)."""
    return list(data.attrs.get("class_names") or [str(i) for i in range(10)])

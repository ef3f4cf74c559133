"""The shard files of ``python -m data_tools.shard`` (format in ``data_tools/h5format.py``): which ones a
directory holds, which rows a rank reads, and reading them (every mistake a :class:`DataError` naming the file)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.errors import DataError

# data_tools.h5format (and with it h5py) is imported where shards are read, not here.

__all__ = ["DataError", "ShardData", "find_shards", "slice_rows", "plan_reads", "read_planned"]


# ---------------------------------------------------------------- opening a rank's rows

@dataclass
class ShardData:
    """The rows one rank trains or evaluates on, in host memory."""

    images: np.ndarray  # uint8 (n, H, W, C) (the reader gives 4-D; (n, H, W) is taken as C = 1)
    labels: np.ndarray  # int64 (n,)
    attrs: dict  # decoded attributes of the first file read (mean, std, class_names, sharding_id, ...)
    paths: list[Path] = field(default_factory=list)
    source_index: np.ndarray | None = None  # row of each sample in its source IDX file

    def __len__(self) -> int:
        return len(self.labels)


def find_shards(data_dir) -> list[Path]:
    """Sorted training shard paths of ``data_dir``; DataError if there are none or the set is incomplete."""
    from data_tools import h5format
    return h5format.list_shards(Path(data_dir))


def _row_counts(paths: list[Path]) -> list[int]:
    from data_tools import h5format
    return [h5format.num_rows(p) for p in paths]


def slice_rows(counts: list[int], rank: int, size: int) -> list[tuple[int, int, int]]:
    """(file number, start, stop) hyperslabs giving ``rank`` its contiguous share of the concatenated files.

    Rank r gets global rows [r*n//size, (r+1)*n//size): every row on exactly one rank.
    """
    total = sum(counts)
    lo, hi = rank * total // size, (rank + 1) * total // size
    out, offset = [], 0
    for i, n in enumerate(counts):
        start, stop = max(lo - offset, 0), min(hi - offset, n)
        if start < stop:
            out.append((i, start, stop))
        offset += n
    return out


def plan_reads(data_dir: Path, split: str, rank: int, size: int, slice_single: bool):
    """[(path, start, stop)] this rank must read; start/stop None means the whole file."""
    from data_tools import h5format
    if split in ("test", "val"):
        path = data_dir / h5format.split_name(split)
        if split == "val" and not path.exists():
            raise DataError(f"{path}: no validation file; shard with --val-fraction to make one")
        return [(path, *rows) for _, *rows in slice_rows(_row_counts([path]), rank, size)] or [(path, 0, 0)]
    if split != "train":
        raise DataError(f"split must be train, test or val, got {split!r}")
    shards = find_shards(data_dir)
    m = len(shards)
    if slice_single:
        # Treat all shards as one array and cut it by rank: any shard count works.
        return [(shards[i], a, b) for i, a, b in slice_rows(_row_counts(shards), rank, size)] or [(shards[0], 0, 0)]
    if m % size == 0:
        return [(shards[i], None, None) for i in range(rank, m, size)]
    fix = f"re-shard with --shards {size} (or a multiple of it), or slice the shards by rank (--slice-data)"
    if m < size:
        raise DataError(f"{data_dir}: {m} training shards for {size} ranks, fewer shards than ranks: {fix}")
    raise DataError(f"{data_dir}: {m} training shards cannot be shared evenly by {size} ranks: {fix}")


def read_planned(reads) -> ShardData:
    """Read the hyperslabs, check they come from one sharding run, and concatenate them."""
    from data_tools import h5format
    parts = [h5format.read_rows(path, start, stop) for path, start, stop in reads]
    first = parts[0][3]
    for (path, *_), (*_, attrs) in zip(reads, parts):
        if attrs["sharding_id"] != first["sharding_id"] or attrs["image_shape"] != first["image_shape"]:
            raise DataError(f"{path}: from another sharding run than {reads[0][0]} (sharding_id differs)")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    if len(labels) and labels.max() >= len(first["class_names"]):
        raise DataError(f"{reads[0][0]}: label {labels.max()} but only {len(first['class_names'])} class names")
    return ShardData(images, labels, first, [p for p, *_ in reads], np.concatenate([p[2] for p in parts]))

"""The HDF5 file format shared by the sharding tool, ``verify`` and the trainer's reader.

Every file (train shard, ``test.h5``, ``val.h5``) holds:

* ``images`` uint8 (n, H, W, C), in chunks of about :data:`CHUNK_BYTES`
  (the unit the trainer streams), gzip-compressed unless the sharding run
  chose lzf or none (C = 1 for grayscale; format version 1 stored (n, H, W),
  read as C = 1);
* ``labels`` uint8 (n,);
* ``source_index`` int64 (n,): each sample's row in its source IDX file, so
  disjointness and coverage can be checked without the source;
* the attributes in :data:`REQUIRED_ATTRS` (lists and dicts as JSON strings);
  ``mean`` and ``std`` hold one value per channel (version 1: one float).

Reading goes through :func:`open_checked`, which turns h5py's OSError for a
corrupt or truncated file into a :class:`DataError` naming the file.  Files
are read as version 2 whatever their version: images (n, H, W, C),
``image_shape`` (H, W, C), ``mean``/``std`` tuples of C floats.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np

from data_tools.errors import DataError

FORMAT_VERSION = 2  # 2: images (n, H, W, C) and per-channel mean/std; 1: (n, H, W) and scalars
READABLE_VERSIONS = (1, 2)
SHARD_GLOB = "train-*-of-*.h5"
SHARD_RE = re.compile(r"^train-(\d{5})-of-(\d{5})\.h5$")
TEST_NAME, VAL_NAME, MANIFEST_NAME = "test.h5", "val.h5", "manifest.json"
SPLITS = ("train", "test", "val")

REQUIRED_ATTRS = (
    "format_version", "dataset", "class_names", "split", "shard_index", "shard_count",
    "num_train_total", "num_val_total", "num_test_total", "source_sha256",
    "mean", "std", "seed", "stratified", "sharding_id", "image_shape",
)
_JSON_ATTRS = ("class_names", "source_sha256")
DATASETS = {"images": 4, "labels": 1, "source_index": 1}  # name -> ndim (version 1 images: 3)
_DTYPES = {"images": np.uint8, "labels": np.uint8, "source_index": np.int64}
CHUNK_BYTES = 512 * 28 * 28  # ~400 KB of images a chunk: small enough that a rank's hyperslab reads little extra


def shard_name(index: int, count: int) -> str:
    return f"train-{index:05d}-of-{count:05d}.h5"


def split_name(split: str) -> str:
    return {"test": TEST_NAME, "val": VAL_NAME}[split]


COMPRESSIONS = ("gzip", "lzf", "none")
WRITE_BYTES = 2 * 2**20  # images written per block: a file far larger than memory is written in pieces


def chunk_rows(image_shape, n: int) -> int:
    """Rows per HDF5 chunk: about CHUNK_BYTES of images, the unit the trainer's streaming reader reads."""
    return max(1, min(n, CHUNK_BYTES // max(1, int(np.prod(image_shape)))))


def write_split(path: Path, images, labels: np.ndarray, source_index: np.ndarray, attrs: dict,
                compression: str = "gzip", progress=None) -> None:
    """Write one file of the format: ``images`` (n, H, W, C) uint8, an array or anything that gives rows by
    slices (read and written a block at a time); ``attrs`` values may be lists/dicts (class_names and
    source_sha256 stored as JSON, mean/std as float arrays).  ``progress(rows)`` is told of each block."""
    n, shape = len(labels), tuple(images.shape[1:])
    rows = chunk_rows(shape, n)
    # gzip level 1: uint8 images compress within 2% of level 4 at twice the speed.
    opts = {"gzip": dict(compression="gzip", compression_opts=1), "lzf": dict(compression="lzf"),
            "none": {}}[compression]
    with h5py.File(path, "w") as f:
        if n == 0:
            f.create_dataset("images", data=np.zeros((0, *shape), np.uint8), chunks=(rows, *shape), **opts)
        else:
            ds = f.create_dataset("images", shape=(n, *shape), dtype=np.uint8, chunks=(rows, *shape), **opts)
            block = rows * max(1, WRITE_BYTES // (rows * max(1, int(np.prod(shape)))))  # whole chunks
            for start in range(0, n, block):
                ds[start:start + block] = images[start:start + block]
                if progress is not None:
                    progress(min(block, n - start))
        f.create_dataset("labels", data=labels.astype(np.uint8), chunks=(rows,), **opts)
        f.create_dataset("source_index", data=source_index.astype(np.int64), chunks=(rows,), **opts)
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if key in _JSON_ATTRS else value


def decode_attrs(raw) -> dict:
    """Attributes as plain Python values: JSON decoded, numpy scalars unwrapped, image_shape a tuple,
    mean and std tuples of floats (one per channel; a version-1 scalar gives one)."""
    out = {}
    for key, value in raw.items():
        if key in _JSON_ATTRS:
            value = json.loads(value)
        elif key == "image_shape":
            value = tuple(int(v) for v in np.asarray(value).ravel())
        elif key in ("mean", "std"):
            value = tuple(float(v) for v in np.asarray(value, dtype=np.float64).ravel())
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def open_checked(path: Path) -> h5py.File:
    """Open read-only; DataError naming the file if it is missing or not a readable HDF5 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (corrupt or truncated?): {exc}") from None


def check_structure(path: Path, f: h5py.File) -> dict:
    """Validate datasets and attributes of an open file; return the decoded attributes."""
    try:
        return _check_structure(path, f)
    except (OSError, KeyError, RuntimeError) as exc:
        # h5py reports damaged metadata lazily, as any of these, when an object is touched.
        raise DataError(f"{path}: damaged HDF5 file: {exc}") from None


def _check_structure(path: Path, f: h5py.File) -> dict:
    version = f.attrs.get("format_version")  # None: reported below with the other missing attributes
    if version is not None and version not in READABLE_VERSIONS:
        raise DataError(f"{path}: format_version {version}, this code reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    for name, ndim in DATASETS.items():
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise DataError(f"{path}: missing dataset '{name}'")
        ds = f[name]
        if name == "images" and (version == 1 or (version is None and ds.ndim == 3)):
            ndim = 3
        if ds.dtype != _DTYPES[name] or ds.ndim != ndim:
            raise DataError(f"{path}: dataset '{name}' is {ds.dtype} with {ds.ndim} dims, "
                            f"expected {np.dtype(_DTYPES[name])} with {ndim}")
    n = len(f["images"])
    if len(f["labels"]) != n or len(f["source_index"]) != n:
        raise DataError(f"{path}: images, labels and source_index lengths differ "
                        f"({n}, {len(f['labels'])}, {len(f['source_index'])})")
    missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
    if missing:
        raise DataError(f"{path}: missing attributes {', '.join(missing)}")
    try:
        attrs = decode_attrs(f.attrs)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: unreadable attributes ({exc})") from None
    if tuple(f["images"].shape[1:]) != attrs["image_shape"]:
        raise DataError(f"{path}: images are {f['images'].shape[1:]} but image_shape says {attrs['image_shape']}")
    if attrs["split"] not in SPLITS:
        raise DataError(f"{path}: split '{attrs['split']}', expected one of {', '.join(SPLITS)}")
    channels = attrs["image_shape"][2] if len(attrs["image_shape"]) == 3 else 1
    if len(attrs["mean"]) != channels or len(attrs["std"]) != channels:
        raise DataError(f"{path}: mean/std hold {len(attrs['mean'])}/{len(attrs['std'])} values for "
                        f"{channels} channels")
    if len(attrs["image_shape"]) == 2:  # version 1: grayscale without a channel axis
        attrs["image_shape"] += (1,)
    return attrs


def read_rows(path: Path, start: int | None = None, stop: int | None = None):
    """(images, labels, source_index, attrs) of rows [start, stop): a hyperslab, only those rows are read.

    Raises DataError naming the file on any structural problem or read error
    (a chunk that fails to decompress in a damaged file is an OSError in h5py).
    """
    with open_checked(path) as f:
        attrs = check_structure(path, f)
        rows = slice(start, stop)
        try:
            images = f["images"][rows]
            if images.ndim == 3:  # version 1
                images = images[..., None]
            labels = f["labels"][rows]
            source_index = f["source_index"][rows]
        except OSError as exc:
            rows = "its rows" if start is None and stop is None else f"rows {start}:{stop}"
            raise DataError(f"{path}: cannot read {rows} (corrupt file?): {exc}") from None
    return images, labels, source_index, attrs


def num_rows(path: Path) -> int:
    """Sample count of a file, validating its structure (cheap: no data read)."""
    with open_checked(path) as f:
        check_structure(path, f)
        return len(f["images"])


def list_shards(folder: Path) -> list[Path]:
    """Sorted training shard paths of ``folder``; DataError unless they are exactly 0..N-1 of one N."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found = {}
    for path in folder.glob(SHARD_GLOB):
        m = SHARD_RE.match(path.name)
        if m:
            found[path] = (int(m.group(1)), int(m.group(2)))
    if not found:
        raise DataError(f"{folder}: no training shards ({SHARD_GLOB}); make them with python -m data_tools.shard")
    counts = sorted({n for _, n in found.values()})
    if len(counts) > 1:
        raise DataError(f"{folder}: shards of different runs mixed (of {', '.join(map(str, counts))}); "
                        "re-shard into an empty folder")
    count = counts[0]
    have = {i for i, _ in found.values()}
    missing = [shard_name(i, count) for i in range(count) if i not in have]
    if missing:
        raise DataError(f"{folder}: {count - len(missing)} of {count} training shards present, "
                        f"missing {', '.join(missing[:3])}")
    if len(have) != count:
        raise DataError(f"{folder}: shard index out of range in names of {count} shards")
    return sorted(found, key=lambda p: found[p][0])

"""Reading IDX files (the MNIST format), gzipped or raw, with every check a user's bad file needs.

IDX layout: two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, then one big-endian uint32 per dimension, then the data in C order.
Only unsigned-byte files are accepted: images and labels of MNIST-style sets
are uint8, and anything else here means the wrong file was given.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08
TYPE_NAMES = {0x08: "ubyte", 0x09: "byte", 0x0B: "short", 0x0C: "int", 0x0D: "float", 0x0E: "double"}

# The four roles of an MNIST-style folder and the file names that fill them.
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_STEMS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte", "test-images-idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte", "test-labels-idx1-ubyte"),
}


@dataclass
class IdxArray:
    """One IDX file's contents plus the hash of the file as it lies on disk."""

    path: Path
    array: np.ndarray
    sha256: str  # of the file's bytes (gzipped or not): what `sha256sum` prints
    raw_sha256: str  # of the decompressed IDX bytes: the same for a re-gzipped copy


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected an IDX file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def decompress(path: Path, blob: bytes) -> bytes:
    """The IDX bytes of a file that may be gzipped (recognised by its magic, not its name)."""
    if not blob.startswith(GZIP_MAGIC):
        return blob
    try:
        return gzip.decompress(blob)
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (ends before the end of the compressed stream)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None


def parse_idx(path: Path, data: bytes) -> np.ndarray:
    """Validate the IDX header and size and return a read-only uint8 view of the data."""
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: bad magic number 0x{data[:4].hex()}, expected 0x0000 then type and rank (IDX file)")
    code, ndim = data[2], data[3]
    if code != UBYTE:
        kind = TYPE_NAMES.get(code, f"unknown type 0x{code:02x}")
        raise DataError(f"{path}: IDX element type is {kind}, expected ubyte (0x08)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions but the file is too short for them")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: shape {shape} needs {expected} bytes, file holds {len(data)}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx(path: Path) -> IdxArray:
    """Read one IDX file (raw or gzipped); DataError naming the file on anything wrong."""
    path = Path(path)
    blob = read_bytes(path)
    data = decompress(path, blob)
    array = parse_idx(path, data)
    return IdxArray(path, array, hashlib.sha256(blob).hexdigest(), hashlib.sha256(data).hexdigest())


def read_pair(images_path: Path, labels_path: Path) -> tuple[IdxArray, IdxArray]:
    """Images (n, H, W) and labels (n,) that belong together, or DataError saying which disagree."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.array.ndim != 3 or 0 in images.array.shape:
        raise DataError(f"{images_path}: images must have 3 non-empty dimensions (n, H, W), got shape {images.array.shape}")
    if labels.array.ndim != 1:
        raise DataError(f"{labels_path}: labels must have 1 dimension (n,), got shape {labels.array.shape}")
    if len(images.array) != len(labels.array):
        raise DataError(f"{images_path} holds {len(images.array)} images but {labels_path} holds "
                        f"{len(labels.array)} labels; the counts must agree")
    return images, labels


def find_in_folder(folder: Path) -> dict[str, Path]:
    """The four MNIST-style files in ``folder`` (``.gz`` preferred when both forms are there)."""
    folder = Path(folder)
    if folder.is_file():
        raise DataError(f"{folder}: expected a folder of IDX files (give single files with --train-images etc.)")
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found = {}
    for role in ROLES:
        candidates = [folder / f"{stem}{ext}" for ext in (".gz", "") for stem in _STEMS[role]]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise DataError(f"{folder}: missing {_STEMS[role][0]}.gz (or its raw form) for {role.replace('_', ' ')}")
        found[role] = hit
    return found

"""``python -m data_tools.shard``: IDX image/label files -> N HDF5 training shards + test (+ val) file.

    python -m data_tools.shard --out data/fmnist --shards 4 --stratify
    python -m data_tools.shard path/to/mnist-folder --out data/mnist --shards 8 --val-fraction 0.1
    python -m data_tools.shard --download mnist --out data/mnist --shards 2

The training set is permuted once with ``--seed``, a validation set is carved
off the front of the permutation, and the rest is split into ``--shards``
parts (with ``--stratify``, each class is dealt round-robin so every shard
holds the same class balance).  All files appear together or not at all.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from data_tools import datasets, download, h5format, idx
from data_tools.atomic import AtomicOutput, check_output_folder
from data_tools.errors import DataError, run_cli


@dataclass
class Source:
    """The four IDX arrays, checked against each other, with what the attributes need."""

    name: str
    class_names: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    sha256: dict[str, str]  # file name -> sha256 of the file as given


# ---------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data_tools.shard", description=__doc__.split("\n")[0])
    p.add_argument("source", nargs="?", type=Path,
                   help=f"folder with the four MNIST-style IDX files, .gz or raw (default {datasets.DEBIAN_FASHION_MNIST})")
    for role in idx.ROLES:
        p.add_argument("--" + role.replace("_", "-"), type=Path, metavar="FILE",
                       help=f"explicit {role.replace('_', ' ')} IDX file (overrides the folder's)")
    p.add_argument("--download", metavar="NAME", help=f"fetch a known data set ({', '.join(sorted(datasets.KNOWN))})")
    p.add_argument("--mirror", metavar="URL", help="with --download: base URL instead of the canonical mirrors")
    p.add_argument("--cache", type=Path, metavar="DIR", help="with --download: where the files are kept")
    p.add_argument("--dataset", help="name stored in the files (default: recognised from content, else the folder name)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--shards", type=int, required=True, help="number of training shards (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation (default 0)")
    p.add_argument("--stratify", action="store_true", help="same class balance in every shard (and in val)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="part of the training set kept as val.h5")
    p.add_argument("--force", action="store_true", help="replace outputs already in --out")
    return p


def check_numbers(args) -> None:
    if args.shards < 1:
        raise DataError(f"--shards must be at least 1, got {args.shards}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.seed < 0:
        raise DataError(f"--seed must be >= 0, got {args.seed}")


def resolve_paths(args) -> dict[str, Path]:
    """Role -> IDX path from --download, explicit flags, a folder, or Debian's default folder."""
    explicit = {role: getattr(args, role) for role in idx.ROLES if getattr(args, role) is not None}
    if args.download:
        if args.source or explicit:
            raise DataError("--download: give either --download or source files, not both")
        return download.fetch(args.download, args.cache, args.mirror)
    if args.mirror or args.cache:
        raise DataError("--mirror and --cache only make sense with --download")
    if args.source is not None:
        return {**idx.find_in_folder(args.source), **explicit}
    if explicit:
        missing = [r for r in idx.ROLES if r not in explicit]
        if missing:
            raise DataError(f"--{missing[0].replace('_', '-')}: missing (give all four files, or a folder)")
        return explicit
    default = Path(datasets.DEBIAN_FASHION_MNIST)
    if not default.is_dir():
        raise DataError(f"no source given and {default} does not exist: {datasets.DEBIAN_HINT}")
    return idx.find_in_folder(default)


def load_source(paths: dict[str, Path], name: str | None) -> Source:
    """Read and cross-check the four files; recognise a known data set by its content."""
    train_x, train_y = idx.read_pair(paths["train_images"], paths["train_labels"])
    test_x, test_y = idx.read_pair(paths["test_images"], paths["test_labels"])
    if train_x.array.shape[1:] != test_x.array.shape[1:]:
        raise DataError(f"{test_x.path}: images are {test_x.array.shape[1:]} but training images "
                        f"in {train_x.path} are {train_x.array.shape[1:]}")
    known = datasets.identify(train_x.sha256, train_x.raw_sha256) or datasets.KNOWN.get(name or "")
    labels = np.concatenate([train_y.array, test_y.array])
    names = datasets.class_names(known, int(labels.max()) + 1)
    if labels.max() >= len(names):
        raise DataError(f"{train_y.path}: label {labels.max()} but {known.name} has {len(names)} classes")
    sha = {p.path.name: p.sha256 for p in (train_x, train_y, test_x, test_y)}
    dataset_name = name or (known.name if known else train_x.path.resolve().parent.name)
    return Source(dataset_name, names, train_x.array, train_y.array, test_x.array, test_y.array, sha)


# ---------------------------------------------------------------- splitting

def class_ordinal(labels: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same label (0, 1, 2, ... per class)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    ordinal = np.empty(len(labels), np.int64)
    ordinal[order] = np.arange(len(labels)) - group_start
    return ordinal


def carve_val(perm: np.ndarray, labels: np.ndarray, fraction: float, stratify: bool):
    """(train, val) index arrays from the permutation; val takes its front (per class when stratified)."""
    if fraction == 0:
        return perm, perm[:0]
    if not stratify:
        n_val = int(round(fraction * len(perm)))
        return perm[n_val:], perm[:n_val]
    permuted = labels[perm]
    counts = np.bincount(permuted)
    take = np.rint(fraction * counts).astype(np.int64)
    is_val = class_ordinal(permuted) < take[permuted]
    return perm[~is_val], perm[is_val]


def deal(indices: np.ndarray, labels: np.ndarray, shards: int, stratify: bool) -> list[np.ndarray]:
    """Split permuted indices into ``shards`` parts; stratified: class c's k-th sample goes to (k + offset_c) % N.

    The per-class offset continues where the previous class stopped, so shard
    totals differ by at most one as well as each class's counts.
    """
    if not stratify:
        return np.array_split(indices, shards)
    permuted = labels[indices]
    counts = np.bincount(permuted)
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]]) % shards
    owner = (class_ordinal(permuted) + offset[permuted]) % shards
    return [indices[owner == s] for s in range(shards)]


def split_indices(labels: np.ndarray, shards: int, seed: int, stratify: bool, val_fraction: float):
    """(list of shard index arrays, val index array) into the training set."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    train, val = carve_val(perm, labels, val_fraction, stratify)
    if val_fraction > 0 and len(val) == 0:
        raise DataError(f"--val-fraction {val_fraction} of {len(labels)} samples selects no sample")
    if shards > len(train):
        raise DataError(f"--shards {shards} is more than the {len(train)} training samples to share")
    return deal(train, labels, shards, stratify), val


def pixel_stats(images: np.ndarray, exclude: np.ndarray) -> tuple[float, float]:
    """Mean and std of pixels/255 over all images but ``exclude``; exact sums in integers, so any order agrees."""
    flat = images.reshape(len(images), -1)

    def sums(rows) -> tuple[int, int]:
        s = ss = 0
        for i in range(0, len(rows), 4096):  # bounded temporaries: 4096 images as uint32
            block = rows[i:i + 4096].astype(np.uint32)
            s += int(block.sum(dtype=np.uint64))
            ss += int((block * block).sum(dtype=np.uint64))
        return s, ss

    s, ss = sums(flat)
    vs, vss = sums(flat[np.sort(exclude)])
    s, ss, n = s - vs, ss - vss, (len(images) - len(exclude)) * flat.shape[1]
    mean = s / n / 255.0
    var = (ss * n - s * s) / (n * n * 255.0 * 255.0)
    return mean, float(np.sqrt(max(var, 0.0)))


def sharding_id(sha256: dict[str, str], seed: int, shards: int, stratify: bool, val_fraction: float) -> str:
    """One hex id for (sources, seed, shards, stratify, val fraction): equal in every file of one run."""
    key = json.dumps({"sources": sorted(sha256.values()), "seed": seed, "shards": shards,
                      "stratify": stratify, "val_fraction": val_fraction}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------- writing

def existing_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    names = (h5format.TEST_NAME, h5format.VAL_NAME, h5format.MANIFEST_NAME)
    return sorted([*out.glob(h5format.SHARD_GLOB), *(out / n for n in names if (out / n).exists())])


def plan(src: Source, shards: list[np.ndarray], val: np.ndarray) -> list[tuple[str, str, int, np.ndarray]]:
    """(file name, split, shard index, source rows) for every file to write."""
    files = [(h5format.shard_name(i, len(shards)), "train", i, rows) for i, rows in enumerate(shards)]
    files.append((h5format.TEST_NAME, "test", 0, np.arange(len(src.test_labels))))
    if len(val):
        files.append((h5format.VAL_NAME, "val", 0, val))
    return files


def write_all(out: Path, src: Source, files, common: dict, replaces: list[Path]) -> dict:
    """Write every planned file and the manifest atomically; return the manifest."""
    manifest = {"format_version": h5format.FORMAT_VERSION, "dataset": src.name,
                "sharding_id": common["sharding_id"], "files": {}}
    with AtomicOutput(out, replaces) as output:
        for name, split, index, rows in files:
            images, labels = (src.test_images, src.test_labels) if split == "test" else (src.train_images, src.train_labels)
            attrs = {**common, "split": split, "shard_index": index,
                     "shard_count": common["shard_count"] if split == "train" else 1}
            tmp = output.temp(name)
            h5format.write_split(tmp, images[rows], labels[rows], rows, attrs)
            manifest["files"][name] = {"split": split, "samples": len(rows),
                                       "sha256": hashlib.sha256(tmp.read_bytes()).hexdigest()}
        output.temp(h5format.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def run(args) -> dict:
    check_numbers(args)
    check_output_folder(args.out, existing_outputs(args.out), force=args.force)
    src = load_source(resolve_paths(args), args.dataset)
    shards, val = split_indices(src.train_labels, args.shards, args.seed, args.stratify, args.val_fraction)
    mean, std = pixel_stats(src.train_images, exclude=val)
    common = {
        "format_version": h5format.FORMAT_VERSION, "dataset": src.name, "class_names": src.class_names,
        "shard_count": args.shards, "num_train_total": len(src.train_labels) - len(val),
        "num_val_total": len(val), "num_test_total": len(src.test_labels), "source_sha256": src.sha256,
        "mean": mean, "std": std, "seed": args.seed, "stratified": bool(args.stratify),
        "val_fraction": float(args.val_fraction), "image_shape": list(src.train_images.shape[1:]),
        "sharding_id": sharding_id(src.sha256, args.seed, args.shards, args.stratify, args.val_fraction),
    }
    return write_all(args.out, src, plan(src, shards, val), common, existing_outputs(args.out))


def _body(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    manifest = run(args)
    sizes = [f["samples"] for f in manifest["files"].values() if f["split"] == "train"]
    extra = "".join(f", {name} ({f['samples']})" for name, f in manifest["files"].items() if f["split"] != "train")
    print(f"{args.out}: {manifest['dataset']}, {len(sizes)} train shards of {min(sizes)}-{max(sizes)} samples{extra}; "
          f"sharding_id {manifest['sharding_id'][:12]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())

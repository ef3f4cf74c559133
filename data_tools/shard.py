"""``python -m data_tools.shard``: IDX files, a folder of images or an .npz -> N HDF5 training shards + test (+ val) file.

    python -m data_tools.shard --out data/fmnist --shards 4 --stratify
    python -m data_tools.shard path/to/mnist-folder --out data/mnist --shards 8 --val-fraction 0.1
    python -m data_tools.shard --download mnist --out data/mnist --shards 2
    python -m data_tools.shard --from-folder photos --size 32x32 --out data/photos --shards 2 --stratify
    python -m data_tools.shard --from-npz mine.npz --out data/mine --shards 2 --test-fraction 0.1

The training set is permuted once with ``--seed``, a validation set is carved
off the front of the permutation, and the rest is split into ``--shards``
parts (with ``--stratify``, each class is dealt round-robin so every shard
holds the same class balance).  All files appear together or not at all.

IDX files bring their own test set.  A folder (one subfolder per class, the
classes in sorted order, named after the subfolders) and an .npz (``images``
uint8 (N, H, W[, C]), ``labels``, optionally ``class_names``) are one set:
``--test-fraction`` of it (default 0.2) becomes test.h5 first, taken per
class from the front of the same permutation, so it is stratified and fixed
by ``--seed``; validation and shards come from the rest.

Images are read and written a block of HDF5 chunks at a time, so a folder or
an .npz far larger than memory is sharded in bounded memory (an .npz saved
compressed is first inflated into a scratch folder beside --out); the
trainer streams the chunks (docs/data.md).
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

from data_tools import datasets, download, h5format, idx, images
from data_tools import images as imgs
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
    pooled: bool = False  # one set (a folder, an .npz): test.h5 is carved from it, test_* are train_*


# ---------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data_tools.shard",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n", 2)[2].strip())
    p.add_argument("source", nargs="?", type=Path,
                   help=f"folder with the four MNIST-style IDX files, .gz or raw (default {datasets.DEBIAN_FASHION_MNIST})")
    for role in idx.ROLES:
        p.add_argument("--" + role.replace("_", "-"), type=Path, metavar="FILE",
                       help=f"explicit {role.replace('_', ' ')} IDX file (overrides the folder's)")
    p.add_argument("--download", metavar="NAME", help=f"fetch a known data set ({', '.join(sorted(datasets.KNOWN))})")
    p.add_argument("--mirror", metavar="URL", help="with --download: base URL instead of the canonical mirrors")
    p.add_argument("--cache", type=Path, metavar="DIR", help="with --download: where the files are kept")
    p.add_argument("--from-folder", type=Path, metavar="DIR",
                   help="your own images: DIR/CLASS/*.png|jpg (one subfolder per class, any depth below it)")
    p.add_argument("--from-npz", type=Path, metavar="FILE",
                   help="your own arrays: 'images' uint8 (N, H, W) or (N, H, W, C), 'labels' 0..K-1, "
                        "optionally 'class_names'; read a block of rows at a time (a compressed .npz is first "
                        "inflated into a scratch folder beside --out: it needs that much free disk)")
    p.add_argument("--size", metavar="HxW", help="with --from-folder/--from-npz: fit every image into HxW "
                   "(aspect ratio kept, centred on black); without it all images must be of one size")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--grayscale", action="store_true", help="with --from-folder/--from-npz: store one channel")
    mode.add_argument("--rgb", action="store_true", help="with --from-folder/--from-npz: store three channels "
                      "(default: RGB unless every image is grayscale; an .npz: as stored)")
    p.add_argument("--test-fraction", type=float, metavar="F",
                   help="with --from-folder/--from-npz: part of the images kept as test.h5, per class, "
                        "chosen by --seed, in (0, 1) (default 0.2)")
    p.add_argument("--dataset", help="name stored in the files (default: recognised from content, else the folder name)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--shards", type=int, required=True, help="number of training shards (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation (default 0)")
    p.add_argument("--stratify", action="store_true", help="same class balance in every shard (and in val)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="part of the training set kept as val.h5 (default 0: none)")
    p.add_argument("--compression", choices=h5format.COMPRESSIONS, default="gzip",
                   help="how the chunks of images are compressed: gzip (level 1, the smallest files), lzf (faster "
                        "to read, larger files) or none (default gzip)")
    p.add_argument("--force", action="store_true", help="replace outputs already in --out")
    return p


def check_numbers(args) -> None:
    if args.shards < 1:
        raise DataError(f"--shards must be at least 1, got {args.shards}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.seed < 0:
        raise DataError(f"--seed must be >= 0, got {args.seed}")
    pooled = args.from_folder is not None or args.from_npz is not None
    if args.test_fraction is not None and not 0.0 < args.test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.size:
        images.parse_size(args.size)  # a typo is told before anything is read or checked on disk
    for flag, given in (("--size", args.size), ("--grayscale", args.grayscale), ("--rgb", args.rgb),
                        ("--test-fraction", args.test_fraction is not None)):
        if given and not pooled:
            raise DataError(f"{flag}: only with --from-folder or --from-npz (IDX files bring their size and test set)")
    if pooled and args.val_fraction + (0.2 if args.test_fraction is None else args.test_fraction) >= 1.0:
        raise DataError("--val-fraction and --test-fraction together leave no training images")


def load_own(args, scratch: Path | None = None) -> Source:
    """A folder of class subfolders or an .npz (``data_tools.images``) as a pooled Source whose images are
    read when written (``scratch``: where a compressed .npz member is inflated)."""
    if args.from_folder is not None and args.from_npz is not None:
        raise DataError("--from-folder and --from-npz: give one of them")
    given = [f for f, v in (("a source folder", args.source), ("--download", args.download),
                            *((f"--{r.replace('_', '-')}", getattr(args, r)) for r in idx.ROLES)) if v]
    if given or args.mirror or args.cache:
        raise DataError(f"--from-{'folder' if args.from_folder else 'npz'}: give it alone, without "
                        f"{given[0] if given else '--mirror/--cache'}")
    size = images.parse_size(args.size) if args.size else None
    channels = 1 if args.grayscale else 3 if args.rgb else None
    if args.from_folder is not None:
        with progress_bar("reading image headers", None, "img") as bar:
            x, y, names, sha = images.read_folder(args.from_folder, size, channels, bar.update)
        name = args.dataset or Path(args.from_folder).resolve().name
    else:
        x, y, names, sha = images.read_npz(args.from_npz, size, channels, scratch)
        name = args.dataset or Path(args.from_npz).stem
    return Source(name, names, x, y, x, y, sha, pooled=True)


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


def split_indices(labels: np.ndarray, shards: int, seed: int, stratify: bool, val_fraction: float,
                  test_fraction: float = 0.0):
    """(list of shard index arrays, val index array, test index array) into ``labels``.

    Test (only with ``test_fraction``: a pooled source) is carved first, always
    stratified, then val, both from the front of one permutation; without a
    test fraction the permutation, val and shards are what they were before
    test fractions existed."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    rest, test = carve_val(perm, labels, test_fraction, stratify=True)
    if test_fraction > 0 and len(test) == 0:
        raise DataError(f"--test-fraction {test_fraction} of {len(labels)} samples selects no sample")
    train, val = carve_val(rest, labels, val_fraction, stratify)
    if val_fraction > 0 and len(val) == 0:
        raise DataError(f"--val-fraction {val_fraction} of {len(rest)} samples selects no sample")
    if shards > len(train):
        raise DataError(f"--shards {shards} is more than the {len(train)} training samples to share")
    return deal(train, labels, shards, stratify), val, test


def pixel_stats(images, rows: np.ndarray | None = None, progress=None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels/255 of images (N, H, W, C) (rows ``rows``, default all): an array,
    or :class:`data_tools.images.LazyImages` read a block at a time.

    Exact sums in Python integers, so any order of the rows agrees to the bit."""
    rows = np.arange(len(images)) if rows is None else np.sort(rows)
    c = images.shape[-1] if images.ndim == 4 else 1
    s, ss = [0] * c, [0] * c
    step = int(max(1, min(4096, 2**20 // max(1, int(np.prod(images.shape[1:]))))))  # bounded temporaries
    for i in range(0, len(rows), step):
        if progress is not None:
            progress(len(rows[i:i + step]))
        block = images[rows[i:i + step]].reshape(-1, c).astype(np.uint64)
        s = [a + int(b) for a, b in zip(s, block.sum(axis=0))]
        ss = [a + int(b) for a, b in zip(ss, (block * block).sum(axis=0))]
    n = len(rows) * (images[0].size // c if len(images) else 0)
    mean = [si / n / 255.0 for si in s]
    std = [float(np.sqrt(max((ssi * n - si * si) / (n * n * 255.0 * 255.0), 0.0))) for si, ssi in zip(s, ss)]
    return mean, std


def sharding_id(sha256: dict[str, str], seed: int, shards: int, stratify: bool, val_fraction: float,
                test_fraction: float | None = None, image_shape=None) -> str:
    """One hex id for (sources, seed, shards, stratify, val fraction [, test fraction and image shape of a
    pooled source, whose pixels depend on --size and the colour mode]): equal in every file of one run."""
    key = {"sources": sorted(sha256.values()), "seed": seed, "shards": shards,
           "stratify": stratify, "val_fraction": val_fraction}
    if test_fraction is not None:
        key.update(test_fraction=test_fraction, image_shape=list(image_shape))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- writing

def existing_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    names = (h5format.TEST_NAME, h5format.VAL_NAME, h5format.MANIFEST_NAME)
    return sorted([*out.glob(h5format.SHARD_GLOB), *(out / n for n in names if (out / n).exists())])


def plan(src: Source, shards: list[np.ndarray], val: np.ndarray, test: np.ndarray) -> list[tuple[str, str, int, np.ndarray]]:
    """(file name, split, shard index, source rows) for every file to write."""
    files = [(h5format.shard_name(i, len(shards)), "train", i, rows) for i, rows in enumerate(shards)]
    files.append((h5format.TEST_NAME, "test", 0, np.sort(test) if src.pooled else np.arange(len(src.test_labels))))
    if len(val):
        files.append((h5format.VAL_NAME, "val", 0, val))
    return files


def progress_bar(desc: str, total: int | None, unit: str = "img"):
    """A tqdm bar on stderr when it is a terminal (nothing otherwise)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, file=sys.stderr)


def write_all(out: Path, src: Source, files, common: dict, replaces: list[Path], compression: str = "gzip") -> dict:
    """Write every planned file and the manifest atomically, a block of images at a time; return the manifest."""
    manifest = {"format_version": h5format.FORMAT_VERSION, "dataset": src.name,
                "sharding_id": common["sharding_id"], "files": {}}
    total = sum(len(rows) for *_, rows in files)
    with AtomicOutput(out, replaces) as output, progress_bar("writing", total) as bar:
        for name, split, index, rows in files:
            images, labels = (src.test_images, src.test_labels) if split == "test" else (src.train_images, src.train_labels)
            attrs = {**common, "split": split, "shard_index": index,
                     "shard_count": common["shard_count"] if split == "train" else 1}
            tmp = output.temp(name)
            h5format.write_split(tmp, imgs.Picked(images, rows), labels[rows], rows, attrs, compression, bar.update)
            manifest["files"][name] = {"split": split, "samples": len(rows), "sha256": imgs.file_sha256(tmp)}
        output.temp(h5format.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def scratch_folder(out: Path):
    """A temporary folder on the output's file system (not /tmp, often memory), removed at the end."""
    import tempfile
    near = Path(out).absolute()
    while not near.is_dir():
        near = near.parent
    return tempfile.TemporaryDirectory(prefix=".shard-scratch-", dir=near)


def run(args) -> dict:
    check_numbers(args)
    check_output_folder(args.out, existing_outputs(args.out), force=args.force)
    if args.from_npz is not None:
        with scratch_folder(args.out) as scratch:
            return _run(args, Path(scratch))
    return _run(args)


def _run(args, scratch: Path | None = None) -> dict:
    if args.from_folder is not None or args.from_npz is not None:
        src = load_own(args, scratch)
        test_fraction = 0.2 if args.test_fraction is None else float(args.test_fraction)
    else:
        src, test_fraction = load_source(resolve_paths(args), args.dataset), None
        src.train_images, src.test_images = src.train_images[..., None], src.test_images[..., None]  # C = 1
    shards, val, test = split_indices(src.train_labels, args.shards, args.seed, args.stratify, args.val_fraction,
                                      test_fraction or 0.0)
    train_rows = np.concatenate(shards)
    with progress_bar("pixel statistics", len(train_rows)) as bar:
        mean, std = pixel_stats(src.train_images, train_rows, bar.update)
    shape = list(src.train_images.shape[1:])
    common = {
        "format_version": h5format.FORMAT_VERSION, "dataset": src.name, "class_names": src.class_names,
        "shard_count": args.shards, "num_train_total": len(train_rows),
        "num_val_total": len(val), "num_test_total": len(test) if src.pooled else len(src.test_labels),
        "source_sha256": src.sha256, "mean": mean, "std": std, "seed": args.seed, "stratified": bool(args.stratify),
        "val_fraction": float(args.val_fraction), "image_shape": shape,
        "sharding_id": sharding_id(src.sha256, args.seed, args.shards, args.stratify, args.val_fraction,
                                   test_fraction, shape),
    }
    if test_fraction is not None:
        common["test_fraction"] = test_fraction
    return write_all(args.out, src, plan(src, shards, val, test), common, existing_outputs(args.out),
                     args.compression)


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

"""``python -m data_tools.verify DIR``: prove that a sharding run's files belong together and cover the source.

Checks: the shard set is complete; every file is readable and well-formed;
attributes that must agree do; counts add up to the stored totals; train and
val rows are disjoint and cover the training source exactly, test rows the
test source (for a folder or an .npz: train, val and test rows together
cover the one source exactly); stratified shards are balanced; the stored mean/std are those of
the training pixels; the manifest's hashes match; with ``--source``, the IDX
files' hashes and every sample's pixels and label match the source.

Exit codes follow ``diff``: 0 all agree, 1 a mismatch was found (each printed
on its own line), 2 the input could not be checked (unreadable file, missing
folder or shard).
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

from data_tools import h5format, idx
from data_tools.errors import DataError, run_cli
from data_tools.shard import pixel_stats, sharding_id

EXIT_MISMATCH = 1
# Attributes every file of one run must share (split, shard_index, shard_count differ by design).
SHARED = ("format_version", "dataset", "class_names", "num_train_total", "num_val_total", "num_test_total",
          "source_sha256", "mean", "std", "seed", "stratified", "sharding_id", "image_shape")


@dataclass
class Part:
    """One file's contents as verify needs them."""

    path: Path
    attrs: dict
    images: np.ndarray
    labels: np.ndarray
    source_index: np.ndarray


def load_parts(folder: Path) -> list[Part]:
    """Every output file of the folder, read whole (DataError on anything unreadable)."""
    paths = h5format.list_shards(folder) + [folder / h5format.TEST_NAME]
    if (folder / h5format.VAL_NAME).exists():
        paths.append(folder / h5format.VAL_NAME)
    return [Part(p, *_read(p)) for p in paths]


def _read(path: Path):
    images, labels, source_index, attrs = h5format.read_rows(path)
    return attrs, images, labels, source_index


def check_roles(parts: list[Part]) -> list[str]:
    """Each file's split/shard attributes agree with its name."""
    problems = []
    for part in parts:
        m = h5format.SHARD_RE.match(part.path.name)
        want = ("train", int(m.group(1)), int(m.group(2))) if m else \
            ("test" if part.path.name == h5format.TEST_NAME else "val", 0, 1)
        got = (part.attrs["split"], part.attrs["shard_index"], part.attrs["shard_count"])
        if got != want:
            problems.append(f"{part.path}: split/shard_index/shard_count are {got}, its name says {want}")
    return problems


def check_shared(parts: list[Part]) -> list[str]:
    """Attributes that must be equal in every file, and a sharding_id that matches its inputs."""
    problems = []
    first = parts[0]
    for part in parts[1:]:
        for key in SHARED:
            if part.attrs[key] != first.attrs[key]:
                problems.append(f"{part.path}: attribute {key} differs from {first.path.name}")
    a = first.attrs
    expected = sharding_id(a["source_sha256"], a["seed"], a["shard_count"], a["stratified"], a.get("val_fraction", 0.0),
                           a.get("test_fraction"), a["image_shape"])
    if a["sharding_id"] != expected:
        problems.append(f"{first.path}: sharding_id does not match its sources, seed and options")
    return problems


def _coverage(name: str, rows: np.ndarray, total: int) -> list[str]:
    """Rows must be a permutation of range(total): disjoint and covering."""
    if len(rows) != total:
        return [f"{name}: {len(rows)} samples but the stored total is {total}"]
    seen = np.bincount(rows[(rows >= 0) & (rows < total)], minlength=total)
    dup, missing, outside = int((seen > 1).sum()), int((seen == 0).sum()), int(((rows < 0) | (rows >= total)).sum())
    if dup or missing or outside:
        return [f"{name}: {dup} source rows repeated, {missing} missing, {outside} out of range (not disjoint/covering)"]
    return []


def check_counts(parts: list[Part]) -> list[str]:
    """Totals add up; train+val cover the training source once, test the test source once (a pooled
    source, with a test fraction: train+val+test cover it once)."""
    a = parts[0].attrs
    by = {s: [p for p in parts if p.attrs["split"] == s] for s in h5format.SPLITS}
    problems = []
    train_rows = np.concatenate([p.source_index for p in by["train"]])
    if len(train_rows) != a["num_train_total"]:
        problems.append(f"train shards hold {len(train_rows)} samples, num_train_total is {a['num_train_total']}")
    val_rows = np.concatenate([p.source_index for p in by["val"]] or [np.zeros(0, np.int64)])
    if len(val_rows) != a["num_val_total"]:
        problems.append(f"val holds {len(val_rows)} samples, num_val_total is {a['num_val_total']}")
    test_rows = by["test"][0].source_index
    if "test_fraction" in a:
        problems += _coverage("train+val+test", np.concatenate([train_rows, val_rows, test_rows]),
                              a["num_train_total"] + a["num_val_total"] + a["num_test_total"])
    else:
        problems += _coverage("train+val", np.concatenate([train_rows, val_rows]),
                              a["num_train_total"] + a["num_val_total"])
        problems += _coverage("test", test_rows, a["num_test_total"])
    for part in parts:
        if len(part.labels) and int(part.labels.max()) >= len(a["class_names"]):
            problems.append(f"{part.path}: label {int(part.labels.max())} but only {len(a['class_names'])} classes")
    return problems


def check_balance(parts: list[Part]) -> list[str]:
    """Stratified shards: each class's count differs by at most one between shards."""
    train = [p for p in parts if p.attrs["split"] == "train"]
    if not parts[0].attrs["stratified"] or len(train) < 2:
        return []
    k = len(parts[0].attrs["class_names"])
    counts = np.stack([np.bincount(p.labels, minlength=k)[:k] for p in train])
    spread = counts.max(axis=0) - counts.min(axis=0)
    bad = [parts[0].attrs["class_names"][c] for c in np.flatnonzero(spread > 1)]
    return [f"stratified shards unbalanced for classes {', '.join(bad)}"] if bad else []


def check_stats(parts: list[Part]) -> list[str]:
    """The stored per-channel mean/std are those of the training shards' pixels."""
    images = np.concatenate([p.images for p in parts if p.attrs["split"] == "train"])
    mean, std = pixel_stats(images)
    a = parts[0].attrs
    if not (np.allclose(a["mean"], mean, rtol=1e-9, atol=0) and np.allclose(a["std"], std, rtol=1e-9, atol=0)):
        return [f"stored mean/std {_floats(a['mean'])}/{_floats(a['std'])} differ from the training pixels' "
                f"{_floats(mean)}/{_floats(std)}"]
    return []


def _floats(values) -> str:
    return ",".join(f"{v:.6f}" for v in values)


def check_manifest(folder: Path, parts: list[Part]) -> list[str]:
    """manifest.json lists exactly these files, with their sha256 and the run's sharding_id."""
    path = folder / h5format.MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
    except FileNotFoundError:
        return [f"{path}: missing"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{path}: unreadable ({exc})"]
    problems = []
    if manifest.get("sharding_id") != parts[0].attrs["sharding_id"]:
        problems.append(f"{path}: sharding_id differs from the files'")
    names = {p.path.name for p in parts}
    if set(listed) != names:
        problems.append(f"{path}: lists {sorted(set(listed) - names)} not present, "
                        f"does not list {sorted(names - set(listed))}")
    for part in parts:
        entry = listed.get(part.path.name)
        if entry and entry.get("sha256") != hashlib.sha256(part.path.read_bytes()).hexdigest():
            problems.append(f"{part.path}: sha256 differs from the manifest (file changed after sharding)")
    return problems


def check_source(source: Path, parts: list[Part]) -> list[str]:
    """The IDX files in ``source`` are the hashed ones, and every stored sample equals its source row."""
    if "test_fraction" in parts[0].attrs:
        raise DataError(f"--source {source}: compares IDX files; {parts[0].path} was sharded from a folder "
                        "of images or an .npz (its source_sha256 and the manifest hold their hashes)")
    paths = idx.find_in_folder(source)
    stored = parts[0].attrs["source_sha256"]
    arrays, problems = {}, []
    for role, path in paths.items():
        arr = idx.read_idx(path)
        if stored.get(path.name) != arr.sha256:
            problems.append(f"{path}: sha256 {arr.sha256[:12]}... is not the one recorded ({path.name})")
        arrays[role] = arr.array
    for part in parts:
        role = "test" if part.attrs["split"] == "test" else "train"
        src_x, src_y = arrays[f"{role}_images"], arrays[f"{role}_labels"]
        rows = part.source_index
        if rows.min(initial=0) < 0 or rows.max(initial=-1) >= len(src_y):
            problems.append(f"{part.path}: source_index outside the source's {len(src_y)} rows")
        elif not (np.array_equal(src_y[rows], part.labels) and np.array_equal(src_x[rows], part.images[..., 0])):
            problems.append(f"{part.path}: images or labels differ from the source rows they name")
    return problems


def summary(parts: list[Part]) -> str:
    a = parts[0].attrs
    return (f"{a['dataset']}, {a['shard_count']} shards, {a['num_train_total']} train, {a['num_val_total']} val, "
            f"{a['num_test_total']} test, sharding_id {a['sharding_id'][:12]}")


def verify(folder: Path, source: Path | None = None) -> tuple[list[str], str]:
    """(every mismatch found, one line each; a one-line summary). DataError if the folder cannot be checked."""
    folder = Path(folder)
    parts = load_parts(folder)
    problems = check_roles(parts) + check_shared(parts)
    if not problems:  # the rest assumes the files agree on totals and class names
        problems += check_counts(parts) + check_balance(parts) + check_stats(parts)
    problems += check_manifest(folder, parts)
    if source is not None:
        problems += check_source(source, parts)
    return problems, summary(parts)


def _body(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data_tools.verify", description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="output folder of data_tools.shard")
    p.add_argument("--source", type=Path, help="folder of the IDX files: also compare hashes and every sample")
    args = p.parse_args(argv)
    problems, about = verify(args.folder, args.source)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return EXIT_MISMATCH
    print(f"{args.folder}: OK: {about}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())

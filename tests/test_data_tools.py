"""data_tools: IDX -> HDF5 sharding, verify, inspect, download; every bad input exits 2 and writes nothing."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_tools import atomic, datasets, h5format, idx
from data_tools import inspect as inspect_tool
from data_tools import shard, verify

DEBIAN = Path(datasets.DEBIAN_FASHION_MNIST)
needs_debian = pytest.mark.skipif(
    not DEBIAN.is_dir(), reason=f"{DEBIAN} missing: apt-get install dataset-fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def make_source(folder: Path, n_train=60, n_test=20, shape=(6, 5), classes=3, gz=True, seed=0) -> Path:
    """A tiny MNIST-style folder: random pixels, labels cycling over ``classes``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, *shape), dtype=np.uint8), gz)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", rng.permutation(np.arange(n) % classes), gz)
    return folder


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def run(tool, args, capsys) -> tuple[int, str, str]:
    """Call a tool's main(argv) in-process; argparse's own errors arrive as SystemExit."""
    try:
        code = tool.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(code, err, *names):
    """Exit 2 with exactly one line, `error: ...`, naming the file or argument."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)


def read_file(path: Path):
    with h5py.File(path, "r") as f:
        return f["images"][:], f["labels"][:], f["source_index"][:], h5format.decode_attrs(f.attrs)


@pytest.fixture(scope="session")
def fashion4(tmp_path_factory) -> Path:
    """Debian's Fashion-MNIST sharded into 4 stratified shards, once per session."""
    if not DEBIAN.is_dir():
        pytest.skip(f"{DEBIAN} missing: apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("fashion") / "out"
    assert shard.main(["--out", str(out), "--shards", "4", "--stratify", "--seed", "7"]) == 0
    return out


@pytest.fixture
def small(tmp_path) -> Path:
    """A sharded tiny synthetic set (3 shards, stratified, with val) to check and tamper with."""
    src = make_source(tmp_path / "src")
    out = tmp_path / "out"
    assert shard.main([str(src), "--out", str(out), "--shards", "3", "--stratify", "--val-fraction", "0.2"]) == 0
    return out


# ---------------------------------------------------------------- real Fashion-MNIST

@needs_debian
def test_real_fashion_mnist_counts_per_class_and_disjoint(fashion4):
    shards = h5format.list_shards(fashion4)
    assert [p.name for p in shards] == [f"train-0000{i}-of-00004.h5" for i in range(4)]
    labels, rows = [], []
    for path in shards:
        _, y, src, attrs = read_file(path)
        assert len(y) == 15000
        assert np.bincount(y, minlength=10).tolist() == [1500] * 10
        labels.append(y)
        rows.append(src)
    assert np.bincount(np.concatenate(labels)).tolist() == [6000] * 10
    all_rows = np.concatenate(rows)
    assert len(all_rows) == 60000 and np.array_equal(np.sort(all_rows), np.arange(60000))
    _, y_test, src_test, _ = read_file(fashion4 / "test.h5")
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert np.array_equal(src_test, np.arange(10000))


@needs_debian
def test_real_fashion_mnist_attributes(fashion4):
    attrs = [read_file(p)[3] for p in sorted(fashion4.glob("*.h5"))]
    first = attrs[0]
    assert first["dataset"] == "fashion-mnist"
    assert first["class_names"][:2] == ["T-shirt/top", "Trouser"] and len(first["class_names"]) == 10
    assert first["image_shape"] == (28, 28, 1) and first["format_version"] == 2
    assert (first["num_train_total"], first["num_val_total"], first["num_test_total"]) == (60000, 0, 10000)
    assert first["mean"] == pytest.approx((0.2860,), abs=1e-4) and first["std"] == pytest.approx((0.3530,), abs=1e-4)
    assert set(first["source_sha256"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    assert len({a["sharding_id"] for a in attrs}) == 1
    assert [a["shard_index"] for a in attrs if a["split"] == "train"] == [0, 1, 2, 3]
    with h5py.File(fashion4 / "train-00000-of-00004.h5") as f:
        assert f["images"].shape == (15000, 28, 28, 1) and f["images"].dtype == np.uint8 and f["images"].chunks and f["images"].compression == "gzip"
    manifest = json.loads((fashion4 / "manifest.json").read_text())
    assert manifest["sharding_id"] == first["sharding_id"] and len(manifest["files"]) == 5


@needs_debian
def test_real_verify_passes_against_the_source(fashion4, capsys):
    code, out, err = run(verify, [fashion4, "--source", DEBIAN], capsys)
    assert code == 0, err
    assert "OK" in out and "60000 train" in out


# ---------------------------------------------------------------- splitting

def test_stratified_deal_balances_classes_and_totals():
    labels = np.repeat(np.arange(4), [10, 7, 5, 1])
    shards, val, test = shard.split_indices(labels, 3, seed=1, stratify=True, val_fraction=0)
    counts = np.stack([np.bincount(labels[s], minlength=4) for s in shards])
    assert (counts.max(0) - counts.min(0) <= 1).all()
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels) and len(val) == len(test) == 0
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(labels)))


def test_split_is_reproducible_for_a_seed_and_changes_with_it():
    labels = np.arange(100) % 5
    a = shard.split_indices(labels, 4, seed=3, stratify=False, val_fraction=0.1)
    b = shard.split_indices(labels, 4, seed=3, stratify=False, val_fraction=0.1)
    c = shard.split_indices(labels, 4, seed=4, stratify=False, val_fraction=0.1)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0][0], c[0][0])
    assert [len(s) for s in a[0]] == [23, 23, 22, 22] and len(a[1]) == 10


def test_stratified_val_keeps_class_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    shards, val, _ = shard.split_indices(labels, 2, seed=0, stratify=True, val_fraction=0.1)
    assert np.bincount(labels[val]).tolist() == [5, 3, 2]
    assert not set(val) & set(np.concatenate(shards))


def test_stratified_test_split_comes_first_and_is_disjoint_from_val_and_shards():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    shards, val, test = shard.split_indices(labels, 2, seed=0, stratify=False, val_fraction=0.1, test_fraction=0.2)
    assert np.bincount(labels[test]).tolist() == [10, 6, 4]  # per class, even without --stratify
    assert len(val) == 8 and sum(map(len, shards)) == 72
    assert np.array_equal(np.sort(np.concatenate([*shards, val, test])), np.arange(100))
    again = shard.split_indices(labels, 2, seed=0, stratify=False, val_fraction=0.1, test_fraction=0.2)
    assert np.array_equal(again[2], test)
    assert not np.array_equal(np.sort(shard.split_indices(labels, 2, 1, False, 0.1, 0.2)[2]), np.sort(test))


def test_pixel_stats_match_numpy_over_the_given_rows_per_channel():
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 3, 3), dtype=np.uint8)
    images[..., 2] //= 4  # channels with different statistics
    keep = np.setdiff1d(np.arange(50), [3, 7, 40])
    mean, std = shard.pixel_stats(images, keep[::-1])
    for c in range(3):
        pixels = [images[i, y, x, c] / 255 for i in keep for y in range(4) for x in range(3)]
        assert mean[c] == pytest.approx(np.mean(pixels), rel=1e-12)
        assert std[c] == pytest.approx(np.std(pixels), rel=1e-12)
    assert mean[2] < mean[0] / 2


# ---------------------------------------------------------------- the tool end to end (synthetic)

def test_small_run_writes_the_format_and_verify_passes(small, capsys):
    assert sorted(files_under(small)) == ["manifest.json", "test.h5", "train-00000-of-00003.h5",
                                          "train-00001-of-00003.h5", "train-00002-of-00003.h5", "val.h5"]
    _, _, src, attrs = read_file(small / "val.h5")
    assert attrs["split"] == "val" and attrs["num_val_total"] == len(src) == 12
    assert attrs["num_train_total"] == 48 and attrs["dataset"] == "src" and attrs["class_names"] == ["0", "1", "2"]
    code, out, err = run(verify, [small, "--source", small.parent / "src"], capsys)
    assert code == 0, err


def test_raw_and_gzipped_sources_give_the_same_shards(tmp_path):
    make_source(tmp_path / "gz", gz=True)
    make_source(tmp_path / "raw", gz=False)
    for name in ("gz", "raw"):
        assert shard.main([str(tmp_path / name), "--out", str(tmp_path / f"o{name}"), "--shards", "2"]) == 0
    a, b = read_file(tmp_path / "ogz/train-00001-of-00002.h5"), read_file(tmp_path / "oraw/train-00001-of-00002.h5")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])


def test_explicit_file_flags(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    args = ["--train-images", src / "train-images-idx3-ubyte.gz", "--train-labels", src / "train-labels-idx1-ubyte.gz",
            "--test-images", src / "t10k-images-idx3-ubyte.gz", "--test-labels", src / "t10k-labels-idx1-ubyte.gz",
            "--out", tmp_path / "out", "--shards", "2", "--dataset", "toy"]
    code, out, err = run(shard, args, capsys)
    assert code == 0, err
    assert read_file(tmp_path / "out/test.h5")[3]["dataset"] == "toy"


def test_module_entry_points_run_as_subprocesses(tmp_path):
    src = make_source(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def module(*args):
        return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO)

    done = module("data_tools.shard", src, "--out", tmp_path / "out", "--shards", "2")
    assert done.returncode == 0, done.stderr
    assert module("data_tools.verify", tmp_path / "out").returncode == 0
    bad = module("data_tools.shard", src, "--out", tmp_path / "out2", "--shards", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --shards must be at least 1, got 0"
    assert not (tmp_path / "out2").exists()


def test_force_replaces_and_removes_stale_shards(small, capsys):
    src = small.parent / "src"
    code, _, err = run(shard, [src, "--out", small, "--shards", "2"], capsys)
    assert_bad_input(code, err, "--out", "--force")
    code, _, err = run(shard, [src, "--out", small, "--shards", "2", "--force"], capsys)
    assert code == 0, err
    assert sorted(files_under(small)) == ["manifest.json", "test.h5", "train-00000-of-00002.h5",
                                          "train-00001-of-00002.h5"]
    assert run(verify, [small], capsys)[0] == 0


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written

def corrupt_gzip(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(20, len(blob) - 8, 7):  # scramble the deflate stream, keep the header
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


BAD_SOURCES = {
    "wrong_magic": ("train-images-idx3-ubyte.gz",
                    lambda p: p.write_bytes(gzip.compress(b"\x12\x34" + idx.read_bytes(p)[2:]))),
    "truncated_gzip": ("train-labels-idx1-ubyte.gz", lambda p: p.write_bytes(p.read_bytes()[:-30])),
    "corrupt_gzip": ("train-images-idx3-ubyte.gz", corrupt_gzip),
    "count_mismatch": ("t10k-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros(19, np.uint8))),
    "images_not_3d": ("train-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros((60, 30), np.uint8))),
    "labels_not_1d": ("train-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros((60, 2), np.uint8))),
    "test_size_differs": ("t10k-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros((20, 5, 6), np.uint8))),
    "truncated_idx_data": ("train-images-idx3-ubyte.gz",
                           lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-1]))),
    "not_ubyte": ("train-labels-idx1-ubyte.gz",
                  lambda p: p.write_bytes(gzip.compress(idx_bytes(np.zeros(60, np.uint8), code=0x0C)))),
    "missing_file": ("t10k-images-idx3-ubyte.gz", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_exits_2_and_writes_nothing(case, tmp_path, capsys):
    name, damage = BAD_SOURCES[case]
    src = make_source(tmp_path / "src")
    damage(src / name)
    out = tmp_path / "out"
    before = files_under(tmp_path)
    code, _, err = run(shard, [src, "--out", out, "--shards", "2"], capsys)
    assert_bad_input(code, err, name.split("-idx")[0])
    assert files_under(tmp_path) == before  # no output folder, no temporary file


@pytest.mark.parametrize("args, named", [
    (["--shards", "0"], "--shards"),
    (["--shards", "-3"], "--shards"),
    (["--shards", "61"], "--shards 61"),
    (["--shards", "2", "--val-fraction", "1.5"], "--val-fraction"),
    (["--shards", "2", "--val-fraction", "0.001"], "--val-fraction"),
    (["--shards", "2", "--download", "mnist"], "--download"),
    (["--shards", "2", "--mirror", "http://127.0.0.1:9/"], "--mirror"),
])
def test_bad_numbers_and_flags_exit_2_and_write_nothing(args, named, tmp_path, capsys):
    src = make_source(tmp_path / "src")
    code, _, err = run(shard, [src, "--out", tmp_path / "out", *args], capsys)
    assert_bad_input(code, err, named)
    assert not (tmp_path / "out").exists()


def test_unknown_download_name_exits_2(tmp_path, capsys):
    code, _, err = run(shard, ["--download", "cifar", "--out", tmp_path / "out", "--shards", "2"], capsys)
    assert_bad_input(code, err, "--download cifar", "fashion-mnist")
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    (tmp_path / "out").write_text("not a folder")
    code, _, err = run(shard, [src, "--out", tmp_path / "out", "--shards", "2"], capsys)
    assert_bad_input(code, err, "--out", "not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_existing_output_is_refused_without_force_and_left_alone(small, capsys):
    before = {p: p.read_bytes() for p in small.iterdir()}
    code, _, err = run(shard, [small.parent / "src", "--out", small, "--shards", "3"], capsys)
    assert_bad_input(code, err, str(small), "--force")
    assert {p: p.read_bytes() for p in small.iterdir()} == before


def test_missing_source_folder_and_missing_default(tmp_path, capsys, monkeypatch):
    code, _, err = run(shard, [tmp_path / "nowhere", "--out", tmp_path / "out", "--shards", "2"], capsys)
    assert_bad_input(code, err, "nowhere")
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    code, _, err = run(shard, ["--out", tmp_path / "out", "--shards", "2"], capsys)
    assert_bad_input(code, err, "no-debian", "apt-get install dataset-fashion-mnist")
    assert not (tmp_path / "out").exists()


def test_empty_folder_names_the_missing_file(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    code, _, err = run(shard, [tmp_path / "src", "--out", tmp_path / "out", "--shards", "1"], capsys)
    assert_bad_input(code, err, "train-images-idx3-ubyte")


# ---------------------------------------------------------------- Ctrl-C and failures mid-write

def test_ctrl_c_after_the_first_file_leaves_nothing(tmp_path, capsys, monkeypatch):
    src = make_source(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    real_write = h5format.write_split
    calls = []

    def write_then_interrupt(*args, **kwargs):
        real_write(*args, **kwargs)
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(h5format, "write_split", write_then_interrupt)
    code, _, err = run(shard, [src, "--out", tmp_path / "out", "--shards", "3"], capsys)
    assert code == 130 and "interrupted" in err
    assert len(calls) == 2 and not calls[0].exists()
    assert files_under(tmp_path / "out") == {"notes.txt"}


def test_interrupt_while_renaming_removes_what_was_renamed(tmp_path, capsys, monkeypatch):
    src = make_source(tmp_path / "src")
    real_replace = os.replace
    done = []

    def replace_then_interrupt(a, b):
        if len(done) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)
        done.append(b)

    monkeypatch.setattr(atomic.os, "replace", replace_then_interrupt)
    code, _, _ = run(shard, [src, "--out", tmp_path / "out", "--shards", "3"], capsys)
    assert code == 130
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- verify catches tampering

def test_verify_detects_a_changed_label(small, capsys):
    with h5py.File(small / "train-00001-of-00003.h5", "r+") as f:
        f["labels"][0] = (f["labels"][0] + 1) % 3
    code, _, err = run(verify, [small, "--source", small.parent / "src"], capsys)
    assert code == verify.EXIT_MISMATCH
    assert "train-00001-of-00003.h5" in err and "manifest" in err and "differ from the source" in err


def test_verify_detects_overlapping_shards(small, capsys):
    with h5py.File(small / "train-00000-of-00003.h5", "r+") as f:
        f["source_index"][0] = read_file(small / "train-00002-of-00003.h5")[2][0]
    code, _, err = run(verify, [small], capsys)
    assert code == verify.EXIT_MISMATCH and "repeated" in err


def test_verify_detects_a_changed_attribute(small, capsys):
    with h5py.File(small / "test.h5", "r+") as f:
        f.attrs["mean"] = [0.5]
    code, _, err = run(verify, [small], capsys)
    assert code == verify.EXIT_MISMATCH and "test.h5: attribute mean differs" in err


def test_verify_exits_2_on_a_deleted_shard(small, capsys):
    (small / "train-00001-of-00003.h5").unlink()
    code, _, err = run(verify, [small], capsys)
    assert_bad_input(code, err, "missing train-00001-of-00003.h5")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_verify_exits_2_on_a_corrupt_hdf5_file(small, damage, capsys):
    path = small / "train-00002-of-00003.h5"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\0" * 100 + blob[100:])
    code, _, err = run(verify, [small], capsys)
    assert_bad_input(code, err, path.name)


def test_verify_exits_2_on_a_missing_folder(tmp_path, capsys):
    code, _, err = run(verify, [tmp_path / "nothing"], capsys)
    assert_bad_input(code, err, "nothing")


# ---------------------------------------------------------------- inspect

def test_inspect_summary_without_matplotlib(small, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would now fail
    code, out, err = run(inspect_tool, [small / "train-00000-of-00003.h5"], capsys)
    assert code == 0, err
    assert "16 samples" in out and "classes (samples per class):" in out and "mean/std" in out


def test_inspect_piped_into_head_is_no_error(small):
    import subprocess
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.inspect", str(small / "test.h5")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=repo)
    proc.stdout.close()  # the reader is gone before inspect writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and err == "", err


def test_inspect_prints_the_class_and_pixel_histograms_of_the_file(small, capsys):
    images, labels, _, attrs = read_file(small / "test.h5")
    code, out, err = run(inspect_tool, [small / "test.h5"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    at = lines.index("classes (samples per class):")
    classes = [line.split() for line in lines[at + 1:at + 1 + len(attrs["class_names"])]]
    counts = [int(np.sum(labels == c)) for c in range(len(attrs["class_names"]))]
    assert [int(row[2]) for row in classes] == counts
    assert [len(row[3]) if len(row) > 3 else 0 for row in classes] == [round(30 * c / max(counts)) for c in counts]
    at = lines.index("pixel values (share of all pixels, bins of 32 grey levels):")
    bins = [line.split() for line in lines[at + 1:at + 9]]
    expected, _ = np.histogram(images, bins=8, range=(0, 256))
    assert [row[0] for row in bins] == [f"{lo}-{lo + 31}" for lo in range(0, 256, 32)]
    assert np.allclose([float(row[1].rstrip("%")) for row in bins], 100 * expected / images.size, atol=0.005)
    assert max(len(row[2]) for row in bins if len(row) > 2) == 30  # the fullest bin has the full bar


def test_inspect_grid_writes_a_png(small, tmp_path, capsys):
    from PIL import Image
    code, out, err = run(inspect_tool, [small / "test.h5", "--grid", tmp_path / "grid.png", "--count", "12"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not list(tmp_path.glob("*.tmp-*"))


def test_inspect_exits_2_on_a_corrupt_file(tmp_path, capsys):
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    code, _, err = run(inspect_tool, [tmp_path / "bad.h5"], capsys)
    assert_bad_input(code, err, "bad.h5")


# ---------------------------------------------------------------- download from a local mirror

@pytest.fixture
def serve(tmp_path):
    """serve(folder) -> base URL of an HTTP server on 127.0.0.1 for that folder; stopped after the test."""
    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@needs_debian
def test_download_from_a_local_mirror_checks_and_caches(serve, tmp_path, capsys):
    url = serve(DEBIAN)
    cache, out = tmp_path / "cache", tmp_path / "out"
    code, _, err = run(shard, ["--download", "fashion-mnist", "--mirror", url, "--cache", cache,
                               "--out", out, "--shards", "2"], capsys)
    assert code == 0, err
    assert sorted(files_under(cache)) == sorted(p.name for p in DEBIAN.iterdir())
    assert read_file(out / "test.h5")[3]["dataset"] == "fashion-mnist"
    # The cache is used again without any server (port 9, discard, is closed on loopback).
    paths = shard.download.fetch("fashion-mnist", cache, "http://127.0.0.1:9/")
    assert paths["train_images"] == cache / "train-images-idx3-ubyte.gz"


@needs_debian
def test_download_of_a_corrupted_file_fails_with_hash_mismatch(serve, tmp_path, capsys):
    served = tmp_path / "served"
    served.mkdir()
    for p in DEBIAN.iterdir():
        (served / p.name).symlink_to(p)
    bad = served / "train-labels-idx1-ubyte.gz"
    bad.unlink()
    labels = gzip.decompress((DEBIAN / bad.name).read_bytes())
    bad.write_bytes(gzip.compress(labels[:-1] + bytes([(labels[-1] + 1) % 10])))
    cache, out = tmp_path / "cache", tmp_path / "out"
    code, _, err = run(shard, ["--download", "fashion-mnist", "--mirror", serve(served), "--cache", cache,
                               "--out", out, "--shards", "2"], capsys)
    assert_bad_input(code, err, "train-labels-idx1-ubyte.gz", "sha256 mismatch")
    assert not out.exists()
    assert files_under(cache) == {"train-images-idx3-ubyte.gz"}  # checked good, kept; the bad one never lands


def test_download_without_network_is_one_line(tmp_path, capsys):
    code, _, err = run(shard, ["--download", "mnist", "--mirror", "http://127.0.0.1:9/", "--cache", tmp_path / "c",
                               "--out", tmp_path / "out", "--shards", "2"], capsys)
    assert_bad_input(code, err, "train-images-idx3-ubyte.gz")
    assert not (tmp_path / "out").exists() and files_under(tmp_path / "c") == set()


@needs_debian
def test_known_hashes_recognise_the_debian_files():
    for role, path in idx.find_in_folder(DEBIAN).items():
        raw = gzip.decompress(path.read_bytes())
        assert datasets.FASHION_MNIST.accepts(role, "", hashlib.sha256(raw).hexdigest()), role

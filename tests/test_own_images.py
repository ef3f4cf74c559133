"""Your own images (issue 22): a folder of PNGs or an .npz -> shards -> 2 ranks train -> predict, resume, export.

The images are synthetic 32x32 RGB pictures whose class is the colour of a
square on a noisy background: something lenet learns in a few epochs.
Expected values (pixels, per-channel mean/std, counts) are computed here
from the PNG files themselves, not by the code under test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_tools import shard, verify

Image = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["blue", "green", "red"]  # sorted: the folder names' order is the label order
PER_CLASS = 30
COLOUR = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 230)}


def picture(name: str, rng, size=32) -> np.ndarray:
    """A size x size RGB picture: a square of the class's colour somewhere on dim noise."""
    img = rng.integers(0, 70, (size, size, 3)).astype(np.uint8)
    side = size // 3
    y, x = rng.integers(0, size - side, 2)
    img[y:y + side, x:x + side] = np.clip(np.array(COLOUR[name]) + rng.integers(-20, 21, 3), 0, 255)
    return img


def make_folder(root: Path, per_class=PER_CLASS, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(picture(name, rng)).save(root / name / f"{i:03d}.png")
    (root / "red" / "notes.txt").write_text("not an image: ignored")
    return root


def folder_arrays(root: Path):
    """(images (N, H, W, 3), labels) of the folder, read by Pillow directly in sorted order."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.array(labels)


def read(path: Path):
    with h5py.File(path) as f:
        return f["images"][:], f["labels"][:], f["source_index"][:], dict(f.attrs)


def shard_main(*args) -> int:
    try:
        return shard.main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("own") / "photos")


# ---------------------------------------------------------------- sharding a folder and an .npz

def test_folder_shards_hold_every_picture_once_with_per_channel_stats(photos, tmp_path, capsys):
    out = tmp_path / "data"
    assert shard_main("--from-folder", photos, "--out", out, "--shards", 2, "--stratify",
                      "--val-fraction", 0.1, "--seed", 3) == 0
    assert files_under(out) == {"manifest.json", "test.h5", "val.h5", "train-00000-of-00002.h5",
                                "train-00001-of-00002.h5"}
    images, labels = folder_arrays(photos)
    parts = {p.name: read(p) for p in sorted(out.glob("*.h5"))}
    seen = []
    for name, (x, y, rows, attrs) in parts.items():
        assert x.shape[1:] == (32, 32, 3) and np.array_equal(x, images[rows]) and np.array_equal(y, labels[rows])
        assert json.loads(attrs["class_names"]) == CLASSES and attrs["format_version"] == 2
        seen += list(rows)
    assert sorted(seen) == list(range(3 * PER_CLASS))  # every picture in exactly one file
    test_y = parts["test.h5"][1]
    assert np.bincount(test_y).tolist() == [6, 6, 6]  # the default --test-fraction 0.2, per class
    assert np.bincount(parts["val.h5"][1]).tolist() == [2, 2, 2]  # 0.1 of the 24 left per class, rounded
    train_rows = np.concatenate([parts[f"train-0000{i}-of-00002.h5"][2] for i in range(2)])
    pixels = images[train_rows].reshape(-1, 3).astype(np.float64) / 255
    attrs = parts["test.h5"][3]
    for c in range(3):
        values = pixels[:, c]
        mean = sum(values) / len(values)
        assert attrs["mean"][c] == pytest.approx(mean, rel=1e-9)
        assert attrs["std"][c] == pytest.approx((sum((values - mean) ** 2) / len(values)) ** 0.5, rel=1e-9)
    assert attrs["mean"][2] != pytest.approx(attrs["mean"][1], abs=1e-3)  # three channels, three statistics
    capsys.readouterr()
    assert verify.main([str(out)]) == 0, capsys.readouterr().err
    with h5py.File(out / "val.h5", "r+") as f:  # verify checks the new pooled coverage: a repeated row
        f["source_index"][0] = parts["test.h5"][2][0]
    assert verify.main([str(out)]) == verify.EXIT_MISMATCH and "repeated" in capsys.readouterr().err


def test_the_same_seed_gives_the_same_split_and_another_seed_another(photos, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert shard_main("--from-folder", photos, "--out", tmp_path / name, "--shards", 1, "--seed", seed) == 0
    test = {name: read(tmp_path / name / "test.h5")[2] for name in "abc"}
    assert np.array_equal(test["a"], test["b"]) and not np.array_equal(test["a"], test["c"])


def test_an_npz_of_the_same_pictures_gives_the_same_shards(photos, tmp_path):
    images, labels = folder_arrays(photos)
    np.savez(tmp_path / "mine.npz", images=images, labels=labels, class_names=np.array(CLASSES))
    assert shard_main("--from-folder", photos, "--out", tmp_path / "a", "--shards", 2, "--stratify") == 0
    assert shard_main("--from-npz", tmp_path / "mine.npz", "--out", tmp_path / "b", "--shards", 2, "--stratify") == 0
    for name in ("train-00000-of-00002.h5", "train-00001-of-00002.h5", "test.h5"):
        a, b = read(tmp_path / "a" / name), read(tmp_path / "b" / name)
        for i in range(3):
            assert np.array_equal(a[i], b[i])
        for key in ("mean", "std", "class_names", "image_shape"):
            assert np.array_equal(a[3][key], b[3][key])
    assert read(tmp_path / "b" / "test.h5")[3]["dataset"] == "mine"
    np.savez(tmp_path / "gray.npz", images=images[..., 0], labels=labels)  # (N, H, W): one channel, names 0..2
    assert shard_main("--from-npz", tmp_path / "gray.npz", "--out", tmp_path / "g", "--shards", 1) == 0
    x, _, rows, attrs = read(tmp_path / "g" / "test.h5")
    assert x.shape[1:] == (32, 32, 1) and np.array_equal(x[..., 0], images[rows, ..., 0])
    assert json.loads(attrs["class_names"]) == ["0", "1", "2"] and len(attrs["mean"]) == 1


def test_size_and_colour_mode(tmp_path):
    root = tmp_path / "mixed"
    for name, shape in (("cats", (40, 20, 3)), ("dogs", (24, 24, 3))):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full(shape, 200, np.uint8)).save(root / name / f"{i}.jpg")
    assert shard_main("--from-folder", root, "--size", "16x12", "--grayscale", "--out", tmp_path / "a",
                      "--shards", 1) == 0
    x, _, _, attrs = read(tmp_path / "a" / "test.h5")
    assert x.shape[1:] == (16, 12, 1) and list(attrs["image_shape"]) == [16, 12, 1]
    # 40x20 fitted into 16x12: 16x8, centred on black (2 columns each side)
    cat = x[np.flatnonzero(read(tmp_path / "a" / "test.h5")[1] == 0)[0], ..., 0]
    assert (cat[:, :2] == 0).all() and (cat[:, 10:] == 0).all() and (np.abs(cat[:, 2:10].astype(int) - 200) <= 2).all()
    gray = tmp_path / "gray"
    for name in ("a", "b"):
        (gray / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(gray / name / f"{i}.png")
    assert shard_main("--from-folder", gray, "--out", tmp_path / "g", "--shards", 1) == 0
    assert read(tmp_path / "g" / "test.h5")[0].shape[1:] == (8, 8, 1)  # all grayscale: one channel
    assert shard_main("--from-folder", gray, "--rgb", "--out", tmp_path / "c", "--shards", 1) == 0
    assert read(tmp_path / "c" / "test.h5")[0].shape[1:] == (8, 8, 3)


# ---------------------------------------------------------------- bad inputs: one line naming the file, exit 2, nothing written

def _npz(**arrays):
    def make(root: Path) -> Path:
        np.savez(root / "bad.npz", **arrays)
        return root / "bad.npz"
    return make


def _small_folder(root: Path) -> Path:
    make_folder(root / "photos", per_class=3)
    return root / "photos"


def _text_png(root):
    folder = _small_folder(root)
    (folder / "green" / "000.png").write_text("hello")
    return folder


def _truncated_png(root):
    folder = _small_folder(root)
    path = folder / "blue" / "001.png"
    path.write_bytes(path.read_bytes()[:100])
    return folder


def _mixed_sizes(root):
    folder = _small_folder(root)
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(folder / "red" / "002.png")
    return folder


def _empty_class(root):
    folder = _small_folder(root)
    (folder / "yellow").mkdir()
    (folder / "yellow" / "readme.txt").write_text("no pictures yet")
    return folder


def _one_class(root):
    (root / "only" / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "only" / "cats" / "a.png")
    return root / "only"


RGB = np.zeros((6, 4, 4, 3), np.uint8)
BAD = {  # case: (make the input -> (flag, path), what the line names besides the path)
    "unreadable image": (lambda r: ("--from-folder", _text_png(r)), ("green/000.png", "not an image")),
    "truncated image": (lambda r: ("--from-folder", _truncated_png(r)), ("blue/001.png", "truncated")),
    "mixed sizes": (lambda r: ("--from-folder", _mixed_sizes(r)), ("red/002.png", "--size")),
    "class folder without images": (lambda r: ("--from-folder", _empty_class(r)), ("yellow", "no images")),
    "one class": (lambda r: ("--from-folder", _one_class(r)), ("only", "at least 2")),
    "no folder": (lambda r: ("--from-folder", r / "nowhere"), ("nowhere",)),
    "label out of range": (lambda r: ("--from-npz", _npz(images=RGB, labels=np.array([0, 1, 2, 0, 1, 3]),
                                                         class_names=np.array(["a", "b", "c"]))(r)),
                           ("bad.npz", "label 3")),
    "negative label": (lambda r: ("--from-npz", _npz(images=RGB, labels=np.array([0, 1, -1, 0, 1, 0]))(r)),
                       ("bad.npz", "label -1")),
    "lengths differ": (lambda r: ("--from-npz", _npz(images=RGB, labels=np.array([0, 1, 0, 1, 0]))(r)),
                       ("bad.npz", "6 images but 5 labels")),
    "no labels": (lambda r: ("--from-npz", _npz(images=RGB)(r)), ("bad.npz", "'labels'")),
    "float images": (lambda r: ("--from-npz", _npz(images=RGB.astype(np.float32), labels=np.arange(6) % 2)(r)),
                     ("bad.npz", "uint8")),
    "class names not a list": (lambda r: ("--from-npz", _npz(images=RGB, labels=np.arange(6) % 2,
                                                             class_names=np.array("ab"))(r)),
                               ("bad.npz", "'class_names'")),
    "a class name twice": (lambda r: ("--from-npz", _npz(images=RGB, labels=np.arange(6) % 2,
                                                         class_names=np.array(["a", "a"]))(r)),
                           ("bad.npz", "repeats a name ('a')")),
    "not an npz": (lambda r: ("--from-npz", (r / "bad.npz", (r / "bad.npz").write_text("hi"))[0]),
                   ("bad.npz", "not an .npz archive")),
    "a gap in the labels": (lambda r: ("--from-npz", _npz(images=RGB, labels=np.array([0, 1, 3, 0, 1, 3]))(r)),
                            ("bad.npz", "no images of class 2 of 0..3")),
    "a named class without images": (lambda r: ("--from-npz", _npz(images=RGB, labels=np.arange(6) % 2,
                                                                   class_names=np.array(["a", "b", "c"]))(r)),
                                     ("bad.npz", "no images of class 2 of 0..2", "drop those class names")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_own_input_is_one_line_naming_the_file_and_writes_nothing(case, tmp_path, capsys):
    make, needles = BAD[case]
    flag, path = make(tmp_path)
    before = files_under(tmp_path)
    code = shard_main(flag, path, "--out", tmp_path / "out", "--shards", 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(needle in err[0] for needle in needles), err
    assert files_under(tmp_path) == before  # no output folder, no temporary file


@pytest.mark.parametrize("args, needle", [
    (["--size", "32"], "--size 32: expected HEIGHTxWIDTH"),
    (["--size", "0x4"], "--size 0x4"),
    (["--size", "100000x100000"], "each 1..4096"),
    (["--test-fraction", "1.0"], "--test-fraction must be in (0, 1)"),
    (["--test-fraction", "0.6", "--val-fraction", "0.5"], "leave no training images"),
    (["--test-fraction", "0.01"], "--test-fraction 0.01 of 9 samples selects no sample"),
    (["--grayscale", "--rgb"], "not allowed with argument"),
])
def test_bad_own_flags_exit_2(args, needle, tmp_path, capsys):
    folder = _small_folder(tmp_path)
    code = shard_main("--from-folder", folder, "--out", tmp_path / "out", "--shards", 1, *args)
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_a_bad_size_is_told_before_the_output_folder_is_checked(tmp_path, capsys):
    folder = _small_folder(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "test.h5").write_text("an earlier run")  # would be refused without --force
    code = shard_main("--from-folder", folder, "--out", tmp_path / "out", "--shards", 1, "--size", "32,32")
    assert code == 2 and "--size 32,32: expected HEIGHTxWIDTH" in capsys.readouterr().err


def test_image_flags_without_an_image_source_are_refused(tmp_path, capsys):
    for args in (["--size", "8x8"], ["--rgb"], ["--test-fraction", "0.1"]):
        code = shard_main(tmp_path, "--out", tmp_path / "out", "--shards", 1, *args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"error: {args[0]}: only with --from-folder or --from-npz"), err
    code = shard_main("--from-folder", tmp_path, "--from-npz", tmp_path / "x.npz", "--out", tmp_path / "o", "--shards", 1)
    assert code == 2 and "give one of them" in capsys.readouterr().err


# ---------------------------------------------------------------- the two commands, then predict, resume, export

def run(*args, timeout=300):
    proc = subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_folder_to_trained_model_on_2_ranks_then_predict_resume_and_export(photos, tmp_path):
    data, runs = tmp_path / "data", tmp_path / "run"
    run(sys.executable, "-m", "data_tools.shard", "--from-folder", photos, "--out", data, "--shards", 2, "--stratify",
        "--val-fraction", 0.1)
    train = [REPO / "launch" / "mpirun.sh", "-n", 2, sys.executable, "-m", "ddp_cnn.train", "--data", data,
             "--model", "lenet", "--batch-size", 16, "--lr", 3e-3, "--device", "cpu", "--run-dir", runs,
             "--progress", "off", "--hflip", "--augment-shift", 2]
    run(*train, "--epochs", 6)
    records = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if r["kind"] == "test"]
    assert len(test) == 1 and test[0]["test_count"] == 18 and test[0]["test_acc"] > 0.6  # chance: 1/3

    # predict a new picture of another size: fitted into 32x32 as the shards were, RGB as trained
    rng = np.random.default_rng(99)
    Image.fromarray(np.kron(picture("red", rng), np.ones((2, 2, 1), np.uint8))).save(tmp_path / "red.png")
    np.save(tmp_path / "batch.npy", np.stack([picture(n, rng) for n in CLASSES]))
    out = run(sys.executable, "-m", "ddp_cnn.predict", "--checkpoint", runs, tmp_path / "red.png",
              tmp_path / "batch.npy", "--json").stdout
    results = json.loads(out)
    assert [r["top"][0]["class"] for r in results] == ["red", *CLASSES]
    assert not any(r["inverted"] for r in results)  # auto never inverts an RGB model's input

    # resume for two more epochs: the run continues where it stopped
    run(*train, "--epochs", 8, "--resume", "latest")
    records = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(8))
    assert [r["kind"] for r in records].count("resume") == 1

    # export, and the .npz predicts as the checkpoint does
    run(sys.executable, "-m", "ddp_cnn.export", "--checkpoint", runs, "--out", tmp_path / "colours.npz")
    a = json.loads(run(sys.executable, "-m", "ddp_cnn.predict", "--checkpoint", runs, tmp_path / "batch.npy",
                       "--json").stdout)
    b = json.loads(run(sys.executable, "-m", "ddp_cnn.predict", "--checkpoint", tmp_path / "colours.npz",
                       tmp_path / "batch.npy", "--json").stdout)
    assert a == b and [r["top"][0]["class"] for r in b] == CLASSES
    meta = json.loads(str(np.load(tmp_path / "colours.npz")["meta"][()]))
    assert len(meta["mean"]) == 3 and meta["model"]["input_shape"] == [32, 32, 3]

"""ddp_cnn.data: which rows a rank reads, reproducible shuffles, equal step counts, augmentation, prefetch.

Single-process tests run everywhere; the ``mpi`` ones run under
``mpirun -n N python -m pytest --with-mpi tests/test_data_reader.py`` (N >= 2)
and are written in terms of ``size`` and ``rank`` so they hold for any N.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_tools import h5format
from ddp_cnn.dist.comm import SingleComm
from ddp_cnn.data.pixels import Augment, normalize, random_erase, random_hflip, random_shift
from ddp_cnn.data.shards import DataError, ShardData, find_shards, plan_reads, slice_rows
from ddp_cnn.data.loader import Loader, open_rank_data

SHAPE = (5, 6)
try:
    import pytest_mpi  # noqa: F401  (provides the mpi marker's skipping and the mpi_tmp_path fixture)
    HAVE_PYTEST_MPI = True
except ImportError:
    HAVE_PYTEST_MPI = False
no_pytest_mpi = pytest.mark.skipif(not HAVE_PYTEST_MPI, reason="needs pytest-mpi: pip install pytest-mpi")


# ---------------------------------------------------------------- helpers

def images_for(ids: np.ndarray) -> np.ndarray:
    """Images that carry their sample id in pixels (0,0) and (0,1), and a varied rest."""
    img = ((ids[:, None, None] * 7 + np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE)) % 251).astype(np.uint8)
    img[:, 0, 0], img[:, 0, 1] = ids % 256, ids // 256
    return img


def ids_of(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0].astype(np.int64) + 256 * images[:, 0, 1].astype(np.int64)


def write_run(folder: Path, sizes, test_size=10, sharding_id="run-a", start=0) -> Path:
    """Shard files of the real format with the given (deliberately unequal) sizes, plus test.h5."""
    folder.mkdir(parents=True, exist_ok=True)
    common = {"format_version": 1, "dataset": "toy", "class_names": ["a", "b", "c"],
              "num_train_total": sum(sizes), "num_val_total": 0, "num_test_total": test_size,
              "source_sha256": {}, "mean": 0.25, "std": 0.5, "seed": 0, "stratified": False,
              "sharding_id": sharding_id, "image_shape": list(SHAPE)}
    ids = np.arange(sum(sizes)) + start
    for i, part in enumerate(np.split(ids, np.cumsum(sizes)[:-1])):
        h5format.write_split(folder / h5format.shard_name(i, len(sizes)), images_for(part), part % 3, part,
                             {**common, "split": "train", "shard_index": i, "shard_count": len(sizes)})
    test = np.arange(test_size)
    h5format.write_split(folder / "test.h5", images_for(test), test % 3, test,
                         {**common, "split": "test", "shard_index": 0, "shard_count": 1})
    return folder


def memory_data(n=40, seed=0, mean=0.3, std=0.2) -> ShardData:
    ids = np.arange(n)
    images = images_for(ids)
    images[:, 1:, :] = np.random.default_rng(seed).integers(0, 256, (n, SHAPE[0] - 1, SHAPE[1]), dtype=np.uint8)
    return ShardData(images, ids % 3, {"mean": mean, "std": std})


def pixels_of(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.rint((x[..., 0].astype(np.float64) * std + mean) * 255).astype(np.int64)


def batches(loader: Loader, epoch: int, start_step: int = 0):
    return [(x.copy(), y.copy()) for x, y in loader.epoch(epoch, start_step)]


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "ddp_cnn-prefetch"]


# ---------------------------------------------------------------- which rows a rank reads

def test_find_shards_sorted_and_complete(tmp_path):
    write_run(tmp_path, [3, 4, 5])
    assert [p.name for p in find_shards(tmp_path)] == [h5format.shard_name(i, 3) for i in range(3)]
    (tmp_path / "train-00001-of-00003.h5").unlink()
    with pytest.raises(DataError, match="missing train-00001-of-00003.h5"):
        find_shards(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no training shards"):
        find_shards(tmp_path / "empty")


def test_mixed_shard_counts_are_refused(tmp_path):
    write_run(tmp_path, [3, 4])
    write_run(tmp_path / "x", [2, 2, 2])
    (tmp_path / "x" / "train-00000-of-00003.h5").rename(tmp_path / "train-00000-of-00003.h5")
    with pytest.raises(DataError, match="mixed"):
        find_shards(tmp_path)


@pytest.mark.parametrize("m, size, expect", [
    (4, 4, {0: [0], 3: [3]}),
    (6, 3, {0: [0, 3], 1: [1, 4], 2: [2, 5]}),
    (2, 1, {0: [0, 1]}),
])
def test_shards_are_dealt_to_ranks(tmp_path, m, size, expect):
    write_run(tmp_path, [5] * m)
    for rank, shards in expect.items():
        reads = plan_reads(tmp_path, "train", rank, size, slice_single=False)
        assert [(p.name, a, b) for p, a, b in reads] == [(h5format.shard_name(i, m), None, None) for i in shards]


@pytest.mark.parametrize("m, size", [(2, 3), (1, 4), (4, 3)])
def test_shards_that_do_not_divide_among_ranks_are_an_error_naming_both(tmp_path, m, size):
    write_run(tmp_path, [5] * m)
    with pytest.raises(DataError, match=rf"{m} training shards.* {size} ranks.*--shards {size}"):
        plan_reads(tmp_path, "train", 0, size, slice_single=False)


def test_slice_single_cuts_one_file_by_rank(tmp_path):
    write_run(tmp_path, [10])
    reads = [plan_reads(tmp_path, "train", r, 3, slice_single=True) for r in range(3)]
    assert [[(a, b) for _, a, b in r] for r in reads] == [[(0, 3)], [(3, 6)], [(6, 10)]]


@pytest.mark.parametrize("counts, size", [([10], 3), ([4, 0, 7], 4), ([3, 3], 7), ([5], 1)])
def test_slices_give_every_row_to_exactly_one_rank(counts, size):
    seen = []
    for rank in range(size):
        for i, a, b in slice_rows(counts, rank, size):
            seen += [(i, j) for j in range(a, b)]
    assert sorted(seen) == [(i, j) for i, n in enumerate(counts) for j in range(n)]


def test_open_rank_data_reads_the_rows_and_decodes_attrs(tmp_path):
    write_run(tmp_path, [7, 9])  # format version 1: (n, H, W) images, scalar mean/std
    data = open_rank_data(tmp_path, "train", SingleComm())  # one rank: both shards
    assert len(data) == 16 and data.images.dtype == np.uint8 and data.labels.dtype == np.int64
    assert data.images.shape == (16, *SHAPE, 1)  # read as one channel
    assert np.array_equal(ids_of(data.images[..., 0]), np.arange(16))
    assert np.array_equal(data.source_index, np.arange(16))
    assert data.attrs["class_names"] == ["a", "b", "c"] and data.attrs["image_shape"] == (*SHAPE, 1)
    assert (data.attrs["mean"], data.attrs["std"]) == ((0.25,), (0.5,))
    test = open_rank_data(tmp_path, "test", SingleComm())
    assert len(test) == 10
    with pytest.raises(DataError, match="val.h5.*--val-fraction"):
        open_rank_data(tmp_path, "val", SingleComm())


@pytest.mark.parametrize("damage", ["garbage", "truncate", "no_labels", "labels_float", "no_attr"])
def test_a_corrupt_shard_raises_data_error_naming_it(tmp_path, damage):
    write_run(tmp_path, [6])
    path = tmp_path / "train-00000-of-00001.h5"
    blob = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"garbage" * 100)
    elif damage == "truncate":
        path.write_bytes(blob[: len(blob) * 2 // 3])
    else:
        with h5py.File(path, "r+") as f:
            if damage == "no_labels":
                del f["labels"]
            elif damage == "labels_float":
                del f["labels"]
                f["labels"] = np.zeros(6, np.float32)
            else:
                del f.attrs["sharding_id"]
    with pytest.raises(DataError, match="train-00000-of-00001.h5"):
        open_rank_data(tmp_path, "train", SingleComm())


# ---------------------------------------------------------------- batches: normalisation, shuffle, resume

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batches_are_normalised_with_the_stored_mean_and_std(dtype):
    data = memory_data(10)
    loader = Loader(data, batch_size=4, comm=SingleComm(), seed=0, dtype=dtype, shuffle=False)
    x, y = next(iter(loader.epoch(0)))
    assert x.shape == (4, *SHAPE, 1) and x.dtype == dtype and y.dtype == np.int64
    expect = (data.images[:4, ..., None].astype(np.float64) / 255 - 0.3) / 0.2
    np.testing.assert_allclose(x, expect, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert np.array_equal(y, data.labels[:4])
    x2, _ = next(iter(Loader(data, batch_size=4, comm=SingleComm(), seed=0, shuffle=False,
                             mean=0.0, std=1.0).epoch(0)))
    np.testing.assert_allclose(x2[..., 0], data.images[:4] / 255, rtol=1e-6)


# Written out by hand, not computed by the code under test: (p/255 - 0.25)/0.5 for the pixels
# p = 0, 51, 102, 255 (p/255 = 0, 0.2, 0.4, 1).
HAND_PIXELS = np.array([[0, 51], [102, 255]], np.uint8)
HAND_INPUT = np.array([[-0.5, -0.1], [0.3, 1.5]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loader_batches_and_normalize_equal_the_hand_computed_input(dtype):
    images = np.stack([HAND_PIXELS, HAND_PIXELS[::-1], HAND_PIXELS.T])  # (3, 2, 2)
    expect = np.stack([HAND_INPUT, HAND_INPUT[::-1], HAND_INPUT.T])[..., None]  # (3, 2, 2, 1): channels last
    atol = 1e-6 if dtype == np.float32 else 1e-12
    data = ShardData(images, np.arange(3), {"mean": 0.25, "std": 0.5})
    x, _ = next(iter(Loader(data, batch_size=3, comm=SingleComm(), seed=0, dtype=dtype, shuffle=False).epoch(0)))
    assert x.shape == (3, 2, 2, 1) and x.dtype == dtype
    np.testing.assert_allclose(x, expect, rtol=0, atol=atol)
    # uint8 0..255 or float 0..1, with or without the channel axis: the same model input
    for pixels in (images, images[..., None], images / 255, (images / 255).astype(np.float32)):
        out = normalize(pixels, 0.25, 0.5, dtype)
        assert out.shape == (3, 2, 2, 1) and out.dtype == dtype
        tol = atol if pixels.dtype == np.uint8 else max(atol, 4 * np.finfo(pixels.dtype).eps)  # 0.2 in float32
        np.testing.assert_allclose(out, expect, rtol=0, atol=tol)
    assert x.tobytes() == normalize(images, 0.25, 0.5, dtype).tobytes()  # one normalisation, bit for bit
    assert normalize(images, np.float64(0.25), np.float64(0.5), dtype).tobytes() == x.tobytes()


def test_normalize_is_per_channel_by_hand():
    pixels = np.array([[[[0, 51, 255], [102, 255, 0]]]], np.uint8)  # (1, 1, 2, 3)
    # (p/255 - mean_c)/std_c with means (0.25, 0.2, 0.5) and stds (0.5, 0.4, 0.25), written out:
    expect = np.array([[[[-0.5, 0.0, 2.0], [0.3, 2.0, -2.0]]]])
    out = normalize(pixels, [0.25, 0.2, 0.5], (0.5, 0.4, 0.25), np.float64)
    assert out.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-12)
    same = normalize(pixels[..., :1], 0.25, 0.5, np.float64)  # a scalar is one channel's value
    assert same.tobytes() == normalize(pixels[..., :1], [0.25], [0.5], np.float64).tobytes()
    with pytest.raises(ValueError, match="2/2 values for 3 channels"):
        normalize(pixels, [0.25, 0.2], [0.5, 0.4], np.float64)
    with pytest.raises(ValueError, match="std must be a number > 0"):
        normalize(pixels, [0.25, 0.2, 0.5], [0.5, 0.0, 0.25], np.float64)


def test_loader_normalizes_rgb_per_channel_and_erases_to_each_channels_mean():
    images = np.zeros((4, 6, 5, 3), np.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 255, 51, 0
    data = ShardData(images, np.arange(4) % 2, {"mean": (0.2, 0.4, 0.6), "std": (0.5, 0.5, 0.5)})
    loader = Loader(data, batch_size=4, comm=SingleComm(), seed=0, dtype=np.float64, shuffle=False)
    x, _ = next(iter(loader.epoch(0)))
    assert x.shape == (4, 6, 5, 3)
    np.testing.assert_allclose(x[0, 0, 0], [(1 - 0.2) / 0.5, (0.2 - 0.4) / 0.5, (0 - 0.6) / 0.5], atol=1e-12)
    erasing = Loader(data, batch_size=4, comm=SingleComm(), seed=0, dtype=np.float64, shuffle=False,
                     augment=Augment(erase=1.0))
    x, _ = next(iter(erasing.epoch(0)))
    pixels = np.rint((x * 0.5 + [0.2, 0.4, 0.6]) * 255)
    filled = (pixels != [255, 51, 0]).any(axis=-1)
    assert filled.any(axis=(1, 2)).all()  # erase=1: a rectangle in every image...
    assert (pixels[filled] == [51, 102, 153]).all()  # ...at round(mean_c * 255) in each channel
    with pytest.raises(DataError, match="3/3 values for 1 channels"):
        Loader(ShardData(images[..., :1], np.arange(4), data.attrs), batch_size=2, comm=SingleComm(), seed=0)


def test_normalize_refuses_pixels_it_cannot_read():
    with pytest.raises(ValueError, match="dtype int64"):
        normalize(np.zeros((1, 2, 2), np.int64), 0.25, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        normalize(np.zeros((2, 2), np.uint8), 0.25, 0.5, np.float32)


def test_evaluate_takes_the_loader_batches_as_they_come_for_a_cnn_and_an_mlp():
    from ddp_cnn.model import layers as L
    from ddp_cnn import model as model_mod
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.run.evaluation import evaluate
    data = memory_data(10)
    backend = get_backend("cpu", "float64")
    cnn = model_mod.Sequential([L.Conv2D(2, 3, padding="same"), L.ReLU(), L.Flatten(), L.Dense(3)],
                               (*SHAPE, 1), backend, seed=1)
    mlp = model_mod.build("mlp", backend, seed=1, input_shape=(*SHAPE, 1), num_classes=3)  # Flatten first
    x = ((data.images / 255 - 0.3) / 0.2)[..., None]
    for model in (cnn, mlp):
        loader = Loader(data, batch_size=4, comm=SingleComm(), seed=0, dtype=np.float64, shuffle=False,
                        drop_last=False)
        result = evaluate(model, loader, SingleComm(), 3)
        pred = model.forward(x).argmax(axis=1)
        assert result["count"] == 10
        assert result["accuracy"] == pytest.approx(np.mean(pred == data.labels), abs=1e-12)
        assert np.array_equal(np.diag(result["confusion"]), np.bincount(data.labels[pred == data.labels],
                                                                        minlength=3))


def test_shuffle_is_reproducible_and_depends_on_seed_and_epoch():
    data = memory_data(40)

    def order(seed, epoch):
        loader = Loader(data, batch_size=8, comm=SingleComm(), seed=seed)
        return np.concatenate([pixels_of(x, 0.3, 0.2)[:, 0, 0] for x, _ in loader.epoch(epoch)])

    assert np.array_equal(order(1, 0), order(1, 0))
    assert not np.array_equal(order(1, 0), order(2, 0))
    assert not np.array_equal(order(1, 0), order(1, 1))
    assert len(set(order(1, 0))) == 40  # an epoch is a permutation: no sample twice


def test_drop_last_false_covers_every_sample_once_in_order():
    data = memory_data(10)
    loader = Loader(data, batch_size=4, comm=SingleComm(), seed=0, shuffle=False, drop_last=False)
    got = batches(loader, 0)
    assert loader.steps_per_epoch == 3 and [len(y) for _, y in got] == [4, 4, 2]
    assert np.array_equal(np.concatenate([pixels_of(x, 0.3, 0.2)[:, 0, 0] for x, _ in got]), np.arange(10))


def test_resume_mid_epoch_gives_bitwise_the_same_batches():
    data = memory_data(50)
    aug = Augment(shift=2, hflip=True, erase=0.5)

    def loader(prefetch):
        return Loader(data, batch_size=6, comm=SingleComm(), seed=5, augment=aug, prefetch=prefetch)

    full = batches(loader(2), 3)
    resumed = batches(loader(2), 3, start_step=4)
    assert len(full) == 8 and len(resumed) == 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed):
        assert xa.tobytes() == xb.tobytes() and ya.tobytes() == yb.tobytes()
    synchronous = batches(loader(0), 3)
    assert all(a[0].tobytes() == b[0].tobytes() for a, b in zip(full, synchronous))
    assert batches(loader(2), 3, start_step=8) == []


def test_bad_loader_arguments_are_data_errors():
    data = memory_data(10)
    with pytest.raises(DataError, match="smaller batch size or fewer ranks"):
        Loader(data, batch_size=11, comm=SingleComm(), seed=0)
    with pytest.raises(DataError, match="start_step"):
        Loader(data, batch_size=2, comm=SingleComm(), seed=0).epoch(0, start_step=6)
    with pytest.raises(DataError, match="batch size"):
        Loader(data, batch_size=0, comm=SingleComm(), seed=0)
    with pytest.raises(DataError, match="shift"):
        Augment(shift=-1)


# ---------------------------------------------------------------- augmentation

def test_shift_translates_the_content_with_zero_fill():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 8, 9), dtype=np.uint8)  # no zero pixel: the fill is recognisable
    out = random_shift(images, 2, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    moves = set()
    for img, got in zip(images, out):
        padded = np.pad(img, 2)
        match = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(padded[dy:dy + 8, dx:dx + 9], got)]
        assert len(match) == 1
        moves.add(match[0])
    assert len(moves) > 10 and (2, 2) in moves  # many translations, including none
    assert np.array_equal(Augment()(images, rng), images)


def test_augmentations_move_every_channel_alike_with_the_grayscale_draws():
    """An RGB image is changed as its channels would be one by one, with the same random draws (all of
    them of size b = len(images), batch last), so the channel count never shifts a draw."""
    rgb = np.random.default_rng(0).integers(1, 256, (16, 8, 9, 3), dtype=np.uint8)
    fill = np.array([7, 8, 9], np.uint8)
    for c in range(3):
        gray = rgb[..., c]
        pairs = [(random_shift(rgb, 2, np.random.default_rng(1)), random_shift(gray, 2, np.random.default_rng(1))),
                 (random_hflip(rgb, np.random.default_rng(3)), random_hflip(gray, np.random.default_rng(3))),
                 (random_erase(rgb, 0.5, np.random.default_rng(2), fill),
                  random_erase(gray, 0.5, np.random.default_rng(2), fill[c])),
                 (Augment(2, True, 0.5)(rgb, np.random.default_rng(4), fill),
                  Augment(2, True, 0.5)(gray, np.random.default_rng(4), fill[c]))]
        for colour, one in pairs:
            assert colour.shape == rgb.shape and colour.dtype == np.uint8 and colour.flags.c_contiguous
            assert np.array_equal(colour[..., c], one)
    erased = random_erase(rgb, 1.0, np.random.default_rng(2), fill)
    assert ((erased == fill).all(axis=-1) == (erased != rgb).any(axis=-1)).all()  # whole pixels, all channels


def test_hflip_mirrors_about_half_the_images():
    images = np.random.default_rng(0).integers(0, 256, (200, 4, 7), dtype=np.uint8)
    out = random_hflip(images, np.random.default_rng(3))
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    assert (flipped | same).all() and 60 < flipped.sum() < 140


def test_erase_blanks_one_rectangle_per_chosen_image():
    images = np.full((100, 10, 12), 200, np.uint8)
    out = random_erase(images, 0.5, np.random.default_rng(2), fill=7)
    erased = 0
    for img in out:
        ys, xs = np.nonzero(img == 7)
        assert set(np.unique(img)) <= {7, 200}
        if len(ys):
            erased += 1
            box = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            assert (box == 7).all()  # one filled rectangle
    assert 30 < erased < 70


# ---------------------------------------------------------------- prefetch thread

class Boom(RuntimeError):
    pass


def test_an_exception_in_the_prefetch_thread_reaches_the_consumer():
    class Exploding(Augment):
        def __call__(self, images, rng, fill=0):
            if images[0, 0, 0] == 255:
                raise Boom("bad batch")
            return images

    data = memory_data(12)
    data.images[8:, 0, 0] = 255  # batch 2 (shuffle off) explodes
    loader = Loader(data, batch_size=4, comm=SingleComm(), seed=0, shuffle=False, augment=Exploding())
    got = []
    with pytest.raises(Boom, match="bad batch"):
        for batch in loader.epoch(0):
            got.append(batch)
    assert len(got) == 2
    time.sleep(0.05)
    assert not prefetch_threads()


def test_closing_an_epoch_early_stops_the_thread_without_hanging():
    data = memory_data(400)
    loader = Loader(data, batch_size=4, comm=SingleComm(), seed=0, prefetch=2)
    gen = loader.epoch(0)
    next(gen)
    time.sleep(0.05)  # let the producer fill the queue and block on it
    assert prefetch_threads()
    started = time.perf_counter()
    gen.close()
    assert time.perf_counter() - started < 2 and not prefetch_threads()
    for _ in zip(range(3), loader.epoch(1)):  # a `break`-like early exit, then the generator is dropped
        pass
    time.sleep(0.3)
    assert not prefetch_threads()


# ---------------------------------------------------------------- several ranks (mpirun -n N, N >= 2)

def _mpi():
    from ddp_cnn.dist.comm import MPIComm
    return MPIComm()


def _on_root_then_wait(comm, make):
    """Rank 0 writes the files; the others wait for them (all ranks learn whether it worked)."""
    error = None
    if comm.rank == 0:
        try:
            make()
        except Exception as exc:  # report on every rank instead of leaving them in bcast
            error = repr(exc)
    error = comm.bcast_obj(error)
    assert error is None, error


@pytest.mark.mpi(min_size=2)
@no_pytest_mpi
def test_unequal_shards_give_every_rank_the_same_step_count(mpi_tmp_path):
    comm = _mpi()
    sizes = [9 + 5 * r + (r % 2) for r in range(comm.size)]  # 9, 15, 21, ... deliberately unequal
    _on_root_then_wait(comm, lambda: write_run(mpi_tmp_path, sizes))
    data = open_rank_data(mpi_tmp_path, "train", comm)
    loader = Loader(data, batch_size=4, comm=comm, seed=3, augment=Augment(shift=1))
    walked = sum(1 for _ in loader.epoch(0))
    everyone = comm.allgather_obj((len(data), loader.steps_per_epoch, walked, data.source_index.tolist()))
    assert [n for n, *_ in everyone] == sizes
    assert {(steps, w) for _, steps, w, _ in everyone} == {(sizes[0] // 4, sizes[0] // 4)}
    rows = [r for *_, rs in everyone for r in rs]
    assert sorted(rows) == list(range(sum(sizes)))  # shards disjoint, covering


@pytest.mark.mpi(min_size=2)
@no_pytest_mpi
def test_each_rank_shuffles_differently_but_reproducibly(mpi_tmp_path):
    comm = _mpi()
    _on_root_then_wait(comm, lambda: write_run(mpi_tmp_path, [20] * comm.size))
    data = open_rank_data(mpi_tmp_path, "train", comm)
    loader = Loader(data, batch_size=5, comm=comm, seed=1)
    positions = [loader.order(0).tolist() for _ in range(2)]
    everyone = comm.allgather_obj(positions)
    assert all(a == b for a, b in everyone)
    assert len({tuple(a) for a, _ in everyone}) == comm.size


@pytest.mark.mpi(min_size=2)
@no_pytest_mpi
def test_test_split_is_sliced_so_every_sample_is_on_one_rank(mpi_tmp_path):
    comm = _mpi()
    _on_root_then_wait(comm, lambda: write_run(mpi_tmp_path, [4] * comm.size, test_size=23))
    data = open_rank_data(mpi_tmp_path, "test", comm)
    loader = Loader(data, batch_size=4, comm=comm, seed=0, shuffle=False, drop_last=False)
    seen = [int(i) for x, _ in loader.epoch(0) for i in pixels_of(x, 0.25, 0.5)[:, 0, 0]]
    everyone = comm.allgather_obj(seen)
    assert sorted(i for s in everyone for i in s) == list(range(23))


@pytest.mark.mpi(min_size=2)
@no_pytest_mpi
def test_twice_as_many_shards_as_ranks_gives_two_each(mpi_tmp_path):
    comm = _mpi()
    _on_root_then_wait(comm, lambda: write_run(mpi_tmp_path, [3 + i for i in range(2 * comm.size)]))
    data = open_rank_data(mpi_tmp_path, "train", comm)
    names = [p.name for p in data.paths]
    assert names == [h5format.shard_name(comm.rank, 2 * comm.size), h5format.shard_name(comm.rank + comm.size,
                                                                                          2 * comm.size)]


@pytest.mark.mpi(min_size=2)
@no_pytest_mpi
def test_fewer_shards_than_ranks_fails_on_every_rank_unless_sliced(mpi_tmp_path):
    comm = _mpi()
    _on_root_then_wait(comm, lambda: write_run(mpi_tmp_path, [30]))
    with pytest.raises(DataError, match=rf"1 training shards for {comm.size} ranks"):
        open_rank_data(mpi_tmp_path, "train", comm)
    data = open_rank_data(mpi_tmp_path, "train", comm, slice_single=True)
    everyone = comm.allgather_obj(data.source_index.tolist())
    assert [r for rows in everyone for r in rows] == list(range(30))


@pytest.mark.mpi(min_size=2)
@no_pytest_mpi
def test_a_bad_shard_on_one_rank_raises_on_every_rank(mpi_tmp_path):
    comm = _mpi()

    def make():
        write_run(mpi_tmp_path, [5] * comm.size)
        (mpi_tmp_path / h5format.shard_name(comm.size - 1, comm.size)).write_bytes(b"broken")

    _on_root_then_wait(comm, make)
    with pytest.raises(DataError, match=h5format.shard_name(comm.size - 1, comm.size)):
        open_rank_data(mpi_tmp_path, "train", comm)


@pytest.mark.mpi(min_size=2)
@no_pytest_mpi
def test_shards_of_different_runs_are_refused_on_every_rank(mpi_tmp_path):
    comm = _mpi()

    def make():
        write_run(mpi_tmp_path, [5] * comm.size, sharding_id="run-a")
        write_run(mpi_tmp_path / "b", [5] * comm.size, sharding_id="run-b")
        last = h5format.shard_name(comm.size - 1, comm.size)
        (mpi_tmp_path / "b" / last).replace(mpi_tmp_path / last)

    _on_root_then_wait(comm, make)
    with pytest.raises(DataError, match="different sharding runs"):
        open_rank_data(mpi_tmp_path, "train", comm)


# ---------------------------------------------------------------- GPU (CuPy): batches land on the caller's device

def _cupy():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception:  # no CuPy, or no CUDA device/driver
        return None


@pytest.mark.gpu
@pytest.mark.skipif(_cupy() is None, reason="needs CuPy and a CUDA GPU")
def test_prefetched_gpu_batches_equal_the_cpu_ones():
    cp = _cupy()
    data = memory_data(64)
    aug = Augment(shift=2, erase=0.3)
    cpu = Loader(data, batch_size=16, comm=SingleComm(), seed=2, augment=aug)
    gpu = Loader(data, batch_size=16, comm=SingleComm(), seed=2, augment=aug, xp=cp)
    for (xc, yc), (xg, yg) in zip(cpu.epoch(1), gpu.epoch(1)):
        assert isinstance(xg, cp.ndarray) and xg.device.id == cp.cuda.Device().id
        np.testing.assert_allclose(cp.asnumpy(xg), xc, rtol=1e-6, atol=1e-6)
        assert np.array_equal(cp.asnumpy(yg), yc)

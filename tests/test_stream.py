"""Streamed shards (issue 28): bounded memory as the data grows, the block shuffle (every row once an
epoch, the same global batches on any rank count, resume mid-epoch), the cache's refusals, and a damaged
or truncated chunk met mid-run (named, exit 2, no hang) under a real mpirun."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.dist.comm import SingleComm
from ddp_cnn.data.shards import DataError
from ddp_cnn.data.loader import Loader, open_rank_data
from ddp_cnn.data.stream import ChunkCache, block_order
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


class RankOf:
    """The rank/size a Loader sees for rank ``rank`` of ``size`` (the global order needs no exchange)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def allreduce_scalar(self, value, op):
        return value


def streamed(folder, split="train", order="shard", mb=64, comm=None):
    return open_rank_data(folder, split, comm or SingleComm(), data_order=order, stream=True,
                          cache=ChunkCache(mb * 2**20))


# ---- the block shuffle ---------------------------------------------------------

def test_block_order_is_a_permutation_with_each_window_of_chunks_contiguous():
    chunk_of_row = np.repeat(np.arange(10), [7, 7, 7, 7, 7, 7, 7, 7, 7, 3])
    for window in (0, 1, 3, 10):
        order = block_order(np.random.default_rng(5), chunk_of_row, window)
        assert np.array_equal(np.sort(order), np.arange(len(chunk_of_row)))  # every row once
        chunks = chunk_of_row[order]
        seen = list(dict.fromkeys(chunks.tolist()))  # chunks in first-use order
        groups = [set(seen[i:i + (window or 10)]) for i in range(0, 10, window or 10)]
        start = 0
        for group in groups:  # rows of a window's chunks come together, in one stretch of the order
            size = sum(int((chunk_of_row == c).sum()) for c in group)
            assert set(chunks[start:start + size].tolist()) == group, window
            start += size
    one = block_order(np.random.default_rng(5), chunk_of_row, 3)
    assert np.array_equal(one, block_order(np.random.default_rng(5), chunk_of_row, 3))
    assert not np.array_equal(one, block_order(np.random.default_rng(6), chunk_of_row, 3))


@pytest.mark.parametrize("order", ["shard", "global"])
def test_a_streamed_epoch_reads_every_row_once_as_the_in_memory_data_holds_it(tmp_path, order):
    data_dir = make_synthetic_shards(tmp_path / "data", 2, n_train=1500)  # chunks of 512: short ones too
    data = streamed(data_dir, order=order, mb=2)
    whole = open_rank_data(data_dir, "train", SingleComm(), data_order=order)
    assert np.array_equal(data.labels, whole.labels)
    for window in (1, 2, 0):
        loader = Loader(data, batch_size=50, comm=SingleComm(), seed=4, data_order=order, window=window,
                        dtype=np.float64, drop_last=False)
        seen = []
        for step, (x, y) in enumerate(loader.epoch(1)):
            rows = loader.rows(loader.order(1), step)
            expected, _ = loader.to_device(whole.images[rows], whole.labels[rows])
            assert np.array_equal(x, expected) and np.array_equal(y, whole.labels[rows])
            seen.append(rows)
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(whole)))  # every row, once
        assert data.images.cache.used <= 2 * 2**20 or window == 0


def test_the_global_streamed_order_gives_the_same_global_batches_on_1_to_4_ranks_and_resumes(tmp_path):
    data_dir = make_synthetic_shards(tmp_path / "data", 3, n_train=1400)
    data = streamed(data_dir, order="global", mb=8)
    kw = dict(seed=9, data_order="global", window=2, dtype=np.float64, global_batch=60, prefetch=1)
    whole = [x for x, _ in Loader(data, batch_size=60, comm=RankOf(0, 1), **kw).epoch(3)]
    assert len(whole) == len(data) // 60
    for size in (2, 3, 4):
        parts = []
        for rank in range(size):
            share = (rank + 1) * 60 // size - rank * 60 // size
            loader = Loader(data, batch_size=share, comm=RankOf(rank, size), **kw)
            parts.append([x for x, _ in loader.epoch(3, start_step=5)])  # resumed mid-epoch, on `size` ranks
        for step, pieces in enumerate(zip(*parts)):
            assert np.array_equal(np.concatenate(pieces), whole[5 + step]), (size, step)
    # The shard order draws per rank: its global batches differ, so the comparison above can fail.
    shard = Loader(streamed(data_dir, mb=8), batch_size=60, comm=RankOf(1, 2), seed=9, window=2)
    assert not np.array_equal(shard.order(3), Loader(data, batch_size=60, comm=RankOf(0, 1), **kw).order(3))


def test_a_resumed_streamed_epoch_continues_with_the_batches_of_the_whole_epoch(tmp_path):
    data_dir = make_synthetic_shards(tmp_path / "data", 1, n_train=1100)
    loader = Loader(streamed(data_dir, mb=4), batch_size=32, comm=SingleComm(), seed=2, window=1,
                    dtype=np.float64)
    whole = [x for x, _ in loader.epoch(0)]
    tail = [x for x, _ in loader.epoch(0, start_step=13)]
    assert len(tail) == len(whole) - 13 and all(np.array_equal(a, b) for a, b in zip(tail, whole[13:]))
    assert not np.array_equal(loader.order(0), loader.order(1))  # seeded per epoch


# ---- memory ----------------------------------------------------------------------

PEAK = r"""
import json, sys
import numpy as np
from ddp_cnn.dist.comm import SingleComm
from ddp_cnn.data.loader import Loader, open_rank_data
from ddp_cnn.data.stream import ChunkCache
folder, stream = sys.argv[1], sys.argv[2] == "stream"
data = open_rank_data(folder, "train", SingleComm(), stream=stream, cache=ChunkCache(8 * 2**20))
loader = Loader(data, batch_size=64, comm=SingleComm(), seed=0, window=4, prefetch=2)
rows = sum(len(y) for _, y in loader.epoch(0))
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] * 1024
print(json.dumps({"rows": rows, "peak": peak}))
"""


def peak_rss(folder, mode):
    proc = subprocess.run([sys.executable, "-c", PEAK, str(folder), mode], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_peak_memory_stays_bounded_as_the_data_grows_8_times(tmp_path):
    small = make_synthetic_shards(tmp_path / "small", 1, n_train=2000, n_test=10, size=64)
    large = make_synthetic_shards(tmp_path / "large", 1, n_train=16000, n_test=10, size=64)
    growth = 14000 * 64 * 64  # bytes of images added
    streamed_small, streamed_large = peak_rss(small, "stream"), peak_rss(large, "stream")
    assert streamed_large["rows"] >= 15900  # the epoch read the large set
    in_memory_small, in_memory_large = peak_rss(small, "memory"), peak_rss(large, "memory")
    # The in-memory loader holds the images: its peak grows by their size, so the bound can fail.
    assert in_memory_large["peak"] - in_memory_small["peak"] > 0.75 * growth
    assert streamed_large["peak"] - streamed_small["peak"] < 0.25 * growth, (streamed_small, streamed_large)


# ---- refusals and damaged data ---------------------------------------------------------

def test_a_cache_too_small_for_one_batch_is_refused_with_the_size_it_needs(tmp_path, capsys):
    data_dir = make_synthetic_shards(tmp_path / "data", 1)
    with pytest.raises(DataError, match=r"--data-cache-mb 0\.5: too small for one batch of 64 .* give "
                                        r"--data-cache-mb 1 or more"):
        Loader(streamed(data_dir, mb=0.5), batch_size=64, comm=SingleComm(), seed=0, window=1)
    from ddp_cnn.cli.train import main
    code = main(["--data", str(data_dir), "--device", "cpu", "--progress", "off", "--run-dir", str(tmp_path / "r"),
                 "--batch-size", "64", "--data-cache-mb", "0.5", "--shuffle-window", "1", "--comm", "single"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "too small for one batch" in err, err


def test_a_run_prints_its_cache_and_logs_each_epochs_data_wait(tmp_path, capsys):
    from ddp_cnn.cli.train import main
    data_dir = make_synthetic_shards(tmp_path / "data", 2)
    flags = ["--data", str(data_dir), "--device", "cpu", "--progress", "off", "--batch-size", "64", "--epochs", "2",
             "--eval-every", "0", "--comm", "single"]
    assert main(flags + ["--run-dir", str(tmp_path / "given"), "--data-cache-mb", "24"]) == 0
    out = capsys.readouterr().out
    assert "chunk cache 24 MB per rank (--data-cache-mb), shuffle window 16 chunks" in out, out
    assert main(flags + ["--run-dir", str(tmp_path / "default")]) == 0
    assert "MB per rank (default: 1/8 of the memory available, per rank)" in capsys.readouterr().out
    epochs = [json.loads(line) for line in (tmp_path / "given" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(epochs) == 2 and all(0 <= e["data_wait_seconds"] <= e["seconds"] for e in epochs)


@pytest.mark.parametrize("change, needle", [
    (["--shuffle-window", "8"], "trained with --shuffle-window 16, this run has 8"),
    (["--data-in-memory"], "trained with --data-in-memory False, this run has True"),
])
def test_a_resume_that_would_change_the_epochs_order_is_refused(tmp_path, capsys, change, needle):
    """Mid-epoch, another window (or the in-memory loader's order) would see some rows twice and others never."""
    from ddp_cnn.cli.train import main
    data_dir = make_synthetic_shards(tmp_path / "data", 1)
    flags = ["--data", str(data_dir), "--device", "cpu", "--progress", "off", "--batch-size", "64",
             "--eval-every", "0", "--comm", "single", "--run-dir", str(tmp_path / "run"), "--checkpoint-every", "4"]
    assert main(flags + ["--max-steps", "4"]) == 0
    capsys.readouterr()
    assert main(flags + ["--max-steps", "8", "--resume"] + change) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and needle in err, err
    assert main(flags + ["--max-steps", "8", "--resume"]) == 0  # the same settings go on


def launch(ranks, *args):
    return [str(REPO / "launch" / "mpirun.sh"), "-n", str(ranks), sys.executable, "-m", "ddp_cnn.train",
            "--model", "lenet", "--device", "cpu", "--progress", "off", "--eval-every", "0", "--epochs", "3",
            *map(str, args)]


def damage(shard, how):
    import h5py
    with h5py.File(shard, "r") as f:
        info = f["images"].id.get_chunk_info(1)  # rows 512..1023
    with open(shard, "r+b") as fh:
        if how == "corrupt":
            fh.seek(info.byte_offset + 16)
            fh.write(b"\xff" * 64)
        else:  # cut inside the chunk: its bytes end early
            fh.truncate(info.byte_offset + info.size // 2)


@pytest.mark.parametrize("order, how", [("shard", "corrupt"), ("global", "corrupt"), ("shard", "truncated")])
def test_a_damaged_chunk_is_named_and_the_job_exits_2_without_hanging(tmp_path, order, how):
    data = make_synthetic_shards(tmp_path / "data", 2)
    shard = sorted(data.glob("train-*.h5"))[0]
    damage(shard, how)
    proc = subprocess.run(launch(2, "--data", data, "--batch-size", 64, "--data-order", order,
                                 "--run-dir", tmp_path / "run", "--shuffle-window", 1, "--data-cache-mb", 8),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines and all(str(shard) in line for line in lines), proc.stderr[-2000:]
    if how == "corrupt":
        assert all("cannot read rows 512:600" in line for line in lines), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---- sharding a set larger than memory -----------------------------------------------

SHARD_PEAK = r"""
import json, sys
from data_tools.shard import main
code = main(sys.argv[1:])
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] * 1024
print(json.dumps({"code": code, "peak": peak}))
"""


def npz_of(path, n, size=48, compressed=False, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 5
    images = rng.integers(0, 40, (n, size, size), dtype=np.uint8)
    images[np.arange(n), labels * 5 + 2] = 250  # a bright row per class
    (np.savez_compressed if compressed else np.savez)(path, images=images, labels=labels)
    return path


def shard_peak(npz, out, *flags):
    proc = subprocess.run([sys.executable, "-c", SHARD_PEAK, "--from-npz", str(npz), "--out", str(out),
                           "--shards", "2", *flags], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["code"] == 0
    return result["peak"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_sharding_an_npz_8_times_larger_keeps_the_peak_memory_bounded(tmp_path):
    small, large = npz_of(tmp_path / "small.npz", 4000), npz_of(tmp_path / "large.npz", 32000)
    growth = 28000 * 48 * 48
    grew = shard_peak(large, tmp_path / "large") - shard_peak(small, tmp_path / "small")
    assert grew < 0.25 * growth, grew
    # What it wrote is the whole set: every image once, byte for byte.
    import h5py
    with np.load(large) as z:
        source = z["images"]
    rows = []
    for path in sorted((tmp_path / "large").glob("*.h5")):
        with h5py.File(path, "r") as f:
            assert np.array_equal(f["images"][:][..., 0], source[f["source_index"][:]])
            rows.append(f["source_index"][:])
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(32000))


def photo_folder(root, n, size=64, seed=0):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_sharding_a_folder_8_times_larger_keeps_the_peak_memory_bounded(tmp_path):
    small, large = photo_folder(tmp_path / "small", 800), photo_folder(tmp_path / "large", 6400)
    growth = 5600 * 64 * 64 * 3

    def peak(folder, out):
        proc = subprocess.run([sys.executable, "-c", SHARD_PEAK, "--from-folder", str(folder), "--out", str(out),
                               "--shards", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.splitlines()[-1])["peak"]
    grew = peak(large, tmp_path / "large-shards") - peak(small, tmp_path / "small-shards")
    assert grew < 0.25 * growth, grew
    total = sum(json.loads((tmp_path / "large-shards" / "manifest.json").read_text())["files"][name]["samples"]
                for name in ("train-00000-of-00002.h5", "train-00001-of-00002.h5", "test.h5"))
    assert total == 6400


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_a_compressed_npz_read_member_wise_gives_the_same_shards_and_the_trainer_streams_them(tmp_path, compression):
    import h5py
    stored = npz_of(tmp_path / "stored.npz", 1500, size=28)
    packed = npz_of(tmp_path / "packed.npz", 1500, size=28, compressed=True)
    from data_tools.shard import main
    for npz, out in ((stored, "a"), (packed, "b")):
        assert main(["--from-npz", str(npz), "--out", str(tmp_path / out), "--shards", "2",
                     "--compression", compression]) == 0
    assert not list(tmp_path.glob(".shard-scratch-*"))  # the inflated member is gone
    for name in ("train-00000-of-00002.h5", "train-00001-of-00002.h5", "test.h5"):
        with h5py.File(tmp_path / "a" / name, "r") as a, h5py.File(tmp_path / "b" / name, "r") as b:
            assert np.array_equal(a["images"][:], b["images"][:])
            assert a["images"].compression == (None if compression == "none" else compression)
    whole = open_rank_data(tmp_path / "b", "train", SingleComm())
    data = streamed(tmp_path / "b", mb=4)
    loader = Loader(data, batch_size=100, comm=SingleComm(), seed=1, window=1, drop_last=False, dtype=np.float64)
    for step, (x, _) in enumerate(loader.epoch(0)):
        rows = loader.rows(loader.order(0), step)
        assert np.array_equal(x, loader.to_device(whole.images[rows], whole.labels[rows])[0])


# ---- the block-shuffled stream on N ranks against one (mpirun -n N python -m pytest --only-mpi) ----------

BLOCKS = ["--shuffle-window", 1, "--data-cache-mb", 4]  # 3 shards of one chunk each: a block shuffle


@pytest.mark.mpi(min_size=2)
def test_the_block_shuffled_global_stream_on_n_ranks_equals_one_rank(tmp_path_factory):
    from ddp_cnn.dist.comm import MPIComm
    from test_invariance import AUGMENT, COMMON, final, on_one_rank, relative, shared_data, train
    comm = MPIComm()
    base = shared_data(comm, tmp_path_factory, "stream-global")
    flags = COMMON + AUGMENT + ["--data", base / "data", "--batch-size", 96, "--max-steps", 20,
                                "--data-order", "global"]
    assert on_one_rank(comm, flags + BLOCKS + ["--run-dir", base / "one"]) == 0
    assert train(flags + BLOCKS + ["--run-dir", base / "many"]) == 0
    one, many = final(base / "one"), final(base / "many")
    assert many["meta"]["world_size"] == comm.size and many["meta"]["global_step"] == 20
    assert relative(many["params"], one["params"]) < 1e-10
    # A full shuffle draws another order: the block shuffle was in force, so the comparison can fail.
    assert on_one_rank(comm, flags + ["--shuffle-window", 0, "--run-dir", base / "full"]) == 0
    assert relative(final(base / "full")["params"], one["params"]) > 1e-6


@pytest.mark.mpi(min_size=2)
def test_a_block_shuffled_stream_stopped_mid_epoch_on_n_ranks_continues_on_one(tmp_path_factory):
    from ddp_cnn.dist.comm import MPIComm
    from test_invariance import AUGMENT, COMMON, final, on_one_rank, relative, shared_data, train
    comm = MPIComm()
    base = shared_data(comm, tmp_path_factory, "stream-elastic")
    flags = COMMON + AUGMENT + BLOCKS + ["--data", base / "data", "--batch-size", 96, "--data-order", "global"]
    assert train(flags + ["--run-dir", base / "whole", "--max-steps", 20]) == 0
    assert train(flags + ["--run-dir", base / "parts", "--max-steps", 5]) == 0  # 12 steps an epoch: mid-epoch
    assert on_one_rank(comm, flags + ["--run-dir", base / "parts", "--max-steps", 20, "--resume"]) == 0
    whole, parts = final(base / "whole"), final(base / "parts")
    assert parts["meta"]["global_step"] == 20 and parts["meta"]["world_size"] == 1
    assert relative(parts["params"], whole["params"]) < 1e-10

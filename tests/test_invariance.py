"""Training that does not depend on the rank count (issue #20): the global data order, elastic
resume, SyncBatchNorm and gradient accumulation, each checked against one rank (or one batch) in
float64.

Under ``mpirun -n N python -m pytest --only-mpi`` (N = 2, 3, 4) the N-rank runs are compared with a
one-process run made by rank 0 in the same test; the plain-pytest tests run the one-process parts
and a real SIGTERM-and-resume across rank counts.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.run.checkpoint import list_checkpoints, load
from ddp_cnn.dist.comm import MPIComm, SingleComm
from ddp_cnn.dist.faults import EXIT_PREEMPTED
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--model", "lenet", "--dtype", "float64", "--device", "cpu", "--eval-every", 0,
          "--progress", "off", "--epochs", 10, "--seed", 3, "--optimizer", "adam", "--lr", 3e-3]
AUGMENT = ["--augment-shift", 2, "--hflip", "--erase", 0.3]


def train(args, single=False):
    from ddp_cnn.cli.train import main
    return main([str(a) for a in args] + (["--comm", "single"] if single else []))


def final(run_dir):
    return load(list_checkpoints(Path(run_dir) / "checkpoints")[-1])


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def shared_data(comm, tmp_path_factory, name, shards=3):
    """Synthetic shards in a folder every rank sees (rank 0's temporary folder)."""
    base = tmp_path_factory.mktemp(name) if comm.rank == 0 else None
    base = comm.bcast_obj(base)
    if comm.rank == 0:
        make_synthetic_shards(base / "data", shards)
    comm.barrier()
    return base


def on_one_rank(comm, args):
    """Rank 0 trains in one process (``--comm single``) while the others wait."""
    code = train(args, single=True) if comm.rank == 0 else 0
    comm.barrier()
    return code


# ---- pieces ------------------------------------------------------------------

def test_batch_slices_draw_what_the_whole_batch_draws():
    from ddp_cnn.data.pixels import Augment
    from ddp_cnn.data.order import BatchSlice
    images = np.random.default_rng(0).integers(0, 255, (10, 12, 12), dtype=np.uint8)
    augment = Augment(shift=2, hflip=True, erase=0.5)
    whole = augment(images, np.random.default_rng(7), fill=30)
    for start, stop in ((0, 3), (3, 7), (7, 10)):
        part = augment(images[start:stop], BatchSlice(np.random.default_rng(7), start, 10), fill=30)
        assert np.array_equal(part, whole[start:stop]), (start, stop)
    # The rng of a shard-order batch differs, so the same images change otherwise: the test can fail.
    assert not np.array_equal(augment(images[3:7], np.random.default_rng(7), fill=30), whole[3:7])


def test_global_rows_read_the_rows_of_every_shard_in_any_order(tmp_path):
    from ddp_cnn.data.shards import read_planned
    from ddp_cnn.data.order import open_global_train
    data_dir = make_synthetic_shards(tmp_path / "data", 3)
    everything = open_global_train(data_dir)
    parts = [read_planned([(p, None, None)]) for p in everything.paths]
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    rows = np.random.default_rng(1).permutation(len(images))[:300]
    assert np.array_equal(everything.images[rows], images[rows])
    assert np.array_equal(everything.labels, labels)
    subset = everything.images.subset(rows[::2])
    assert np.array_equal(subset[np.array([4, 0, 2])], images[rows[::2][[4, 0, 2]]])


def test_sync_batchnorm_on_one_rank_is_batchnorm():
    from ddp_cnn.model import layers as L
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.model.layers.normalization import SyncStatistics
    bk = get_backend("cpu", "float64")
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((6, 5, 5, 3)), rng.standard_normal((6, 5, 5, 3))
    outs = []
    for sync in (None, SyncStatistics(SingleComm())):
        bn = L.BatchNorm(name="bn")
        bn.build((5, 5, 3), bk)
        bn.params = {"gamma": np.array([1.5, 0.5, 2.0]), "beta": np.array([0.1, 0.2, 0.3])}
        bn.grads = {"gamma": np.zeros(3), "beta": np.zeros(3)}
        bn.sync = sync
        y = bn.forward(x, train=True).copy()
        dx = bn.backward(dy).copy()
        outs.append((y, dx, bn.grads["gamma"].copy(), bn.buffers["running_var"].copy()))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_accumulated_micro_batches_equal_one_batch_on_one_rank(tmp_path):
    check_accumulation(SingleComm(), tmp_path)


@pytest.mark.mpi(min_size=2)
def test_accumulated_micro_batches_equal_one_batch_on_n_ranks(tmp_path_factory):
    comm = MPIComm()
    check_accumulation(comm, shared_data(comm, tmp_path_factory, "accumulate", shards=comm.size))


def check_accumulation(comm, base):
    if comm.size == 1:
        make_synthetic_shards(base / "data", 1)
    flags = COMMON + ["--data", base / "data", "--batch-size", 24 * comm.size, "--max-steps", 12,
                      "--log-every", 1] + AUGMENT
    runs = {}
    for k in (1, 4):
        run_dir = base / f"k{k}"
        assert train(flags + ["--run-dir", run_dir, "--accumulate", k], single=comm.size == 1) == 0
        runs[k] = final(run_dir)
    assert relative(runs[4]["params"], runs[1]["params"]) < 1e-10
    assert runs[4]["meta"]["global_step"] == 12  # one optimizer step per 4 micro-batches
    if comm.rank == 0:
        def losses(k):
            lines = (base / f"k{k}" / "metrics.jsonl").read_text().splitlines()
            return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]
        np.testing.assert_allclose(losses(4), losses(1), rtol=1e-10)


# ---- N ranks against one -----------------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_global_order_n_ranks_equal_one_rank_after_20_steps(tmp_path_factory):
    """Global batch 128 (uneven on 3 ranks: 42 + 43 + 43), augmentation on, 20 steps over 2+ epochs."""
    comm = MPIComm()
    base = shared_data(comm, tmp_path_factory, "global")
    flags = COMMON + AUGMENT + ["--data", base / "data", "--batch-size", 128, "--max-steps", 20,
                                "--data-order", "global"]
    assert on_one_rank(comm, flags + ["--run-dir", base / "one"]) == 0
    assert train(flags + ["--run-dir", base / "many"]) == 0
    one, many = final(base / "one"), final(base / "many")
    assert many["meta"]["world_size"] == comm.size and many["meta"]["global_step"] == 20
    assert relative(many["params"], one["params"]) < 1e-10
    if 128 % comm.size == 0:  # the shard order (the default) depends on the rank count: the test can fail
        assert train(flags[:-2] + ["--data-order", "shard", "--slice-data", "--run-dir", base / "shard"]) == 0
        assert relative(final(base / "shard")["params"], one["params"]) > 1e-6


@pytest.mark.mpi(min_size=2)
def test_a_global_order_run_stopped_on_n_ranks_continues_on_one(tmp_path_factory, capsys):
    comm = MPIComm()
    base = shared_data(comm, tmp_path_factory, "elastic")
    flags = COMMON + AUGMENT + ["--data", base / "data", "--batch-size", 96, "--data-order", "global"]
    assert train(flags + ["--run-dir", base / "whole", "--max-steps", 20]) == 0
    assert train(flags + ["--run-dir", base / "parts", "--max-steps", 11]) == 0
    capsys.readouterr()
    assert on_one_rank(comm, flags + ["--run-dir", base / "parts", "--max-steps", 20, "--resume"]) == 0
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert "(global step 11)" in out and "data order differs" not in out
    whole, parts = final(base / "whole"), final(base / "parts")
    assert parts["meta"]["global_step"] == 20 and parts["meta"]["world_size"] == 1
    assert relative(parts["params"], whole["params"]) < 1e-10


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", [["--model", "fmnist-cnn", "--batchnorm"], ["--model", "fmnist-vgg", "--width", 4]])
def test_sync_bn_n_ranks_equal_one_rank_big_batch(tmp_path_factory, model):
    comm = MPIComm()
    base = shared_data(comm, tmp_path_factory, "syncbn")
    flags = COMMON + ["--data", base / "data", "--batch-size", 24, "--max-steps", 3, "--data-order", "global",
                      "--sync-bn"] + model
    assert on_one_rank(comm, flags + ["--run-dir", base / "one"]) == 0
    assert train(flags + ["--run-dir", base / "many"]) == 0
    one, many = final(base / "one"), final(base / "many")
    assert relative(many["params"], one["params"]) < 1e-10
    for name, value in one["buffers"].items():  # running statistics too: those of the global batch
        np.testing.assert_allclose(many["buffers"][name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    # Without --sync-bn each rank normalises over its own images: not the big batch's step.
    assert train([f for f in flags if f != "--sync-bn"] + ["--run-dir", base / "local"]) == 0
    assert relative(final(base / "local")["params"], one["params"]) > 1e-8


# ---- a real SIGTERM, resumed on other rank counts ----------------------------

def launch(ranks, *args):
    cmd = [sys.executable, "-m", "ddp_cnn.train"] if ranks == 1 else \
        [str(REPO / "launch" / "mpirun.sh"), "-n", str(ranks), sys.executable, "-m", "ddp_cnn.train"]
    return cmd + [str(a) for a in args]


def test_sigterm_on_4_ranks_then_resume_on_2_and_on_1_continues_the_4_rank_run(tmp_path):
    data = make_synthetic_shards(tmp_path / "data", 4)
    flags = COMMON + AUGMENT + ["--data", data, "--batch-size", 64, "--data-order", "global", "--epochs", 100,
                                "--max-steps", 100, "--log-every", 1]
    whole = subprocess.run(launch(4, *flags, "--run-dir", tmp_path / "whole"), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    job = subprocess.Popen(launch(4, *flags, "--run-dir", tmp_path / "stopped"), cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 10):
        assert job.poll() is None and time.time() < deadline, "the 4-rank job ended before the signal"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, err[-2000:]
    stopped_at = final(tmp_path / "stopped")["meta"]["global_step"]
    assert 10 <= stopped_at < 100
    reference = final(tmp_path / "whole")
    for ranks in (2, 1):
        run_dir = tmp_path / f"on{ranks}"
        subprocess.run(["cp", "-r", str(tmp_path / "stopped"), str(run_dir)], check=True)
        resumed = subprocess.run(launch(ranks, *flags, "--run-dir", run_dir, "--resume", "latest"), cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"(global step {stopped_at})" in resumed.stdout
        assert "data order differs" not in resumed.stdout + resumed.stderr
        done = final(run_dir)
        assert done["meta"]["global_step"] == 100 and done["meta"]["world_size"] == ranks
        assert relative(done["params"], reference["params"]) < 1e-10, f"resumed on {ranks} rank(s)"


def test_dropout_masks_of_any_slice_are_the_whole_batch_masks_of_its_rows():
    from ddp_cnn.model.kernels import dropout_mask
    key, shape = (5, 2, 0, 7, 3), (7, 3, 5)  # 15 values a row: odd offsets too
    whole = dropout_mask(shape, 0.4, key, np, np.float64)
    for a in range(7):
        for b in range(a + 1, 8):
            part = dropout_mask((b - a,) + shape[1:], 0.4, key, np, np.float64, offset=a * 15)
            assert np.array_equal(part, whole[a:b]), (a, b)
    assert not np.array_equal(dropout_mask((3, 3, 5), 0.4, key, np, np.float64), whole[2:5])


def test_a_damaged_chunk_met_in_the_global_order_ends_the_job_with_one_line(tmp_path):
    """Only the labels are read at start in the global order: a chunk that fails to decompress is met
    mid-run, by the ranks whose rows are in it, which end the job with one line each, not a traceback."""
    import h5py
    data = make_synthetic_shards(tmp_path / "data", 1)
    shard = next(data.glob("train-*.h5"))
    with h5py.File(shard, "r") as f:
        info = f["images"].id.get_chunk_info(1)  # rows 512..1023
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(b"\xff" * 64)
    proc = subprocess.run(launch(2, *COMMON, "--data", data, "--batch-size", 64, "--data-order", "global",
                                 "--run-dir", tmp_path / "run", "--max-steps", 40), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert lines and all("global step" in l and f"{shard}: cannot read rows 512:1024" in l for l in lines), \
        proc.stderr[-2000:]  # one line from each rank that met the chunk
    assert "Traceback" not in proc.stderr


# ---- what is refused -----------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--sync-bn"], "--sync-bn: model 'lenet' has no batch norm layers"),
    (["--accumulate", 40], "--accumulate 40: more micro-batches than the 32 images of rank 0's batch"),
])
def test_settings_that_cannot_work_exit_2_with_one_line(tmp_path, capsys, flags, needle):
    data = make_synthetic_shards(tmp_path / "data", 1)
    code = train(COMMON + ["--data", data, "--batch-size", 32, "--run-dir", tmp_path / "run"] + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {needle}"]
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_resume_in_another_data_order_is_refused(tmp_path, capsys):
    data = make_synthetic_shards(tmp_path / "data", 1)
    flags = COMMON + ["--data", data, "--batch-size", 32, "--run-dir", tmp_path / "run"]
    assert train(flags + ["--max-steps", 2]) == 0
    capsys.readouterr()
    assert train(flags + ["--max-steps", 4, "--resume", "--data-order", "global"]) == 2
    assert "trained with --data-order shard, this run has global" in capsys.readouterr().err

"""Distributed invariants, each checked by comparing N ranks against 1 rank.

Run with ``mpirun -n N python -m pytest --with-mpi tests/test_distributed.py``
(N = 2, 3, 4); without --with-mpi the multi-rank tests are skipped by
pytest-mpi and the single-process twins still run.
"""
import hashlib
import json

import numpy as np
import pytest

from ddp_cnn.model import layers as L
from ddp_cnn.model import optim
from ddp_cnn.system.backend import get_backend
from ddp_cnn.dist.comm import MPIComm, SingleComm
from ddp_cnn.run.evaluation import evaluate
from ddp_cnn.model import Sequential
from ddp_cnn.dist.reducer import GradReducer, plan_buckets
from ddp_cnn.run.step import compute_gradients
from helpers import make_synthetic_shards

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks


def small_cnn(backend, seed=3):
    layers = [L.Conv2D(4, 3, padding="same"), L.ReLU(), L.MaxPool2D(2), L.Conv2D(6, 3, stride=1),
              L.LeakyReLU(0.1), L.AvgPool2D(2), L.Flatten(), L.Dense(16), L.Tanh(), L.Dense(10)]
    return Sequential(layers, (10, 10, 1), backend, seed=seed)


def reducer_for(comm, model, bucket_mb):
    ranges = list(zip(model.layer_offsets, model.layer_ends))
    return GradReducer(comm, model.grad_buffer, ranges, bucket_mb)


def batch_for_step(step):
    rng = np.random.default_rng(100 + step)
    return rng.standard_normal((GLOBAL_BATCH, 10, 10, 1)), rng.integers(0, 10, GLOBAL_BATCH)


def train_steps(comm, opt_name, bucket_mb, steps=5, digests=None, distill=False):
    """`steps` updates on this rank's slice of each global batch; returns the final params.
    distill: the loss also matches a teacher's softened logits (``train --teacher``)."""
    model = small_cnn(get_backend("cpu", "float64"))
    opt = optim.create(opt_name, model.params, model.grads, 0.05, decay_ranges=model.decay_ranges)
    reducer = reducer_for(comm, model, bucket_mb)
    teacher = small_cnn(get_backend("cpu", "float64"), seed=9) if distill else None
    loss_fn = L.SoftmaxCrossEntropy(0.1, 0.5, 2.0) if distill else L.SoftmaxCrossEntropy()
    local = GLOBAL_BATCH // comm.size
    for step in range(steps):
        x, y = batch_for_step(step)
        part = slice(comm.rank * local, (comm.rank + 1) * local)
        soft = teacher.forward(x[part], train=False) if teacher is not None else None
        compute_gradients(model, loss_fn, reducer, x[part], y[part], step, soft=soft)
        opt.step()
        if digests is not None:
            digests.append(comm.allgather_obj(hashlib.sha256(model.params.tobytes()).hexdigest()))
    reducer.close()
    return model.params.copy()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "adam"])
@pytest.mark.parametrize("bucket_mb", [0.0, 0.002])
def test_n_ranks_equal_one_rank_big_batch(opt_name, bucket_mb):
    comm = MPIComm()
    assert GLOBAL_BATCH % comm.size == 0
    digests = []
    distributed = train_steps(comm, opt_name, bucket_mb, digests=digests)
    single = train_steps(SingleComm(), opt_name, 0.0)
    rel = np.linalg.norm(distributed - single) / np.linalg.norm(single)
    assert rel < 1e-10, f"{comm.size} ranks vs 1 rank: relative difference {rel:.2e}"
    # Replicas never drift: after every step, every rank held bitwise the same parameters.
    for step, ranks in enumerate(digests):
        assert len(set(ranks)) == 1, f"replicas differ after step {step}"


@pytest.mark.mpi(min_size=2)
def test_n_ranks_equal_one_rank_with_a_teacher():
    comm = MPIComm()
    distributed = train_steps(comm, "adam", 0.002, distill=True)
    single = train_steps(SingleComm(), "adam", 0.0, distill=True)
    assert np.linalg.norm(distributed - single) / np.linalg.norm(single) < 1e-10
    assert not np.allclose(single, train_steps(SingleComm(), "adam", 0.0)), "the teacher changed nothing"


def test_buckets_are_contiguous_whole_layers_in_backward_order():
    model = small_cnn(get_backend("cpu", "float64"))
    ranges = list(zip(model.layer_offsets, model.layer_ends))
    buckets = plan_buckets(ranges, bucket_bytes=600, itemsize=8)
    assert buckets[0][0] == 0 and buckets[-1][1] == model.num_params
    for (a, b, _), (c, d, _) in zip(buckets, buckets[1:]):
        assert b == c  # no gaps, no overlaps
    # The first bucket is completed by the last layer's backward (it is filled first).
    assert buckets[0][2] == len(model.layers) - 1
    assert plan_buckets(ranges, 0, 8) == [(0, model.num_params, None)]


@pytest.mark.mpi(min_size=2)
def test_allreduce_mean_of_rank_values_is_exact_and_repeatable():
    comm = MPIComm()
    model = small_cnn(get_backend("cpu", "float64"))
    reducer = reducer_for(comm, model, 0.001)
    for _ in range(2):  # a second round catches state left over from the first
        model.grads[...] = comm.rank
        reducer.begin()
        for i in reversed(range(len(model.layers))):
            reducer.layer_done(i)
        reducer.finish()
        assert np.all(model.grads == (comm.size - 1) / 2)
        assert reducer.flag == 0  # no rank asked to stop, every gradient finite
    reducer.close()


def run_flag_round(comm, model, reducer, nan_rank=None, stop_rank=None):
    """One allreduce in which `nan_rank` holds a NaN gradient and `stop_rank` asks to stop."""
    model.grads[...] = 1.0
    if comm.rank == nan_rank:
        model.grads[3] = np.nan
    reducer.begin(stop=comm.rank == stop_rank)
    for i in reversed(range(len(model.layers))):
        reducer.layer_done(i)
    reducer.finish()
    return float(reducer.flag)


@pytest.mark.mpi(min_size=2)
def test_stop_and_non_finite_flags_ride_in_the_gradient_allreduce_and_agree():
    comm = MPIComm()
    model = small_cnn(get_backend("cpu", "float64"))
    reducer = reducer_for(comm, model, 0.001)
    assert len(reducer.buckets) > 1
    last = comm.size - 1
    assert run_flag_round(comm, model, reducer) == 0.0
    flags = comm.allgather_obj(run_flag_round(comm, model, reducer, stop_rank=last))
    assert all(f > 0 for f in flags) and len(set(flags)) == 1, flags
    flags = comm.allgather_obj(run_flag_round(comm, model, reducer, nan_rank=last))
    assert all(np.isnan(f) for f in flags), flags
    # An infinity is as non-finite as a NaN; a stop request does not hide it.
    model.grads[...] = 1.0
    model.grads[-1] = np.inf if comm.rank == 0 else 1.0
    reducer.begin(stop=True)
    reducer.finish()
    assert np.isnan(float(reducer.flag))
    assert run_flag_round(comm, model, reducer) == 0.0  # nothing left over from the rounds before
    reducer.close()


def test_flags_on_one_rank():
    model = small_cnn(get_backend("cpu", "float64"))
    reducer = reducer_for(SingleComm(), model, 0.001)
    assert run_flag_round(SingleComm(), model, reducer) == 0.0
    assert run_flag_round(SingleComm(), model, reducer, stop_rank=0) > 0
    assert np.isnan(run_flag_round(SingleComm(), model, reducer, nan_rank=0))


@pytest.mark.mpi(min_size=2)
def test_bucketed_overlapped_allreduce_equals_one_allreduce():
    comm = MPIComm()
    model = small_cnn(get_backend("cpu", "float64"))
    rng = np.random.default_rng(comm.rank)
    values = rng.standard_normal(model.num_params)
    results = []
    for bucket_mb in (0.0, 0.0005, 0.004):
        reducer = reducer_for(comm, model, bucket_mb)
        model.grads[...] = values
        reducer.begin()
        for i in reversed(range(len(model.layers))):
            reducer.layer_done(i)
        reducer.finish()
        reducer.close()
        results.append(model.grads.copy())
    expected = comm.allreduce_host(values) / comm.size
    for got in results:
        assert np.allclose(got, expected, rtol=1e-14, atol=1e-15)
    if comm.size == 2:  # a + b is a + b whatever the bucketing: bitwise
        assert all(np.array_equal(r, results[0]) for r in results)


# ---- through the training command -----------------------------------------

def shared_folder(comm, tmp_path_factory, name):
    """A folder every rank sees: rank 0's temporary folder, broadcast."""
    path = tmp_path_factory.mktemp(name) if comm.rank == 0 else None
    return comm.bcast_obj(path)


def run_train(args):
    from ddp_cnn.cli.train import main
    return main([str(a) for a in args])


def final_params(run_dir):
    from ddp_cnn.run.checkpoint import list_checkpoints, load
    return load(list_checkpoints(run_dir / "checkpoints")[-1])


def check_resume_is_bitwise_exact(comm, tmp_path_factory):
    base = shared_folder(comm, tmp_path_factory, "resume")
    if comm.rank == 0:
        make_synthetic_shards(base / "data", comm.size)
    comm.barrier()
    common = ["--data", base / "data", "--model", "lenet", "--epochs", 3, "--local-batch-size", 8, "--optimizer", "adam",
              "--augment-shift", 2, "--hflip", "--erase", 0.3, "--seed", 5, "--eval-every", 0, "--device", "cpu",
              "--dtype", "float32", "--keep", 0, "--log-every", 1, "--ema", 0.9] + (
                  ["--comm", "single"] if comm.size == 1 else [])
    assert run_train(common + ["--run-dir", base / "whole", "--max-steps", 46]) == 0
    assert run_train(common + ["--run-dir", base / "parts", "--max-steps", 23]) == 0
    assert run_train(common + ["--run-dir", base / "parts", "--max-steps", 46, "--resume", "latest"]) == 0
    whole, parts = final_params(base / "whole"), final_params(base / "parts")
    assert whole["meta"]["global_step"] == parts["meta"]["global_step"] == 46
    assert np.array_equal(whole["params"], parts["params"]), "resumed run differs from the uninterrupted one"
    assert "ema" in whole["optim"]  # --ema: the moving average is resumed too
    for name in whole["optim"]:
        assert np.array_equal(whole["optim"][name], parts["optim"][name]), f"optimizer state {name} differs"
    if comm.rank == 0:  # the resumed metrics file has every step once
        steps = [json.loads(l)["step"] for l in (base / "parts" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(l)["kind"] == "step"]
        assert steps == list(range(1, 47))
        # The resumed epoch reports all of its steps, as the uninterrupted run does, and says it resumed.
        def epoch_records(run):  # by the step each was written at (the run ends inside epoch 0)
            records = [json.loads(l) for l in (base / run / "metrics.jsonl").read_text().splitlines()]
            return {r["step"]: r for r in records if r["kind"] == "epoch"}, records
        (whole_epochs, _), (part_epochs, part_records) = epoch_records("whole"), epoch_records("parts")
        assert 46 in whole_epochs and sorted(part_epochs) == sorted(set(whole_epochs) | {23})
        for step, record in whole_epochs.items():  # the resumed epoch counts its steps before the resume too
            for key in ("train_loss", "train_acc"):
                assert part_epochs[step][key] == pytest.approx(record[key], rel=1e-12, abs=0), (step, key)
        resumes = [r for r in part_records if r["kind"] == "resume"]
        assert [r["step"] for r in resumes] == [23] and resumes[0]["world_size"] == comm.size


def test_resume_is_bitwise_exact(tmp_path_factory):
    check_resume_is_bitwise_exact(SingleComm(), tmp_path_factory)


@pytest.mark.mpi(min_size=2)
def test_resume_is_bitwise_exact_on_n_ranks(tmp_path_factory):
    check_resume_is_bitwise_exact(MPIComm(), tmp_path_factory)


@pytest.mark.mpi(min_size=2)
def test_distributed_evaluation_equals_single_process(tmp_path_factory):
    from ddp_cnn.data.loader import Loader, open_rank_data
    comm = MPIComm()
    base = shared_folder(comm, tmp_path_factory, "eval")
    if comm.rank == 0:
        make_synthetic_shards(base / "data", 2, n_test=301)  # 301: ranks get unequal slices
    comm.barrier()
    bk = get_backend("cpu", "float64")
    model = Sequential([L.Conv2D(3, 3), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(10)], (28, 28, 1), bk, seed=1)

    def score(c):
        data = open_rank_data(base / "data", "test", c)
        loader = Loader(data, batch_size=64, comm=c, seed=0, xp=np, dtype=np.float64, shuffle=False,
                        drop_last=False)
        return evaluate(model, loader, c, 10)

    dist, single = score(comm), score(SingleComm())
    assert dist["count"] == single["count"] == 301
    assert np.array_equal(dist["confusion"], single["confusion"])
    assert dist["loss"] == pytest.approx(single["loss"], rel=1e-12)
    assert dist["accuracy"] == single["accuracy"]


def test_a_wait_past_its_deadline_raises_instead_of_hanging():
    import time
    from ddp_cnn.dist.comm import CollectiveTimeout
    from ddp_cnn.dist.comm.mpi import ThreadHandle
    handle = ThreadHandle(size=1000, on_gpu=False)  # never completed: a rank that stalled
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="allreduce of 1000 gradient values not complete by its deadline"):
        handle.wait(deadline=t0 + 0.2)
    assert 0.2 <= time.monotonic() - t0 < 5
    handle.done.set()
    handle.wait(deadline=time.monotonic() - 1)  # done: a deadline in the past does not matter

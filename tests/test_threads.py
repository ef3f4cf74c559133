"""CPU threads (ddp_cnn.threads): N threads give the results of 1 thread.

Every pass that is split over threads is forced to split here
(MIN_PARALLEL_BYTES = 0, 3 threads on batches of 5-7 images, so the
parts are uneven), then compared with the same pass in one thread.
"""
from __future__ import annotations

import numpy as np
import pytest

from ddp_cnn import layers as L
from ddp_cnn import model as model_mod
from ddp_cnn import kernels, optim, threads
from ddp_cnn.model import Sequential

from helpers import backend64, check_layer_gradients, rel_error


@pytest.fixture
def split_everything(monkeypatch):
    before = threads.count()
    monkeypatch.setattr(threads, "MIN_PARALLEL_BYTES", 0)
    yield
    threads.configure(before)


def test_split_is_contiguous_even_and_never_empty():
    assert threads.split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert threads.split(2, 4) == [(0, 1), (1, 2)]
    assert threads.split(0, 3) == [(0, 0)]
    assert threads.split(5, 1) == [(0, 5)]


def test_configure_rejects_a_bad_count():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--threads"):
            threads.configure(bad)


def test_default_threads_follow_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3


def test_an_error_in_any_part_is_raised_after_all_parts_ran(split_everything):
    threads.configure(3)
    ran = []

    def part(i, a, b):
        ran.append(i)
        if i == 2:
            raise RuntimeError("part 2 failed")

    with pytest.raises(RuntimeError, match="part 2 failed"):
        threads.parallel(9, part)
    assert sorted(ran) == [0, 1, 2]


LAYERS = {  # name: (factory, input shape)
    "conv": (lambda: L.Conv2D(4, 3), (7, 7, 3)),
    "conv-one-channel-same": (lambda: L.Conv2D(4, 3, padding="same"), (6, 6, 1)),
    "conv-stride-2": (lambda: L.Conv2D(4, 3, stride=2, padding=1), (7, 7, 2)),
    "dense": (lambda: L.Dense(5), (12,)),
    "maxpool": (lambda: L.MaxPool2D(2), (6, 6, 3)),
    "leakyrelu": (lambda: L.LeakyReLU(0.1), (5, 5, 2)),
    "dropout": (lambda: L.Dropout(0.3), (5, 5, 2)),
    "batchnorm": (lambda: L.BatchNorm(), (5, 5, 3)),
    "batchnorm-dense": (lambda: L.BatchNorm(), (6,)),
}


def _forward_backward(name, n_threads, batch=7):
    threads.configure(n_threads)
    factory, shape = LAYERS[name]
    layer = factory()
    model = Sequential([layer], shape, backend64(), seed=0)
    model.thread_replicas = False  # the layer's own split is under test
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch,) + shape)
    y = model.forward(x, train=True, step=3).copy()
    dx = layer.backward(rng.standard_normal(y.shape), need_dx=True).copy()
    return y, dx, model.grads.copy()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_with_3_threads_equals_1_thread(split_everything, name):
    one = _forward_backward(name, 1)
    three = _forward_backward(name, 3)
    for what, a, b in zip(("y", "dx", "grads"), one, three):
        assert a.shape == b.shape
        assert rel_error(a, b) < 1e-13, f"{name}: {what} differs"


@pytest.mark.parametrize("layer,shape", [(lambda: L.Conv2D(3, 3), (5, 5, 2)),
                                         (lambda: L.Conv2D(3, 3, padding="same"), (4, 4, 1)),
                                         (lambda: L.Dense(4), (6,)),
                                         (lambda: L.BatchNorm(), (3, 3, 2))])
def test_gradients_with_3_threads(split_everything, layer, shape):
    threads.configure(3)
    check_layer_gradients(layer(), shape, batch=5)


def test_adam_with_3_threads_is_bitwise_1_thread(split_everything, monkeypatch):
    monkeypatch.setattr(optim, "_CHUNK", 1000)  # several slices per thread
    rng = np.random.default_rng(0)
    start, grads = rng.standard_normal(10_007), rng.standard_normal((3, 10_007))
    results = []
    for n_threads in (1, 3):
        threads.configure(n_threads)
        params, g = start.copy(), np.empty_like(start)
        opt = optim.create("adamw", params, g, lr=1e-2, weight_decay=0.1)
        for step_grads in grads:
            g[...] = step_grads
            opt.step()
        results.append(params)
    assert np.array_equal(results[0], results[1])


def _train(n_threads, steps=3, batch=7, **arch):
    """fmnist-cnn float64 (dropout on) after a few Adam steps; the model and the layers
    whose backward reported done, in order."""
    threads.configure(n_threads)
    rng = np.random.default_rng(0)
    x, labels = rng.random((batch, 28, 28, 1)), rng.integers(0, 10, batch)
    model = model_mod.build("fmnist-cnn", backend64(), seed=0, **arch)
    model.rank = 1  # the dropout keys name the rank: the replicas must too
    opt = optim.create("adam", model.params, model.grads, lr=1e-3)
    loss_layer = L.SoftmaxCrossEntropy()
    done = []
    for step in range(steps):
        logits = model.forward(x, train=True, step=step)
        loss_layer.forward(logits, labels)
        model.backward(loss_layer.backward(), done.append)
        opt.step()
    return model, done


def test_training_steps_on_3_batch_replicas_match_1_thread(split_everything):
    one, done_one = _train(1)
    three, done_three = _train(3)
    assert len(three._replicas) == 2  # 7 images: shares of 3, 2 and 2, each through the whole network
    assert rel_error(one.params, three.params) < 1e-10
    assert done_three == done_one == [i for _ in range(3) for i in reversed(range(len(one.layers)))]
    again, _ = _train(3)
    assert np.array_equal(again.params, three.params)  # deterministic for a thread count


@pytest.mark.parametrize("n_threads", [1, 3])
def test_each_layer_is_reported_in_order_once_its_summed_gradient_is_final(split_everything, n_threads):
    """The reducer's hook: layer i is reported after every replica passed it and the shares are added."""
    threads.configure(n_threads)
    rng = np.random.default_rng(0)
    x, labels = rng.random((7, 28, 28, 1)), rng.integers(0, 10, 7)
    model = model_mod.build("fmnist-cnn", backend64(), seed=0)
    loss_layer = L.SoftmaxCrossEntropy()
    loss_layer.forward(model.forward(x, train=True, step=0), labels)
    seen = []
    model.backward(loss_layer.backward(), lambda i: seen.append((i, model.grads[:model.layer_ends[i]].copy())))
    assert [i for i, _ in seen] == list(reversed(range(len(model.layers))))
    for i, prefix in seen:
        assert np.array_equal(prefix, model.grads[:model.layer_ends[i]]), f"layer {i} reported before it was final"
    without_hook = model_mod.build("fmnist-cnn", backend64(), seed=0)
    loss_layer.forward(without_hook.forward(x, train=True, step=0), labels)
    without_hook.backward(loss_layer.backward())
    assert np.array_equal(without_hook.grads, model.grads)  # the same sums in the same order


def test_batchnorm_models_split_each_layer_not_the_batch(split_everything):
    one, _ = _train(1, steps=2, batchnorm=True)
    three, _ = _train(3, steps=2, batchnorm=True)
    assert three._replicas == []  # one share of the batch would give other batch statistics
    assert rel_error(one.params, three.params) < 1e-10
    for name, value in one.named_buffers().items():
        assert rel_error(value, three.named_buffers()[name]) < 1e-10


def test_a_replica_thread_runs_every_pass_itself(split_everything):
    threads.configure(3)
    assert len(threads.plan(9)) == 3
    with threads.serial():
        assert threads.plan(9) == [(0, 9)]
    assert len(threads.plan(9)) == 3


@pytest.mark.parametrize("start,stop", [(0, 7), (1, 4), (3, 7), (2, 3)])
def test_a_replica_draws_its_rows_of_the_whole_batch_dropout_mask(split_everything, start, stop):
    threads.configure(3)
    key, shape = (5, 2, 1, 9, 3), (7, 3, 5)  # 15 elements an image: odd starts fall inside a PCG64 output
    whole = kernels.dropout_mask(shape, 0.3, key, np, np.float32)
    part = kernels.dropout_mask((stop - start,) + shape[1:], 0.3, key, np, np.float32, start * 15)
    assert np.array_equal(part, whole[start:stop])


@pytest.mark.parametrize("n_threads", [1, 3])
def test_dropout_masks_are_bitwise_one_draw_of_the_stream(split_everything, n_threads):
    threads.configure(n_threads)
    key, shape, p = (5, 2, 1, 9, 3), (3, 7, 5), 0.3
    u = np.random.default_rng(list(key)).random(shape, dtype=np.float32)  # the definition
    expected = (u < 1 - p).astype(np.float32) * np.float32(1 / (1 - p))
    assert np.array_equal(kernels.dropout_mask(shape, p, key, np, np.float32), expected)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_on_transposed_and_empty_batches(split_everything, train):
    threads.configure(3)
    layer = L.BatchNorm()
    Sequential([layer], (4, 4, 3), backend64(), seed=0)
    layer.buffers["running_var"][...] = 2.0
    x = np.random.default_rng(0).standard_normal((5, 4, 4, 3))
    xt = x.transpose(0, 2, 1, 3)  # not C-contiguous
    assert np.array_equal(layer.forward(xt, train), layer.forward(np.ascontiguousarray(xt), train))
    before = {k: v.copy() for k, v in layer.buffers.items()}
    y = layer.forward(x[:0], train)
    assert y.shape == (0, 4, 4, 3) and layer.backward(y).shape == (0, 4, 4, 3)
    assert all(np.array_equal(before[k], v) for k, v in layer.buffers.items())  # empty: nothing to learn from

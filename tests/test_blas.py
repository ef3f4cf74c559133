"""--blas mkl: MKL's GEMMs give np.matmul's results for every layout the layers use,
the layers' gradients stay exact, and training matches NumPy's BLAS to rounding."""
from __future__ import annotations

import re

import numpy as np
import pytest

from ddp_cnn import blas
from ddp_cnn import layers as L
from ddp_cnn import model as model_mod
from ddp_cnn import optim, threads
from ddp_cnn.backend import get_backend
from helpers import check_layer_gradients, needs_mkl


@pytest.fixture
def mkl_calls(monkeypatch):
    """Select MKL for the test, count its GEMM calls, and go back to NumPy's BLAS after."""
    blas.use("mkl")
    calls = []
    for dtype, fn in list(blas._gemm.items()):
        def spy(*args, _fn=fn):
            calls.append(args[3:6])  # m, n, k
            return _fn(*args)
        monkeypatch.setitem(blas._gemm, dtype, spy)
    yield calls
    blas.use("numpy")


def operands(rng, m, k, n, dtype):
    """The (a, b) layouts the layers hand to BLAS: C order, transposed views, row slices."""
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    a_t = np.ascontiguousarray(a.T).T                  # Fortran order (cols.T in dW)
    b_t = np.ascontiguousarray(b.T).T                  # w.T in Dense's dx
    a_rows = np.concatenate([a, a], axis=1)[:, :k]     # rows of a wider buffer (leading dim 2k)
    return [(a, b), (a_t, b), (a, b_t), (a_t, b_t), (a_rows, b)]


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(37, 19, 5), (1, 8, 3), (300, 288, 64)])
def test_mkl_matmul_equals_numpy_for_each_layout(mkl_calls, dtype, m, k, n):
    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in operands(rng, m, k, n, dtype):
        out = np.full((m, n), np.nan, dtype)
        assert blas.matmul(a, b, out) is out
        np.testing.assert_allclose(out, np.matmul(a, b), rtol=tol, atol=tol * k)
    wide = np.full((m, n + 3), np.nan, dtype)  # out: columns 1..n of wider rows (leading dim n + 3)
    a, b = operands(rng, m, k, n, dtype)[0]
    blas.matmul(a, b, wide[:, 1:n + 1])
    np.testing.assert_allclose(wide[:, 1:n + 1], np.matmul(a, b), rtol=tol, atol=tol * k)
    assert np.isnan(wide[:, 0]).all() and np.isnan(wide[:, n + 1:]).all()  # nothing written beside it
    assert len(mkl_calls) == 6  # every layout went to MKL, none fell back


@needs_mkl
def test_mkl_matmul_into_a_stack_of_outputs(mkl_calls):
    """2-D @ 3-D (Conv2D's tap-by-tap dx GEMMs): one MKL GEMM per stacked right-hand side."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 16)).astype(np.float32)
    b = np.ascontiguousarray(rng.standard_normal((9, 16, 8)).astype(np.float32))
    out = np.empty((9, 50, 8), np.float32)
    blas.matmul(a, b, out)
    np.testing.assert_allclose(out, np.matmul(a, b), rtol=1e-5, atol=1e-5)
    assert mkl_calls == [(50, 8, 16)] * 9
    out_t = np.empty((9, 8, 50), np.float32).transpose(0, 2, 1)  # each out[i] column-major: NumPy's
    blas.matmul(a, b, out_t)
    np.testing.assert_allclose(out_t, np.matmul(a, b), rtol=1e-5, atol=1e-5)
    assert len(mkl_calls) == 9


@needs_mkl
def test_what_mkl_cannot_take_goes_to_numpy(mkl_calls):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    cases = [
        (a[:, ::2], rng.standard_normal((2, 3)).astype(np.float32), np.empty((6, 3), np.float32)),  # column step 2
        (rng.standard_normal(6).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32),
         np.empty(3, np.float32)),                                                               # a vector
        (a.astype(np.int64), np.ones((4, 2), np.int64), np.empty((6, 2), np.int64)),              # integers
        (a, np.ones((4, 2), np.float64), np.empty((6, 2), np.float64)),                         # mixed dtypes
        (a[:, :0], np.ones((0, 2), np.float32), np.empty((6, 2), np.float32)),                  # k = 0
        (np.broadcast_to(a[:1], (6, 4)), np.ones((4, 2), np.float32), np.empty((6, 2), np.float32)),  # stride 0
        (a[::-1], np.ones((4, 2), np.float32), np.empty((6, 2), np.float32)),                   # negative stride
        (np.lib.stride_tricks.as_strided(a, (3, 4), (8, 4)), np.ones((4, 2), np.float32),      # rows overlap
         np.empty((3, 2), np.float32)),
    ]
    for x, y, out in cases:
        blas.matmul(x, y, out)
        np.testing.assert_allclose(out, np.matmul(x, y), rtol=1e-6, atol=1e-6)
    buf = rng.standard_normal((4, 4)).astype(np.float32)
    expected = buf @ buf
    blas.matmul(buf, buf.copy(), buf)  # output overlaps an input: NumPy copies, MKL would not
    np.testing.assert_allclose(buf, expected, rtol=1e-5, atol=1e-5)
    ones = np.ones((4, 2), np.float32)
    rows_overlap = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (4, 2), (4, 4))
    blas.matmul(buf, ones, rows_overlap)  # an output whose rows overlap: whatever NumPy makes of it
    raw = np.zeros(64, np.uint8)
    out_odd = np.lib.stride_tricks.as_strided(raw[:4].view(np.float32), (3, 2), (10, 4))  # row stride 10 bytes
    blas.matmul(buf[:3], ones, out_odd)
    np.testing.assert_allclose(out_odd, buf[:3] @ ones, rtol=1e-6, atol=1e-6)
    read_only = np.frombuffer(bytes(32), np.float32).reshape(4, 2)
    with pytest.raises(ValueError, match="read-only"):
        blas.matmul(buf, np.ones((4, 2), np.float32), read_only)
    assert mkl_calls == []


@needs_mkl
@pytest.mark.parametrize("layer,shape", [
    (lambda: L.Conv2D(4, 3, padding="same"), (6, 6, 3)),
    (lambda: L.Conv2D(3, 3, stride=2, padding=1), (7, 7, 2)),
    (lambda: L.Conv2D(2, 3), (5, 5, 1)),
    (lambda: L.Dense(5), (7,)),
])
def test_layer_gradients_with_mkl(mkl_calls, layer, shape):
    """The float64 finite-difference check of conv and dense, their GEMMs on MKL's dgemm."""
    layer = layer()
    check_layer_gradients(layer, shape)
    batch = 2  # check_layer_gradients' default
    if isinstance(layer, L.Dense):
        expected = {(batch, 5, 7), (7, 5, batch), (batch, 7, 5)}  # forward, dW, dx
    else:
        rows, k = batch * layer.oh * layer.ow, layer.kh * layer.kw * layer.cin
        expected = {(rows, layer.filters, k), (k, layer.filters, rows)}  # forward, dW
        if layer.stride == 1:  # dx tap by tap on rows as wide as the padded image
            expected.add((batch * layer.oh * layer.padded_shape[2], layer.cin, layer.filters))
    assert expected <= set(mkl_calls), (expected, set(mkl_calls))


def train_steps(blas_name: str, steps: int = 5) -> np.ndarray:
    """fmnist-cnn's parameters after `steps` SGD steps on two threads (the batch replicas
    call BLAS at once), its GEMMs on `blas_name`.  (SGD, not Adam: Adam's normalised step
    turns rounding in a near-zero gradient into lr-sized moves.)"""
    rng = np.random.default_rng(3)
    x = rng.random((16, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    before = threads.count()
    blas.use(blas_name)
    try:
        model = model_mod.build("fmnist-cnn", get_backend("cpu", threads=2), seed=0)
        opt = optim.create("sgd", model.params, model.grads, 0.05)
        loss = L.SoftmaxCrossEntropy()
        for step in range(steps):
            loss.forward(model.forward(x, train=True, step=step), y)
            model.backward(loss.backward())
            opt.step()
        return model.params.copy()
    finally:
        blas.use("numpy")
        threads.configure(before)


@needs_mkl
def test_training_steps_with_mkl_match_numpy_blas_and_repeat_bitwise():
    numpy_blas, mkl, mkl_again = train_steps("numpy"), train_steps("mkl"), train_steps("mkl")
    change = np.abs(numpy_blas - train_steps("numpy", steps=0)).max()
    assert change > 1e-4  # the steps moved the weights
    np.testing.assert_allclose(mkl, numpy_blas, rtol=0, atol=1e-3 * change)  # float32 rounding apart
    assert np.abs(mkl - numpy_blas).max() > 0  # MKL really ran (another rounding)
    np.testing.assert_array_equal(mkl, mkl_again)  # deterministic run to run (CBWR auto)


def test_blas_mkl_without_mkl_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(blas, "find_mkl", lambda: None)
    with pytest.raises(RuntimeError, match=r"--blas mkl: libmkl_rt not found; install it with `pip install mkl`"):
        blas.use("mkl")
    assert blas.current() == "numpy"
    with pytest.raises(ValueError, match=re.escape("--blas: expected one of numpy|mkl, got 'openblas'")):
        blas.use("openblas")

"""The compiled CPU kernels (ddp_cnn.model.cpu_kernels) against their NumPy twins, in float64 and float32.

Elementwise kernels must be bitwise their twins; the convolution, whose GEMMs
are cut into other blocks, agrees to rounding.  Also: the switch, the
fallback without Numba, and results that do not depend on the thread count.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.model import cpu_gemm, cpu_kernels, kernels, optim
from ddp_cnn.model import layers as L
from ddp_cnn import model as model_mod
from ddp_cnn.system.backend import get_backend
from ddp_cnn.model.layers import SoftmaxCrossEntropy
from ddp_cnn.model import Sequential

numba = pytest.importorskip("numba", reason="Numba is not installed: the compiled CPU kernels cannot run")
if cpu_kernels.numba is None:
    pytest.skip("numba, scipy or threadpoolctl is missing: the compiled CPU kernels cannot run",
                allow_module_level=True)

DTYPES = [np.float64, np.float32]
TOL = {np.float64: 1e-12, np.float32: 2e-5}  # relative, for the convolution's differently blocked GEMMs


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


SIZES = [(3, 5, 7, 4), (2, 8, cpu_kernels.PARALLEL_MIN // 16 + 1, 1)]  # one pass on one thread, on every core


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0, -0.5, 1.5])
@pytest.mark.parametrize("shape", SIZES)
def test_leaky_relu_kernels_are_bitwise_the_where_formula(dtype, alpha, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[:6] = [0.0, -0.0, 1e-30, -1e-30, 0.0, 2.0]
    dy = rng.standard_normal(x.shape).astype(dtype)
    slope = np.where(x > 0, dtype(1), dtype(alpha))
    y = cpu_kernels.leaky_relu_forward(x, alpha, np.empty_like(x))
    dx = cpu_kernels.leaky_relu_backward(x, dy, alpha, np.empty_like(x))
    assert y.dtype == dx.dtype == dtype
    assert np.array_equal(y, x * slope) and np.array_equal(np.signbit(y), np.signbit(x * slope))
    assert np.array_equal(dx, dy * slope)
    if 0.0 <= alpha <= 1.0:  # the NumPy path's kernel
        assert np.array_equal(y, kernels.leaky_relu(x, alpha)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.25, 0.1, 0.5])
@pytest.mark.parametrize("shape", SIZES)
def test_dropout_apply_is_bitwise_the_stored_mask(dtype, rate, shape):
    """0.9 is not a float32: the draw is compared with float32(keep), as NumPy compares it."""
    key = (3, 2, 0, 5, 4)
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    mask = kernels.dropout_mask(x.shape, rate, key, np, dtype)
    u = kernels.uniform_draw(x.shape, key)
    u.reshape(-1)[:2] = np.float32(1.0 - rate)  # on the boundary: dropped in both
    u.reshape(-1)[2] = np.nextafter(np.float32(1.0 - rate), np.float32(0))  # just under: kept
    mask.reshape(-1)[:3] = np.less(u.reshape(-1)[:3], 1.0 - rate) * dtype(1.0 / (1.0 - rate))
    assert mask.reshape(-1)[2] != 0 and mask.reshape(-1)[0] == 0
    y = cpu_kernels.dropout_apply(x, u, 1.0 - rate, np.empty_like(x))
    assert y.dtype == dtype
    assert np.array_equal(y, x * mask)


@pytest.mark.parametrize("offset", [0, 7, 1000])
def test_the_draw_split_over_threads_is_bitwise_one_draw(offset):
    shape = (3, cpu_kernels.PARALLEL_MIN // 3 + 5)
    key = (1, 2, 0, 9, 3)
    one = kernels.uniform_draw(shape, key, offset)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            if threads <= numba.config.NUMBA_NUM_THREADS:
                numba.set_num_threads(threads)
                out = cpu_kernels.uniform_draw(shape, key, offset, np.empty(shape, np.float32))
                assert np.array_equal(out, one)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("kh,kw", [(2, 2), (3, 2), (1, 3)])
def test_tiled_pooling_kernels_are_bitwise_their_twins_including_ties(dtype, mode, kh, kw):
    rng = np.random.default_rng(2)
    x = rng.integers(-2, 3, (4, 3 * kh, 4 * kw, 5)).astype(dtype)  # many ties
    y_ref, arg_ref = kernels.pool_tiles_forward(x, kh, kw, mode)
    y, arg = cpu_kernels.pool_tiles_forward(x, kh, kw, mode, np.empty_like(y_ref), np.empty_like(arg_ref))
    assert np.array_equal(y, y_ref) and np.array_equal(arg, arg_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = cpu_kernels.pool_tiles_backward(dy, arg, kh, kw, np.full(x.shape, np.nan, dtype))
    assert np.array_equal(dx, kernels.pool_tiles_backward(dy, arg_ref, kh, kw))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_kernel_is_bitwise_the_numpy_update(dtype, monkeypatch):
    rng = np.random.default_rng(3)
    n = 3 * (1 << 18) + 7  # more than one of the NumPy path's slices
    start = rng.standard_normal(n).astype(dtype)
    results = []
    for choice in ("numpy", "jit"):
        monkeypatch.setenv(cpu_kernels.ENV, choice)
        params, grads = start.copy(), np.empty_like(start)
        opt = optim.create("adam", params, grads, 1e-3)
        assert opt.jit == (choice == "jit")
        for step in range(3):
            grads[...] = np.random.default_rng(step).standard_normal(n).astype(dtype)
            opt.step()
        results.append((params, opt.state["m"], opt.state["v"]))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


CONV_CASES = [  # (kernel, stride, padding, H, W, C, filters, batch)
    (3, 1, "valid", 12, 12, 1, 8, 9),
    (3, 1, "valid", 10, 10, 6, 8, 13),
    (3, 1, "same", 9, 8, 4, 5, 7),
    (3, 2, "same", 9, 10, 3, 4, 5),
    ((2, 3), 1, 1, 7, 6, 2, 3, 4),
    (5, 1, "same", 8, 8, 1, 6, 3),
    (2, 3, "valid", 7, 7, 2, 3, 5),
]


def conv_pair(monkeypatch, dtype, k, stride, padding, h, w, c, f, bias=True):
    """The same Conv2D built twice, on the NumPy path and on the compiled one, same parameters."""
    bk = get_backend("cpu", np.dtype(dtype).name)
    nets = []
    for choice in ("numpy", "jit"):
        monkeypatch.setenv(cpu_kernels.ENV, choice)
        nets.append(Sequential([L.Conv2D(f, k, stride=stride, padding=padding, bias=bias)], (h, w, c), bk, seed=0))
    start = np.random.default_rng(4).standard_normal(nets[0].num_params)
    for net in nets:
        net.params[...] = start
    assert not nets[0].layers[0].jit and nets[1].layers[0].jit
    return nets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride,padding,h,w,c,f,n", CONV_CASES)
def test_compiled_conv_matches_the_numpy_conv(monkeypatch, dtype, k, stride, padding, h, w, c, f, n):
    ref, jit = conv_pair(monkeypatch, dtype, k, stride, padding, h, w, c, f)
    conv = jit.layers[0]  # chunks of 2 images, the last one short
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 2 * conv.oh * conv.ow * conv.k * np.dtype(dtype).itemsize)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    y_ref, y = ref.forward(x, train=True).copy(), jit.forward(x, train=True)
    assert conv.chunk == 2 and rel(y, y_ref) < TOL[dtype]
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx_ref, dx = ref.layers[0].backward(dy).copy(), jit.layers[0].backward(dy)
    assert rel(dx, dx_ref) < TOL[dtype]
    assert rel(jit.grads, ref.grads) < TOL[dtype]


def test_compiled_conv_without_bias_and_without_dx(monkeypatch):
    ref, jit = conv_pair(monkeypatch, np.float64, 3, 1, "valid", 8, 8, 3, 4, bias=False)
    x = np.random.default_rng(6).standard_normal((5, 8, 8, 3))
    dy = np.random.default_rng(7).standard_normal((5, 6, 6, 4))
    assert rel(jit.forward(x, train=True), ref.forward(x, train=True)) < 1e-12
    assert ref.layers[0].backward(dy, need_dx=False) is None and jit.layers[0].backward(dy, need_dx=False) is None
    assert rel(jit.grads, ref.grads) < 1e-12


def test_compiled_conv_gives_the_same_bits_on_one_thread_and_on_every_core(monkeypatch):
    """dW and db are summed chunk by chunk in chunk order, never across threads."""
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 20000)
    _, jit = conv_pair(monkeypatch, np.float32, 3, 1, "valid", 12, 12, 8, 16)
    x = np.random.default_rng(8).standard_normal((32, 12, 12, 8)).astype(np.float32)
    dy = np.random.default_rng(9).standard_normal((32, 10, 10, 16)).astype(np.float32)
    runs = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            y = jit.forward(x, train=True).copy()
            dx = jit.layers[0].backward(dy).copy()
            runs.append((y, dx, jit.grads.copy()))
    finally:
        numba.set_num_threads(before)
    for run in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("name", ["fmnist-cnn", "lenet"])
def test_training_steps_on_both_paths_agree(monkeypatch, dtype, tol, name):
    """A few Adam steps of a whole network with dropout, NumPy path against compiled path."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((12, 28, 28, 1)).astype(dtype)
    labels = rng.integers(0, 10, 12)
    params, layers = [], []
    for choice in ("numpy", "jit"):
        monkeypatch.setenv(cpu_kernels.ENV, choice)
        net = model_mod.build(name, get_backend("cpu", np.dtype(dtype).name), seed=0)
        opt = optim.create("adam", net.params, net.grads, 1e-3, decay_ranges=net.decay_ranges)
        loss = SoftmaxCrossEntropy()
        for step in range(3):
            loss.forward(net.forward(x, train=True, step=step), labels)
            net.backward(loss.backward())
            opt.step()
        params.append(net.params.copy())
        layers.append(net.layers)
    assert any(getattr(layer, "jit", False) for layer in layers[1])
    assert not any(getattr(layer, "jit", False) for layer in layers[0])
    assert rel(params[1], params[0]) < tol


def test_the_switch_and_the_fallback_without_numba(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "numpy")
    assert not cpu_kernels.active()
    monkeypatch.setenv(cpu_kernels.ENV, "jit")
    assert cpu_kernels.active()
    monkeypatch.setenv(cpu_kernels.ENV, "fortran")
    with pytest.raises(ValueError, match=r"DDP_CNN_CPU_KERNELS: expected one of jit\|numpy, got .fortran."):
        cpu_kernels.active()
    # Numba missing: the NumPy path runs, with one warning when jit was asked for.
    monkeypatch.setenv(cpu_kernels.ENV, "jit")
    monkeypatch.setattr(cpu_kernels, "numba", None)
    monkeypatch.setattr(cpu_kernels, "_warned", False)
    with pytest.warns(RuntimeWarning, match="NumPy kernels run"):
        net = model_mod.build("fmnist-cnn", get_backend("cpu"), seed=0)
    assert not any(getattr(layer, "jit", False) for layer in net.layers)
    x = np.random.default_rng(11).standard_normal((4, 28, 28, 1)).astype(np.float32)
    assert np.isfinite(net.forward(x, train=True)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,f,bias", [(70, 45, 9, True), (5, 100, 33, False), (32, 32, 1, True),
                                        (50, 300, 300, True)])  # the last over DENSE_PARALLEL_MIN
def test_compiled_dense_matches_the_numpy_dense(monkeypatch, dtype, n, d, f, bias):
    """Blocks of cpu_gemm.DENSE_BLOCK rows and features, the last one short; on the calling
    thread below cpu_gemm.DENSE_PARALLEL_MIN multiply-adds, on every core above."""
    assert 50 * 300 * 300 >= cpu_gemm.DENSE_PARALLEL_MIN > 70 * 45 * 9
    bk = get_backend("cpu", np.dtype(dtype).name)
    nets = []
    for choice in ("numpy", "jit"):
        monkeypatch.setenv(cpu_kernels.ENV, choice)
        nets.append(Sequential([L.Dense(f, bias=bias)], (d,), bk, seed=0))
    assert [net.layers[0].jit for net in nets] == [False, True]
    rng = np.random.default_rng(12)
    start = rng.standard_normal(nets[0].num_params)
    x = rng.standard_normal((n, d)).astype(dtype)
    dy = rng.standard_normal((n, f)).astype(dtype)
    out = []
    for net in nets:
        net.params[...] = start
        y = net.forward(x, train=True).copy()
        dx = net.layers[0].backward(dy).copy()
        out.append((y, dx, net.grads.copy()))
    for a, b in zip(out[1], out[0]):
        assert rel(a, b) < TOL[dtype]
    nets[1].forward(x, train=True)
    assert nets[1].layers[0].backward(dy, need_dx=False) is None
    assert np.array_equal(nets[1].grads, out[1][2])


def test_a_bad_switch_value_exits_2_with_one_line_naming_it(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, cpu_kernels.ENV: "fortran", "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-m", "ddp_cnn.train", "--data", str(tmp_path / "none"), "--device", "cpu",
                          "--run-dir", str(tmp_path / "run")], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: DDP_CNN_CPU_KERNELS: expected one of jit|numpy, got 'fortran'"]
    assert not (tmp_path / "run").exists()

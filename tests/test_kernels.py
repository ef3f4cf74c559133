"""The fast CPU paths of ddp_cnn.model.kernels (and the layers that use them) against
the generic formulations they replace: same numbers, whatever the batch size,
chunking, dtype or how many models share the process."""
import numpy as np
import pytest

from ddp_cnn.model import kernels
from ddp_cnn.model import layers as L
from ddp_cnn.model import optim
from ddp_cnn.system.backend import get_backend, to_host
from ddp_cnn.model import Sequential, build
from helpers import BACKENDS

DTYPES = [np.float32, np.float64]


def xp_of(device):
    return get_backend(device).xp


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kh,kw,stride", [(3, 3, 1), (2, 2, 2), (3, 2, 2), (1, 3, 1), (2, 3, 3)])
def test_im2col_into_and_col2im_taps_match_the_generic_pair(device, dtype, kh, kw, stride):
    xp = xp_of(device)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 7, 2)).astype(dtype)
    oh, ow = (8 - kh) // stride + 1, (7 - kw) // stride + 1
    want = to_host(kernels.im2col(xp.asarray(x), kh, kw, stride, oh, ow))
    out = xp.full(want.shape, np.nan, dtype=dtype)
    got = kernels.im2col_into(xp.asarray(x), kh, kw, stride, oh, ow, out)
    assert got is out and np.array_equal(to_host(got), want)
    out_t = xp.full(want.T.shape, np.nan, dtype=dtype)
    got_t = kernels.im2col_t_into(xp.asarray(x), kh, kw, stride, oh, ow, out_t)
    assert got_t is out_t and np.array_equal(to_host(got_t), want.T)

    dcols = rng.standard_normal(want.shape).astype(dtype)
    generic = to_host(kernels.col2im(xp.asarray(dcols), x.shape, kh, kw, stride, oh, ow))
    taps = dcols.reshape(-1, kh * kw, 2).transpose(1, 0, 2).copy()  # (KH*KW, M, C)
    fast = to_host(kernels.col2im_taps(xp.asarray(taps), x.shape, kh, kw, stride, oh, ow))
    np.testing.assert_allclose(fast, generic, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)
    if stride == 1:  # taps of zero-padded rows, as wide as the image
        wide = np.zeros((kh * kw, 3, oh, 7, 2), dtype)
        wide[:, :, :, :ow, :] = taps.reshape(kh * kw, 3, oh, ow, 2)
        out = xp.zeros(x.shape, dtype=dtype)
        got = kernels.col2im_taps_wide(xp.asarray(wide.reshape(kh * kw, -1, 2)), out, kh, kw, oh)
        assert got is out
        np.testing.assert_allclose(to_host(got), generic, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)


def generic_pool(x, k, mode):
    """The window-view path: argmax/argmin over (N, OH, OW, KH*KW, C) and a one-hot backward (k: int or pair)."""
    kh, kw = (k, k) if np.isscalar(k) else k
    n, h, w, c = x.shape
    win = x.reshape(n, h // kh, kh, w // kw, kw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // kh, w // kw, kh * kw, c)
    arg = win.argmax(axis=3) if mode == "max" else win.argmin(axis=3)
    y = np.take_along_axis(win, arg[:, :, :, None, :], axis=3)[:, :, :, 0, :]
    return y, arg


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("k", [2, 3, (2, 3), (3, 1)])
def test_tiled_pooling_matches_argmax_including_ties(device, dtype, mode, k):
    xp = xp_of(device)
    kh, kw = (k, k) if np.isscalar(k) else k
    rng = np.random.default_rng(1)
    # Small integers: many windows hold ties, which must go to the first position.
    x = rng.integers(-2, 3, (5, 6 * kh, 4 * kw, 3)).astype(dtype)
    y_want, arg_want = generic_pool(x, k, mode)
    y, arg = kernels.pool_tiles_forward(xp.asarray(x), kh, kw, mode)
    assert np.array_equal(to_host(y), y_want)
    assert np.array_equal(to_host(arg), arg_want)

    dy = rng.standard_normal(y_want.shape).astype(dtype)
    onehot = (arg_want[:, :, :, None, :] == np.arange(kh * kw)[None, None, None, :, None]) * dy[:, :, :, None, :]
    n, oh, ow, _, c = onehot.shape
    dx_want = onehot.reshape(n, oh, ow, kh, kw, c).transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)
    dx = kernels.pool_tiles_backward(xp.asarray(dy), arg, kh, kw)
    assert np.array_equal(to_host(dx), dx_want)


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("stride", [(2, 1), (1, 3), (2, 3)])
def test_window_view_and_its_adjoint_take_a_stride_per_axis(device, stride):
    """<col2im(d), x> = <d, window_view(x)>, and each window starts at (oh*sh, ow*sw)."""
    xp = xp_of(device)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 8, 3))
    kh, kw, (sh, sw) = 2, 3, stride
    oh, ow = (7 - kh) // sh + 1, (8 - kw) // sw + 1
    win = to_host(kernels.window_view(xp.asarray(x), kh, kw, stride, oh, ow))
    for i, j in [(0, 0), (oh - 1, ow - 1), (1, ow // 2)]:
        assert np.array_equal(win[:, i, j], x[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :])
    d = rng.standard_normal(win.shape)
    back = to_host(kernels.scatter_windows(xp.asarray(d), x.shape, kh, kw, stride, oh, ow))
    assert np.isclose((back * x).sum(), (d * win).sum(), rtol=1e-12)


def test_padding_and_stride_pairs_resolve_per_axis():
    assert kernels.resolve_padding((1, 2), (5, 5), (3, 5), 1) == ((1, 1), (2, 2))
    assert kernels.resolve_padding(1, (5, 5), (3, 3), (1, 2)) == ((1, 1), (1, 1))
    # 'same' with strides (1, 2): outputs 5 and ceil(5/2) = 3.
    assert kernels.resolve_padding("same", (5, 5), (3, 3), (1, 2)) == ((1, 1), (1, 1))
    assert kernels.resolve_padding("same", (6, 6), (2, 2), (1, 2)) == ((0, 1), (0, 0))
    for bad in (-1, (1, -1), (1, 2, 3), 1.5, "full"):
        with pytest.raises(ValueError, match="padding"):
            kernels.resolve_padding(bad, (5, 5), (3, 3), 1)


def test_tiled_pooling_is_the_same_whatever_the_chunk(monkeypatch):
    x = np.random.default_rng(2).standard_normal((9, 8, 8, 4)).astype(np.float32)
    whole = kernels.pool_tiles_forward(x, 2, 2, "max")
    monkeypatch.setattr(kernels, "L2_BYTES", 1)  # one image per chunk
    one = kernels.pool_tiles_forward(x, 2, 2, "max")
    assert all(np.array_equal(a, b) for a, b in zip(whole, one))


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 1.0])
def test_leaky_relu_kernel_is_exactly_the_where_formula(device, dtype, alpha, monkeypatch):
    xp = xp_of(device)
    x = np.random.default_rng(3).standard_normal((7, 5, 4, 3)).astype(dtype)
    x[0, 0, 0] = 0.0  # x == 0 takes alpha, as x > 0 says
    slope_want = np.where(x > 0, dtype(1.0), dtype(alpha))
    for l2 in (kernels.L2_BYTES, 1):  # whole batch, then one row per chunk
        monkeypatch.setattr(kernels, "L2_BYTES", l2)
        y, slope = kernels.leaky_relu(xp.asarray(x), alpha)
        assert np.array_equal(to_host(slope), slope_want)
        assert np.array_equal(to_host(y), x * slope_want)
        s_out, y_out = xp.empty(x.shape, dtype=dtype), xp.empty(x.shape, dtype=dtype)
        y, slope = kernels.leaky_relu(xp.asarray(x), alpha, s_out, y_out)
        assert y is y_out and slope is s_out
        assert np.array_equal(to_host(y), x * slope_want)


@pytest.mark.parametrize("alpha", [0.1, -0.5, 1.5])
def test_leaky_relu_layer_matches_its_formula_bitwise(alpha):
    layer = L.LeakyReLU(alpha)
    Sequential([layer], (4, 4, 3), get_backend("cpu"))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 4, 4, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    slope = np.where(x > 0, np.float32(1.0), np.float32(alpha))
    for train in (True, False):
        assert np.array_equal(layer.forward(x, train), x * slope)
        assert np.array_equal(layer.backward(dy), dy * slope)


def test_scratch_hands_out_one_array_per_name_shape_and_dtype():
    s = kernels.Scratch()
    a = s.get("y", (4, 3), np.float32, np)
    assert a.shape == (4, 3) and a.dtype == np.float32 and a.flags.c_contiguous
    assert s.get("y", [4, 3], np.float32, np) is a  # the same array, step after step
    others = [s.get("y", (2, 3), np.float32, np), s.get("y", (4, 3), np.float64, np), s.get("z", (4, 3), np.float32, np)]
    assert not any(np.shares_memory(a, o) for o in others)  # another shape, dtype or name: its own array
    assert s.get("y", (2, 3), np.float32, np) is others[0]  # a short last batch gets its own, reused too
    assert len(s.arrays) == 4
    ones = s.ones("ones", 5, np.float32, np)
    ones[0] = 7  # a caller that writes into them does not get its writes back as ones...
    assert s.ones("ones", 5, np.float32, np) is ones
    assert s.get("ones", (5,), np.float32, np) is ones  # ...but the ones are filled once, on allocation


def train_steps(model, batches, seed=0):
    """Logits and gradients of one Adam step per batch (train mode, dropout on)."""
    opt = optim.create("adam", model.params, model.grads, 1e-3)
    loss = L.SoftmaxCrossEntropy()
    out = []
    for step, (x, y) in enumerate(batches):
        logits = model.forward(x, train=True, step=step)
        loss.forward(logits, y)
        model.backward(loss.backward())
        out.append((logits.copy(), model.grads.copy()))
        opt.step()
    return out


def batches(sizes, seed=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, 28, 28, 1)).astype(dtype), rng.integers(0, 10, n)) for n in sizes]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reused_buffers_survive_batch_size_changes_and_a_second_model(dtype):
    """Two fmnist-cnn models interleaved, batch sizes 16, 5 (a short last batch), 16,
    give what one model alone gives, step by step."""
    bk = get_backend("cpu", dtype)
    data = batches([16, 5, 16], dtype=bk.dtype)
    alone = train_steps(build("fmnist-cnn", bk, seed=3), data)
    a, b = build("fmnist-cnn", bk, seed=3), build("fmnist-cnn", bk, seed=3)
    opt_a = optim.create("adam", a.params, a.grads, 1e-3)
    opt_b = optim.create("adam", b.params, b.grads, 1e-3)
    loss = L.SoftmaxCrossEntropy()
    for step, (x, y) in enumerate(data):
        logits_a = a.forward(x, train=True, step=step)
        logits_b = b.forward(x, train=True, step=step)  # b's forward between a's forward and backward
        loss.forward(logits_a, y)
        a.backward(loss.backward())
        loss.forward(logits_b, y)
        b.backward(loss.backward())
        b.predict(x[:3])  # an eval pass of another batch size in between, too
        for model in (a, b):
            np.testing.assert_array_equal(model.grads, alone[step][1])
        np.testing.assert_array_equal(logits_a, alone[step][0])
        opt_a.step()
        opt_b.step()


def test_eval_outputs_held_by_the_caller_do_not_change():
    """Eval mode allocates: a library user's predictions are never overwritten (train
    mode reuses its buffers, so a training forward's logits last until the next one)."""
    model = build("fmnist-cnn", get_backend("cpu"), seed=1)
    (x1, _), (x2, _) = batches([4, 4])
    first_layer = model.layers[0].forward(x1, train=False)
    first = model.forward(x1)
    keep, keep_layer = first.copy(), first_layer.copy()
    model.layers[0].forward(x2, train=False)
    model.forward(x2)
    model.forward(x2, train=True, step=0)
    assert np.array_equal(first, keep) and np.array_equal(first_layer, keep_layer)
    predicted = model.predict(x1)
    model.predict(x2)
    assert np.array_equal(predicted, keep)


def scratch_pointers(model):
    return {(i, key): arr.__array_interface__["data"][0]
            for i, layer in enumerate(model.layers) for key, arr in layer.scratch.arrays.items()}


@pytest.mark.parametrize("name,kw", [("fmnist-cnn", {}), ("fmnist-cnn", {"batchnorm": True}), ("lenet", {}),
                                     ("mlp", {"batchnorm": True, "dropout": True})])
def test_training_steps_after_the_first_reuse_the_same_buffers(name, kw):
    """What a CUDA graph needs: after a warm-up step, every layer's working and output
    arrays are the same memory at every step, and no new ones appear."""
    model = build(name, get_backend("cpu"), seed=2, **kw)
    data = batches([6, 6, 6], seed=7)
    train_steps(model, data[:1])
    before = scratch_pointers(model)
    assert before  # the layers do work in their scratch
    logits = model.forward(data[1][0], train=True, step=1)
    train_steps(model, data[1:])
    assert scratch_pointers(model) == before
    again = model.forward(data[2][0], train=True, step=5)
    assert again.__array_interface__["data"][0] == logits.__array_interface__["data"][0]  # valid until the next


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("stride", [1, 2])
def test_chunked_conv_equals_one_chunk(monkeypatch, dtype, stride):
    bk = get_backend("cpu", dtype)
    conv = L.Conv2D(5, 3, stride=stride, padding="same")
    model = Sequential([conv], (9, 8, 3), bk, seed=2)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 9, 8, 3)).astype(bk.dtype)
    dy = rng.standard_normal((7,) + model.output_shape).astype(bk.dtype)

    def run():
        y = conv.forward(x, train=True).copy()
        dx = conv.backward(dy).copy()
        return y, dx, model.grads.copy()

    monkeypatch.setattr(kernels, "CHUNK_BYTES", 1 << 40)
    assert len(kernels.batch_chunks(7, 100)) == 1
    whole = run()
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)  # one image at a time
    assert len(kernels.batch_chunks(7, 100)) == 7
    one = run()
    tol = 1e-5 if dtype == "float32" else 1e-12
    for w, o in zip(whole, one):
        np.testing.assert_allclose(o, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_adam_is_bitwise_the_textbook_update(monkeypatch, dtype):
    monkeypatch.setattr(optim, "_CHUNK", 1000)  # several slices, one short
    n = 4321
    rng = np.random.default_rng(7)
    p = rng.standard_normal(n).astype(dtype)
    g = np.zeros(n, dtype)
    ref, m, v = p.copy(), np.zeros(n, dtype), np.zeros(n, dtype)
    opt = optim.create("adam", p, g, 1e-3)
    for t in range(1, 4):
        g[...] = rng.standard_normal(n).astype(dtype)
        opt.step()
        m *= 0.9
        m += (1 - 0.9) * g
        v *= 0.999
        v += (1 - 0.999) * (g * g)
        step = 1e-3 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        eps_hat = 1e-8 * np.sqrt(1 - 0.999 ** t)
        ref -= float(step) * (m / (np.sqrt(v) + float(eps_hat)))
        assert np.array_equal(p, ref)
    assert np.array_equal(opt.state["m"], m) and np.array_equal(opt.state["v"], v)

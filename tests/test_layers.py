"""Every layer's backward against central finite differences in float64, and
conv/pool forward against direct nested-loop references."""
import numpy as np
import pytest

from ddp_cnn.model import cpu_kernels
from ddp_cnn.model import layers as L
from ddp_cnn.system.backend import get_backend, to_host
from ddp_cnn.model import Sequential
from helpers import BACKENDS, backend64, check_layer_gradients, rel_error

@pytest.fixture(autouse=True, params=["jit", "numpy"])
def cpu_path(request, monkeypatch):
    """Every check on both CPU paths: the compiled kernels (cpu_kernels) and the NumPy reference."""
    if request.param == "jit" and cpu_kernels.numba is None:
        pytest.skip("numba, scipy or threadpoolctl is missing: the compiled CPU kernels cannot run")
    monkeypatch.setenv(cpu_kernels.ENV, request.param)
    return request.param


CONV_CASES = [  # (kernel, stride, padding, input H, W, C)
    (3, 1, "valid", 5, 6, 2),
    (3, 1, "same", 5, 5, 2),
    (3, 2, "same", 6, 5, 2),
    (3, 2, 1, 5, 5, 1),
    (5, 1, "same", 6, 6, 1),  # lenet's first conv
    (2, 3, "valid", 7, 7, 2),  # stride larger than the kernel: gaps
    ((1, 3), 1, "valid", 4, 5, 2),
    (3, 1, 3, 4, 4, 2),  # padding >= kernel
    ((2, 3), 1, 1, 4, 5, 2),
]


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("k,stride,padding,h,w,c", CONV_CASES)
def test_conv2d_gradients(device, k, stride, padding, h, w, c):
    check_layer_gradients(L.Conv2D(3, k, stride=stride, padding=padding), (h, w, c), device)


@pytest.mark.parametrize("device", BACKENDS)
def test_conv2d_without_bias_gradients(device):
    check_layer_gradients(L.Conv2D(2, 3, bias=False), (4, 4, 2), device)


POOL_CASES = [  # (window, stride, padding, H, W, C)
    (2, None, 0, 4, 6, 2),   # tiling windows: the reshape path
    (2, None, 0, 5, 5, 2),   # 5 is not a multiple of 2: the window-view path
    (3, 2, 1, 5, 5, 2),      # overlapping windows with padding
    (3, 1, 0, 4, 4, 1),
    (2, 1, 1, 3, 3, 2),
    ((2, 3), None, 0, 6, 9, 2),         # non-square window, default stride (2, 3): tiles
    ((3, 2), (1, 2), (1, 1), 5, 6, 2),  # per-axis stride and padding: the window-view path
    ((2, 3), 2, (1, 0), 5, 7, 1),
]


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "avg", "min"])
@pytest.mark.parametrize("k,stride,padding,h,w,c", POOL_CASES)
def test_pool_gradients(device, mode, k, stride, padding, h, w, c):
    check_layer_gradients(L.Pool2D(k, stride, padding, mode), (h, w, c), device)


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("layer,shape", [
    (lambda: L.Dense(4), (5,)),
    (lambda: L.Dense(3, bias=False), (4,)),
    (lambda: L.Flatten(), (3, 2, 2)),
    (lambda: L.GlobalAvgPool2D(), (3, 4, 2)),
    (lambda: L.ReLU(), (4, 3)),
    (lambda: L.LeakyReLU(0.1), (3, 3, 2)),
    (lambda: L.PReLU(), (3, 3, 2)),
    (lambda: L.PReLU(), (6,)),
    (lambda: L.Sigmoid(), (7,)),
    (lambda: L.Tanh(), (7,)),
    (lambda: L.ELU(), (7,)),
    (lambda: L.BatchNorm(), (3, 3, 2)),
    (lambda: L.BatchNorm(), (5,)),
    (lambda: L.Dropout(0.4), (4, 3)),
], ids=lambda v: v if isinstance(v, tuple) else v().name)
def test_layer_gradients(device, layer, shape):
    check_layer_gradients(layer(), shape, device, batch=3)


@pytest.mark.parametrize("device", BACKENDS)
def test_batchnorm_eval_mode_gradients(device):
    check_layer_gradients(L.BatchNorm(), (2, 2, 3), device, batch=3, train=False)


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("smoothing,weight,temperature", [
    (0.0, 0.0, 1.0), (0.1, 0.0, 1.0),  # the plain loss
    (0.0, 1.0, 1.0), (0.1, 0.6, 3.0), (0.0, 0.3, 0.5)])  # distillation from a teacher's logits
def test_softmax_cross_entropy_gradient(device, smoothing, weight, temperature):
    bk = backend64(device)
    xp = bk.xp
    rng = np.random.default_rng(3)
    logits = xp.asarray(rng.standard_normal((4, 5)) * 3)
    teacher = xp.asarray(rng.standard_normal((4, 5)) * 3) if weight else None
    labels = xp.asarray(rng.integers(0, 5, 4))
    loss = L.SoftmaxCrossEntropy(smoothing, distill_weight=weight, temperature=temperature)
    loss.forward(logits, labels, teacher)
    analytic = to_host(loss.backward())
    numeric = np.zeros_like(analytic)
    flat = logits.reshape(-1)
    for i in range(flat.size):
        old = float(flat[i])
        flat[i] = old + 1e-6
        up = float(loss.forward(logits, labels, teacher))
        flat[i] = old - 1e-6
        down = float(loss.forward(logits, labels, teacher))
        flat[i] = old
        numeric.reshape(-1)[i] = (up - down) / 2e-6
    assert rel_error(analytic, numeric) < 1e-6


def test_distillation_loss_value():
    rng = np.random.default_rng(5)
    logits, teacher = rng.standard_normal((3, 4)) * 2, rng.standard_normal((3, 4)) * 2
    labels = np.array([0, 3, 1])
    hard = float(L.SoftmaxCrossEntropy(0.1).forward(logits, labels))
    # KL(q || p) at temperature 2, by hand.
    q = np.exp(teacher / 2) / np.exp(teacher / 2).sum(axis=1, keepdims=True)
    p = np.exp(logits / 2) / np.exp(logits / 2).sum(axis=1, keepdims=True)
    kl = (q * np.log(q / p)).sum(axis=1).mean()
    got = float(L.SoftmaxCrossEntropy(0.1, distill_weight=0.25, temperature=2.0).forward(logits, labels, teacher))
    assert got == pytest.approx(0.75 * hard + 0.25 * 4 * kl, rel=1e-12)
    # A student that already predicts the teacher's logits has nothing to learn from them.
    only_soft = L.SoftmaxCrossEntropy(distill_weight=1.0, temperature=3.0)
    assert float(only_soft.forward(teacher, labels, teacher)) == pytest.approx(0.0, abs=1e-15)
    assert np.abs(only_soft.backward()).max() < 1e-15
    # Weight 0 and no teacher are the plain loss, bitwise.
    assert float(L.SoftmaxCrossEntropy(0.1, 0.0, 2.0).forward(logits, labels, teacher)) == hard
    with pytest.raises(ValueError, match="distill_weight"):
        L.SoftmaxCrossEntropy(distill_weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        L.SoftmaxCrossEntropy(temperature=0.0)


def test_softmax_cross_entropy_value_and_stability():
    loss = L.SoftmaxCrossEntropy()
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # overflow or nan would raise
        value = float(loss.forward(logits, np.array([0, 2])))
    assert value == pytest.approx((0.0 + np.log(3.0)) / 2, rel=1e-12)
    smoothed = L.SoftmaxCrossEntropy(0.3)
    uniform = np.zeros((1, 4))
    assert float(smoothed.forward(uniform, np.array([1]))) == pytest.approx(np.log(4.0), rel=1e-12)


def test_activations_do_not_overflow():
    bk = get_backend("cpu", "float64")
    x = np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]])
    for layer in (L.Sigmoid(), L.Tanh(), L.ELU()):
        Sequential([layer], (5,), bk)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            y = layer.forward(x, train=True)
            layer.backward(np.ones_like(x))
        assert np.all(np.isfinite(y))
        assert np.all(np.isfinite(layer.backward(np.ones_like(x))))


def test_whole_model_gradient_along_a_random_direction():
    """Directional derivative of a small conv net: two forwards, whatever the size."""
    bk = get_backend("cpu", "float64")
    layers = [L.Conv2D(3, 3, padding="same"), L.BatchNorm(), L.PReLU(), L.MaxPool2D(2), L.Conv2D(4, 3, stride=2),
              L.ELU(), L.Flatten(), L.Dropout(0.3), L.Dense(5)]
    model = Sequential(layers, (8, 8, 2), bk, seed=5)
    loss = L.SoftmaxCrossEntropy(0.1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 2))
    y = rng.integers(0, 5, 4)
    loss.forward(model.forward(x, train=True, step=1), y)
    model.backward(loss.backward())
    direction = rng.standard_normal(model.num_params)
    analytic = float(model.grads @ direction)
    base = model.params.copy()
    eps = 1e-6
    model.params[...] = base + eps * direction
    up = float(loss.forward(model.forward(x, train=True, step=1), y))
    model.params[...] = base - eps * direction
    down = float(loss.forward(model.forward(x, train=True, step=1), y))
    numeric = (up - down) / (2 * eps)
    assert abs(analytic - numeric) / max(abs(numeric), 1e-12) < 1e-6


# ---- forward against nested-loop references -------------------------------

def conv_reference(x, w, b, stride, pads):
    (t, bt), (l, r) = pads
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    xp = np.zeros((n, h + t + bt, wd + l + r, c))
    xp[:, t:t + h, l:l + wd] = x
    oh = (h + t + bt - kh) // stride + 1
    ow = (wd + l + r - kw) // stride + 1
    out = np.zeros((n, oh, ow, f))
    for i in range(n):
        for y in range(oh):
            for xx in range(ow):
                for o in range(f):
                    total = b[o]
                    for dy in range(kh):
                        for dx in range(kw):
                            for ch in range(c):
                                total += xp[i, y * stride + dy, xx * stride + dx, ch] * w[dy, dx, ch, o]
                    out[i, y, xx, o] = total
    return out


def pool_reference(x, k, stride, pads, mode):
    """k and stride: an int or a (height, width) pair."""
    (kh, kw), (sh, sw) = [(v, v) if np.isscalar(v) else v for v in (k, stride)]
    (t, bt), (l, r) = pads
    n, h, w, c = x.shape
    fill = {"max": -np.inf, "min": np.inf, "avg": 0.0}[mode]
    xp = np.full((n, h + t + bt, w + l + r, c), fill)
    xp[:, t:t + h, l:l + w] = x
    oh = (h + t + bt - kh) // sh + 1
    ow = (w + l + r - kw) // sw + 1
    out = np.zeros((n, oh, ow, c))
    reduce = {"max": max, "min": min, "avg": lambda v: sum(v) / len(v)}[mode]
    for i in range(n):
        for y in range(oh):
            for xx in range(ow):
                for ch in range(c):
                    out[i, y, xx, ch] = reduce([xp[i, y * sh + a, xx * sw + bb, ch]
                                                for a in range(kh) for bb in range(kw)])
    return out


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("k,stride,padding", [(3, 1, "valid"), (3, 1, "same"), (3, 2, "same"), (5, 2, 2), (2, 2, 0)])
def test_conv2d_forward_matches_nested_loops(device, k, stride, padding):
    bk = backend64(device)
    layer = L.Conv2D(4, k, stride=stride, padding=padding)
    model = Sequential([layer], (7, 6, 3), bk, seed=1)
    model.params[...] = bk.xp.asarray(np.random.default_rng(0).standard_normal(model.num_params))
    x = np.random.default_rng(1).standard_normal((2, 7, 6, 3))
    got = to_host(model.forward(bk.xp.asarray(x)))
    want = conv_reference(x, to_host(layer.params["W"]), to_host(layer.params["b"]), stride, layer.pads)
    assert got.shape == want.shape
    assert rel_error(got, want) < 1e-12


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "avg", "min"])
@pytest.mark.parametrize("k,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 0), (2, 1, 1), ((2, 3), (2, 3), 0),
                                              ((3, 2), (1, 2), (1, 1)), ((2, 3), 2, (1, 0))])
def test_pool_forward_matches_nested_loops(device, mode, k, stride, padding):
    bk = backend64(device)
    layer = L.Pool2D(k, stride, padding, mode)
    Sequential([layer], (6, 5, 2), bk)
    x = np.random.default_rng(2).standard_normal((2, 6, 5, 2))
    got = to_host(layer.forward(bk.xp.asarray(x)))
    want = pool_reference(x, k, stride, layer.pads, mode)
    assert got.shape == want.shape
    assert rel_error(got, want) < 1e-12


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "avg", "min"])
def test_non_square_window_strides_by_the_window_on_each_axis(device, mode):
    """PyTorch's and Keras's default stride: Pool2D((2, 3)) on 6x9 gives 3x3 (not 3x4)."""
    bk = backend64(device)
    layer = L.Pool2D((2, 3), mode=mode)
    assert Sequential([layer], (6, 9, 2), bk).output_shape == (3, 3, 2)
    assert layer.tiles  # windows (2, 3) at stride (2, 3) tile 6x9: the fast path
    x = np.random.default_rng(4).standard_normal((2, 6, 9, 2))
    got = to_host(layer.forward(bk.xp.asarray(x)))
    want = x.reshape(2, 3, 2, 3, 3, 2)  # (n, oh, kh, ow, kw, c)
    want = {"max": want.max(axis=(2, 4)), "min": want.min(axis=(2, 4)), "avg": want.mean(axis=(2, 4))}[mode]
    assert rel_error(got, want) < 1e-14
    explicit = L.Pool2D((2, 3), (2, 3), mode=mode)
    Sequential([explicit], (6, 9, 2), bk)
    assert np.array_equal(to_host(explicit.forward(bk.xp.asarray(x))), got)


@pytest.mark.parametrize("k,padding", [(2, 2), (3, 2), ((3, 2), (1, 2)), ((2, 4), (2, 1))])
def test_pool_padding_over_half_the_window_is_refused(k, padding):
    """PyTorch's rule, pad <= kernel/2 per axis: more lets a window hold only padding (+-inf, then a NaN loss)."""
    with pytest.raises(ValueError, match=r"layer 'edge_pool': padding .* more than half the"):
        Sequential([L.Pool2D(k, 1, padding, name="edge_pool")], (4, 4, 1), get_backend("cpu"))


@pytest.mark.parametrize("mode", ["max", "avg", "min"])
@pytest.mark.parametrize("k,padding", [(2, 1), (3, 1), ((3, 2), (1, 1)), ((2, 4), (1, 2)), (3, "same")])
def test_pool_padding_up_to_half_the_window_gives_finite_outputs(mode, k, padding):
    layer = L.Pool2D(k, 1, padding, mode)
    Sequential([layer], (4, 5, 2), get_backend("cpu", "float64"))
    y = layer.forward(np.random.default_rng(0).standard_normal((2, 4, 5, 2)))
    assert np.isfinite(y).all()


def test_pool_strides_and_paddings_as_pairs_survive_the_model_description():
    import json
    from ddp_cnn import model as model_mod
    bk = backend64()
    model = Sequential([L.Conv2D(3, 3, padding=(1, 0)), L.Pool2D((3, 2), stride=(1, 2), padding=(1, 1)),
                        L.AvgPool2D((2, 3)), L.Flatten(), L.Dense(4)], (9, 10, 2), bk, seed=5)
    desc = json.loads(json.dumps(model.describe()))  # what a checkpoint stores
    assert desc == model.describe()
    again = model_mod.from_description(desc, bk, seed=5)
    assert again.describe() == desc and again.output_shape == model.output_shape
    assert [l.output_shape for l in again.layers] == [(9, 8, 3), (9, 5, 3), (4, 1, 3), (12,), (4,)]
    x = np.random.default_rng(1).standard_normal((2, 9, 10, 2))
    assert np.array_equal(again.forward(x), model.forward(x))


@pytest.mark.parametrize("bad", [(2, 3, 1), 1.5, (2, "3"), True])
def test_pool_refuses_strides_that_are_not_an_int_or_a_pair(bad):
    with pytest.raises(ValueError, match="stride"):
        L.Pool2D(2, bad)


def test_same_padding_keeps_size_and_stride_halves_it():
    bk = get_backend("cpu")
    assert Sequential([L.Conv2D(2, 3, padding="same")], (9, 7, 1), bk).output_shape == (9, 7, 2)
    assert Sequential([L.Conv2D(2, 3, stride=2, padding="same")], (9, 7, 1), bk).output_shape == (5, 4, 2)
    assert Sequential([L.Conv2D(2, 5)], (9, 7, 1), bk).output_shape == (5, 3, 2)


# ---- modes ---------------------------------------------------------------

def test_dropout_is_identity_in_eval_and_inverted_in_train():
    bk = get_backend("cpu", "float64")
    layer = L.Dropout(0.5)
    Sequential([layer], (1000,), bk)
    x = np.ones((20, 1000))
    assert np.array_equal(layer.forward(x, train=False), x)
    y = layer.forward(x, train=True)
    assert set(np.unique(y)) <= {0.0, 2.0}
    assert abs(y.mean() - 1.0) < 0.02  # the scale keeps the expectation


def test_batchnorm_running_statistics_used_in_eval():
    bk = get_backend("cpu", "float64")
    layer = L.BatchNorm(momentum=1.0)
    model = Sequential([layer], (3,), bk)
    x = np.random.default_rng(0).normal(5.0, 2.0, (500, 3))
    out = layer.forward(x, train=True)
    assert np.allclose(out.mean(axis=0), 0, atol=1e-12) and np.allclose(out.std(axis=0), 1, atol=1e-6)
    assert np.allclose(layer.buffers["running_mean"], x.mean(axis=0))
    assert np.allclose(layer.buffers["running_var"], x.var(axis=0, ddof=1))
    assert np.allclose(layer.forward(x, train=False), (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + 1e-5))
    assert model.named_buffers()["batchnorm.running_mean"] is layer.buffers["running_mean"]


# ---- bad input -------------------------------------------------------------

def test_wrong_input_shape_names_the_layer_and_the_expected_shape():
    model = Sequential([L.Conv2D(2, 3, name="conv_a"), L.Flatten(), L.Dense(3)], (6, 6, 1), get_backend("cpu"))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 6, 6, 1\), got \(2, 5, 6, 1\)"):
        model.forward(np.zeros((2, 5, 6, 1), np.float32))
    with pytest.raises(ValueError, match=r"layer 'conv_a': expected input of shape \(batch, 6, 6, 1\)"):
        model.layers[0].forward(np.zeros((2, 6, 6, 3), np.float32))
    with pytest.raises(ValueError, match="expected input dtype float32, got float64"):
        model.forward(np.zeros((2, 6, 6, 1)))
    with pytest.raises(ValueError, match="layer 'conv_a': expected dtype float32, got int64"):
        model.layers[0].forward(np.zeros((2, 6, 6, 1), np.int64))


def test_bad_layer_arguments_are_refused():
    with pytest.raises(ValueError, match="padding"):
        Sequential([L.Conv2D(2, 3, padding="full")], (5, 5, 1), get_backend("cpu"))
    with pytest.raises(ValueError, match="does not fit"):
        Sequential([L.Conv2D(2, 7)], (5, 5, 1), get_backend("cpu"))
    with pytest.raises(ValueError, match="Flatten"):
        Sequential([L.Dense(2)], (5, 5, 1), get_backend("cpu"))
    with pytest.raises(ValueError, match="mode"):
        L.Pool2D(2, mode="median")
    with pytest.raises(ValueError, match="initialiser"):
        L.Dense(3, init="normalish")


def test_mlp_with_batchnorm_and_one_dropout_rate_round_trips_its_description():
    from ddp_cnn import model as model_mod
    m = model_mod.build("mlp", get_backend("cpu"), batchnorm=True, dropout=True, dropout_rate=0.4)
    kinds = [type(layer).__name__ for layer in m.layers]
    assert kinds == ["Flatten", "Dense", "BatchNorm", "ReLU", "Dropout", "Dense", "BatchNorm", "ReLU", "Dropout",
                     "Dense"]
    assert [layer.rate for layer in m.layers if isinstance(layer, L.Dropout)] == [0.4, 0.4]
    assert not any("b" in layer.params for layer in m.layers[1:7] if isinstance(layer, L.Dense))
    again = model_mod.from_description(m.describe(), get_backend("cpu"))
    assert again.describe() == m.describe()


@pytest.mark.parametrize("name", ["fmnist-cnn", "fmnist-vgg", "lenet", "mlp"])
def test_the_cli_and_model_build_give_the_same_network(name):
    """The command line has always trained with dropout (--no-dropout removes it); build(name) now does too."""
    from ddp_cnn import model as model_mod
    from ddp_cnn.run.config import TrainConfig
    from ddp_cnn.cli.train import arch_kwargs
    bk = get_backend("cpu")
    cli = model_mod.build(name, bk, seed=1, **arch_kwargs(TrainConfig(model=name)))
    lib = model_mod.build(name, bk, seed=1)
    assert cli.describe()["layers"] == lib.describe()["layers"]
    assert np.array_equal(cli.params, lib.params)
    rates = {"fmnist-cnn": [0.25, 0.25, 0.5], "fmnist-vgg": [0.1, 0.2], "lenet": [0.25], "mlp": [0.2, 0.2]}[name]
    assert [layer.rate for layer in lib.layers if isinstance(layer, L.Dropout)] == rates
    assert not any(isinstance(layer, L.Dropout) for layer in model_mod.build(name, bk, dropout=False).layers)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_fmnist_cnn_pooling_before_the_activation_equals_seed_002_order(batchnorm):
    """fmnist-cnn max-pools before the activation; seed 002 activates first.  Same logits, same gradients."""
    from ddp_cnn import model as model_mod
    ours = model_mod.build("fmnist-cnn", backend64(), seed=3, batchnorm=batchnorm)
    seed_order = []
    for layer in ours.layers:  # swap each (MaxPool2D, activation) pair back
        if seed_order and isinstance(seed_order[-1], L.Pool2D) and isinstance(layer, L.LeakyReLU):
            seed_order.insert(len(seed_order) - 1, type(layer)(**layer.config))
        else:
            seed_order.append(type(layer)(**layer.config))
    assert [type(l).__name__ for l in seed_order[:5 + batchnorm * 2]] == (
        ["Conv2D", "LeakyReLU", "Conv2D", "LeakyReLU", "Pool2D"] if not batchnorm else
        ["Conv2D", "BatchNorm", "LeakyReLU", "Conv2D", "BatchNorm", "LeakyReLU", "Pool2D"])
    seed = Sequential(seed_order, (28, 28, 1), backend64(), seed=3)
    assert seed.param_names() == ours.param_names() and np.array_equal(seed.params, ours.params)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((4, 28, 28, 1)), rng.integers(0, 10, 4)
    results = []
    for model in (ours, seed):
        loss = L.SoftmaxCrossEntropy()
        logits = model.forward(x, train=True, step=5)  # dropout on: the masks are keyed by layer index
        loss.forward(logits, labels)
        model.backward(loss.backward())
        results.append((logits, model.grads.copy()))
    assert np.array_equal(results[0][0], results[1][0])
    assert rel_error(results[0][1], results[1][1]) < 1e-14


# ---- one process, whole batches (formerly checked against N CPU threads) ---

@pytest.mark.parametrize("layer,shape", [(lambda: L.Conv2D(3, 3), (5, 5, 2)),
                                         (lambda: L.Conv2D(3, 3, padding="same"), (4, 4, 1)),
                                         (lambda: L.Dense(4), (6,)),
                                         (lambda: L.BatchNorm(), (3, 3, 2))])
def test_gradients_on_an_odd_batch(layer, shape):
    check_layer_gradients(layer(), shape, batch=5)


def test_dropout_masks_are_bitwise_one_draw_of_the_stream():
    from ddp_cnn.model import kernels
    key, shape, p = (5, 2, 1, 9, 3), (3, 7, 5), 0.3
    u = np.random.default_rng(list(key)).random(shape, dtype=np.float32)  # the definition
    expected = (u < 1 - p).astype(np.float32) * np.float32(1 / (1 - p))
    assert np.array_equal(kernels.dropout_mask(shape, p, key, np, np.float32), expected)
    layer = L.Dropout(p)
    model = Sequential([layer], shape[1:], get_backend("cpu"), seed=5)
    model.rank = 1
    x = np.ones(shape, np.float32)
    y = model.forward(x, train=True, step=9)  # the model keys layer 0's mask (seed, stream, rank, step, layer)
    assert np.array_equal(y, kernels.dropout_mask(shape, p, (5, 2, 1, 9, 0), np, np.float32))


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_on_transposed_and_empty_batches(train):
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


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("shape", [(3,), (1, 1, 3)])
def test_batchnorm_refuses_one_value_per_channel_in_training(device, shape):
    """As PyTorch: x - mean(x) would be 0, the output beta whatever the input (mlp --batchnorm --local-batch-size 1)."""
    bk = backend64(device)
    layer = L.BatchNorm(name="bn_a")
    Sequential([layer], shape, bk)
    before = {k: to_host(v).copy() for k, v in layer.buffers.items()}
    x = bk.xp.asarray(np.random.default_rng(0).standard_normal((1,) + shape))
    with pytest.raises(ValueError, match=r"layer 'bn_a': expected more than 1 value per channel in training"):
        layer.forward(x, train=True)
    assert all(np.array_equal(before[k], to_host(v)) for k, v in layer.buffers.items())
    # Eval mode normalises with the running statistics: one image is fine.
    layer.buffers["running_mean"][...] = 0.5
    want = (to_host(x) - 0.5) / np.sqrt(1 + 1e-5)
    assert rel_error(layer.forward(x, train=False), want) < 1e-14
    # Two values per channel (a batch of 2, or one image of 2 pixels) train as before.
    layer.forward(bk.xp.concatenate([x, x + 1]), train=True)
    if len(shape) == 3:
        wide = L.BatchNorm()
        Sequential([wide], (1, 2, 3), bk)
        x2 = np.random.default_rng(1).standard_normal((1, 1, 2, 3))
        want = (x2 - x2.mean(axis=(0, 1, 2))) / np.sqrt(x2.var(axis=(0, 1, 2)) + 1e-5)
        assert rel_error(wide.forward(bk.xp.asarray(x2), train=True), want) < 1e-14


def test_mlp_with_batchnorm_refuses_a_local_batch_of_one():
    from ddp_cnn import model as model_mod
    model = model_mod.build("mlp", get_backend("cpu"), batchnorm=True)
    x = np.zeros((1, 28, 28, 1), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.forward(x, train=True)
    assert model.forward(x, train=False).shape == (1, 10)


def _train(steps=3, batch=7, **arch):
    """fmnist-cnn float64 (dropout on) after a few Adam steps; the model and the layers
    whose backward reported done, in order."""
    from ddp_cnn import model as model_mod
    from ddp_cnn.model import optim
    rng = np.random.default_rng(0)
    x, labels = rng.random((batch, 28, 28, 1)), rng.integers(0, 10, batch)
    model = model_mod.build("fmnist-cnn", backend64(), seed=0, **arch)
    model.rank = 1
    opt = optim.create("adam", model.params, model.grads, lr=1e-3)
    loss_layer = L.SoftmaxCrossEntropy()
    done = []
    for step in range(steps):
        logits = model.forward(x, train=True, step=step)
        loss_layer.forward(logits, labels)
        model.backward(loss_layer.backward(), done.append)
        opt.step()
    return model, done


@pytest.mark.parametrize("batchnorm", [False, True])
def test_training_is_deterministic_and_reports_every_layer_in_reverse_order(batchnorm):
    one, done = _train(batchnorm=batchnorm)
    assert done == [i for _ in range(3) for i in reversed(range(len(one.layers)))]
    again, _ = _train(batchnorm=batchnorm)
    assert np.array_equal(again.params, one.params)
    for name, value in one.named_buffers().items():
        assert np.array_equal(value, again.named_buffers()[name])


def test_each_layer_is_reported_once_its_gradient_is_final():
    """The reducer's hook: when layer i is reported, grads[:layer_ends[i]] no longer changes."""
    from ddp_cnn import model as model_mod
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
    assert np.array_equal(without_hook.grads, model.grads)


def test_the_gradient_buffer_has_one_spare_element_after_the_gradients():
    """The spare element carries the step's flags through the gradients' allreduce; backward never writes it."""
    from ddp_cnn import model as model_mod
    from ddp_cnn.model import optim
    model = model_mod.build("lenet", backend64(), seed=0)
    assert model.grad_buffer.shape == (model.num_params + 1,)
    assert model.grads.shape == (model.num_params,) and np.shares_memory(model.grads, model.grad_buffer)
    assert model.grads.__array_interface__["data"][0] == model.grad_buffer.__array_interface__["data"][0]
    model.grad_buffer[-1] = 3.0
    rng = np.random.default_rng(0)
    loss = L.SoftmaxCrossEntropy()
    loss.forward(model.forward(rng.random((4, 28, 28, 1)), train=True), rng.integers(0, 10, 4))
    model.backward(loss.backward())
    assert model.grad_buffer[-1] == 3.0
    assert np.array_equal(model.grad_buffer[:-1], model.grads)
    for name, p in model.named_params().items():  # every layer's gradient is a view into the buffer
        layer, what = name.rsplit(".", 1)
        grad = next(l for l in model.layers if l.name == layer).grads[what]
        assert np.shares_memory(grad, model.grad_buffer), name
    before = model.params.copy()
    optim.create("sgd", model.params, model.grads, 0.1).step()  # an optimizer over model.grads still works
    assert np.allclose(model.params, before - 0.1 * model.grads, rtol=0, atol=1e-15)


# Pinned before the named architectures learnt other input shapes (issue 22): at 28x28x1 their
# parameters (seed 0, float32) and descriptions must stay bitwise what existing checkpoints hold.
NAMED_AT_28x28x1 = {
    "fmnist-cnn": (1736714, "2c02d55e2eb683324d226b77f0afcdae170258c57a59a562e58dd3e315e96d17",
                   "f8dbb642d06772229b69720e5c5385840a1683400ba02336527935b548d1314b"),
    "fmnist-vgg": (1147722, "172c2b9710faf0f58940e28bb43a86d63630f7f3df582e2581c9126451409c34",
                   "cd704e35c8948bd08f90550a4d5a76fe965f3f3002ac0a08740494c5c43499ce"),
    "lenet": (61706, "47f24c6b55c77e35ddd18c68ec285ca01568185e6d4293a858a6a79dcc9241ce",
              "b505eea2c3362085b7d2436b0ecdf1258e137d5d63cd3e3baca6c6a12c19f8b1"),
    "mlp": (109386, "bb007a84467c24ba7aba3114408ad5cab5a5463c49fe973845f7b74b1fb56126",
            "4c3704db9c77129bc65ad055a5861af055a7462cc22bcb738aa3cafa6504d755"),
}


@pytest.mark.parametrize("name", sorted(NAMED_AT_28x28x1))
def test_named_architectures_are_unchanged_at_28x28x1(name):
    import hashlib
    import json
    from ddp_cnn import model as model_mod
    m = model_mod.build(name, get_backend("cpu"), seed=0)
    digest = hashlib.sha256(np.asarray(m.params).tobytes()).hexdigest()
    desc = hashlib.sha256(json.dumps(m.describe(), sort_keys=True).encode()).hexdigest()
    assert (m.num_params, digest, desc) == NAMED_AT_28x28x1[name]


@pytest.mark.parametrize("name,shape,side", [("fmnist-cnn", (8, 8, 1), 12), ("lenet", (11, 40, 3), 12),
                                             ("fmnist-vgg", (3, 3, 1), 4)])
def test_a_named_architecture_refuses_too_small_images_naming_itself_and_the_shape(name, shape, side):
    from ddp_cnn import model as model_mod
    with pytest.raises(ValueError) as info:
        model_mod.build(name, get_backend("cpu"), input_shape=shape)
    message = str(info.value)
    assert message.startswith(f"model {name!r} does not fit images of shape {shape} (too small: each side must "
                              f"be at least {side}): layer ") and "\n" not in message
    model_mod.build(name, get_backend("cpu"), input_shape=(side, side, shape[2]))  # the smallest it takes


def test_conv_kernel_size_is_an_int_or_a_pair_of_ints():
    assert (L.Conv2D(2, (3, 5)).kh, L.Conv2D(2, (3, 5)).kw) == (3, 5)
    for bad in ("3", (3, 3, 3), 2.5):
        with pytest.raises(ValueError, match="Conv2D: kernel_size: expected an int or a pair of ints"):
            L.Conv2D(2, bad)

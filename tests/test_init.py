"""Weight initialisers: selectable per layer, with the variances their papers give."""
import math

import numpy as np
import pytest

from ddp_cnn.model import init
from ddp_cnn.model import layers as L
from ddp_cnn.system.backend import get_backend
from ddp_cnn.model import Sequential


@pytest.mark.parametrize("name,std", [
    ("he_normal", lambda fi, fo: math.sqrt(2 / fi)),
    ("he_uniform", lambda fi, fo: math.sqrt(2 / fi)),            # bound sqrt(6/fi): std bound/sqrt(3)
    ("glorot_normal", lambda fi, fo: math.sqrt(2 / (fi + fo))),
    ("glorot_uniform", lambda fi, fo: math.sqrt(2 / (fi + fo))),  # bound sqrt(6/(fi+fo))
    ("classifier", lambda fi, fo: 0.1 * math.sqrt(2 / (fi + fo))),  # a tenth of glorot_uniform
])
def test_initialiser_statistics(name, std):
    fan_in, fan_out = 400, 300
    w = init.get(name)(np.random.default_rng(0), (fan_in, fan_out), fan_in, fan_out)
    assert abs(w.mean()) < 0.1 * std(fan_in, fan_out)
    assert w.std() == pytest.approx(std(fan_in, fan_out), rel=0.02)
    if name.endswith("uniform") or name == "classifier":
        assert np.abs(w).max() <= std(fan_in, fan_out) * math.sqrt(3) + 1e-12


def test_initialiser_is_chosen_per_layer():
    model = Sequential([L.Conv2D(8, 3, init="glorot_uniform"), L.Flatten(), L.Dense(50, init="he_normal"),
                        L.Dense(10, init="xavier_normal")], (10, 10, 4), get_backend("cpu", "float64"), seed=1)
    conv_w = model.layers[0].params["W"]
    bound = math.sqrt(6 / (3 * 3 * 4 + 3 * 3 * 8))
    assert np.abs(conv_w).max() <= bound and np.abs(conv_w).max() > 0.9 * bound
    dense_w = model.layers[2].params["W"]
    assert dense_w.std() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    assert np.all(model.layers[0].params["b"] == 0)


def test_same_seed_same_model_other_seed_other_model():
    bk = get_backend("cpu")
    from ddp_cnn.model import build
    assert np.array_equal(build("lenet", bk, seed=3).params, build("lenet", bk, seed=3).params)
    assert not np.array_equal(build("lenet", bk, seed=3).params, build("lenet", bk, seed=4).params)


@pytest.mark.parametrize("name,kw", [("fmnist-cnn", {}), ("fmnist-cnn", {"batchnorm": True}),
                                     ("fmnist-vgg", {"width": 8}), ("lenet", {}), ("mlp", {}),
                                     ("mlp", {"batchnorm": True})])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_first_training_loss_is_near_a_uniform_guess(name, kw, seed):
    """Standardised inputs, training mode (dropout on), fmnist-cnn's recipe (leaky ReLU, label smoothing 0.1):
    the first loss is about ln 10 = 2.30, not the 9-12 that Glorot logits behind dropout gave fmnist-cnn."""
    from ddp_cnn.model import build
    model = build(name, get_backend("cpu"), seed=seed, **kw)
    rng = np.random.default_rng(seed)
    x, labels = rng.standard_normal((32, 28, 28, 1), np.float32), rng.integers(0, 10, 32)
    loss_fn = L.SoftmaxCrossEntropy(0.1)
    loss = float(loss_fn.forward(model.forward(x, train=True, step=0), labels))
    assert abs(loss - math.log(10)) < 0.5, f"{name} {kw}: first loss {loss:.3f}"
    # Small, not zero: the first step's gradient reaches the first layer.
    model.backward(loss_fn.backward())
    first = model.layers[1 if name == "mlp" else 0]
    assert float(np.abs(first.grads["W"]).max()) > 0

"""Optimizer update rules against values worked out by hand, three steps each.

Two parameters p = [1.0, -2.0] receive the fixed gradients
g1 = [0.5, -1.0], g2 = [-0.25, 0.5], g3 = [1.0, 1.0]; every expected number
below is that rule's formula evaluated step by step (written out, not
computed by the code under test).
"""
import math

import numpy as np
import pytest

from ddp_cnn.model import optim
from helpers import BACKENDS, backend64

GRADS = [[0.5, -1.0], [-0.25, 0.5], [1.0, 1.0]]


def run(name, device="cpu", lr=0.1, **kw):
    xp = backend64(device).xp
    params = xp.asarray([1.0, -2.0])
    grads = xp.zeros(2)
    opt = optim.create(name, params, grads, lr, **kw)
    history = []
    for g in GRADS:
        grads[...] = xp.asarray(g)
        opt.step()
        history.append([float(v) for v in params])
    return np.array(history)


@pytest.mark.parametrize("device", BACKENDS)
def test_sgd(device):
    # p -= 0.1 g
    assert np.allclose(run("sgd", device), np.array([[0.95, -1.9], [0.975, -1.95], [0.875, -2.05]]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", BACKENDS)
def test_momentum(device):
    # v = 0.9 v + g ; p -= 0.1 v
    # v1 = [0.5, -1.0]          p1 = [0.95, -1.9]
    # v2 = [0.2, -0.4]          p2 = [0.93, -1.86]
    # v3 = [1.18, 0.64]         p3 = [0.812, -1.924]
    assert np.allclose(run("momentum", device), np.array([[0.95, -1.9], [0.93, -1.86], [0.812, -1.924]]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", BACKENDS)
def test_nesterov(device):
    # v = 0.9 v + g ; p -= 0.1 (g + 0.9 v)
    # v1 = [0.5, -1.0]   step = [0.5+0.45, -1-0.9] = [0.95, -1.9]     p1 = [0.905, -1.81]
    # v2 = [0.2, -0.4]   step = [-0.25+0.18, 0.5-0.36] = [-0.07, 0.14] p2 = [0.912, -1.824]
    # v3 = [1.18, 0.64]  step = [1+1.062, 1+0.576] = [2.062, 1.576]    p3 = [0.7058, -1.9816]
    assert np.allclose(run("nesterov", device), np.array([[0.905, -1.81], [0.912, -1.824], [0.7058, -1.9816]]), rtol=0, atol=1e-14)


def adam_by_hand(wd=0.0):
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.1
    p, m, v, out = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0], []
    for t, g in enumerate(GRADS, start=1):
        for i in range(2):
            p[i] -= lr * wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mhat, vhat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] -= lr * mhat / (math.sqrt(vhat) + eps)
        out.append(list(p))
    return out


@pytest.mark.parametrize("device", BACKENDS)
def test_adam(device):
    # Step 1 by hand: mhat = g, vhat = g^2, so p moves by lr * sign(g) = 0.1: [0.9, -1.9].
    got = run("adam", device)
    assert np.allclose(got[0], [0.9, -1.9], rtol=0, atol=1e-8)
    assert np.allclose(got, np.array(adam_by_hand()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", BACKENDS)
def test_adamw_decays_weights_apart_from_the_gradient(device):
    got = run("adamw", device, weight_decay=0.5)
    # Step 1: p *= (1 - 0.1*0.5) -> [0.95, -1.9], then the Adam step of 0.1 * sign(g).
    assert np.allclose(got[0], [0.85, -1.8], rtol=0, atol=1e-8)
    assert np.allclose(got, np.array(adam_by_hand(wd=0.5)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", BACKENDS)
def test_weight_decay_zero_means_none_and_only_none_means_the_default(device):
    """`--optimizer adamw --weight-decay 0` is Adam; AdamW's 0.01 applies only when no decay is given."""
    assert np.array_equal(run("adamw", device, weight_decay=0.0), run("adam", device))
    assert np.allclose(run("adamw", device), np.array(adam_by_hand(wd=0.01)), rtol=0, atol=1e-12)
    assert np.allclose(run("adamw", device, weight_decay=None), np.array(adam_by_hand(wd=0.01)), rtol=0, atol=1e-12)
    for name in ("sgd", "adam"):  # no decay by default for the others
        assert np.array_equal(run(name, device, weight_decay=None), run(name, device, weight_decay=0.0))
    assert optim.DEFAULT_WEIGHT_DECAY == {"adamw": 0.01}


@pytest.mark.parametrize("device", BACKENDS)
def test_adagrad(device):
    # s += g^2 ; p -= 0.1 g / (sqrt(s) + 1e-10)
    # s1 = [0.25, 1]       p1 = [1 - 0.1, -2 + 0.1] = [0.9, -1.9]
    # s2 = [0.3125, 1.25]  p2 = [0.9 + 0.025/0.5590170, -1.9 - 0.05/1.1180340]
    # s3 = [1.3125, 2.25]  p3 = p2 - 0.1 * [1/1.1456439, 1/1.5]
    p2 = [0.9 + 0.025 / math.sqrt(0.3125), -1.9 - 0.05 / math.sqrt(1.25)]
    p3 = [p2[0] - 0.1 / math.sqrt(1.3125), p2[1] - 0.1 / 1.5]
    assert np.allclose(run("adagrad", device), np.array([[0.9, -1.9], p2, p3]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("device", BACKENDS)
def test_rmsprop(device):
    # s = 0.9 s + 0.1 g^2 ; p -= 0.1 g / (sqrt(s) + 1e-8)
    # s1 = [0.025, 0.1]            p1 = [1 - 0.05/0.1581139, -2 + 0.1/0.3162278]
    # s2 = [0.028750, 0.115]
    # s3 = [0.125875, 0.2035]
    s1, s2, s3 = [0.025, 0.1], [0.02875, 0.115], [0.125875, 0.2035]
    p1 = [1 - 0.05 / math.sqrt(s1[0]), -2 + 0.1 / math.sqrt(s1[1])]
    p2 = [p1[0] + 0.025 / math.sqrt(s2[0]), p1[1] - 0.05 / math.sqrt(s2[1])]
    p3 = [p2[0] - 0.1 / math.sqrt(s3[0]), p2[1] - 0.1 / math.sqrt(s3[1])]
    assert np.allclose(run("rmsprop", device), np.array([p1, p2, p3]), rtol=0, atol=1e-7)


def test_l2_is_added_to_the_gradient_and_only_on_decayed_ranges():
    params, grads = np.array([1.0, -2.0]), np.zeros(2)
    opt = optim.create("sgd", params, grads, 0.1, l2=0.5, decay_ranges=[(0, 1)])
    grads[...] = [0.5, -1.0]
    opt.step()
    # p0 -= 0.1 * (0.5 + 0.5 * 1.0) = 0.9 ; p1 (no decay) -= 0.1 * -1.0 -> -1.9
    assert params.tolist() == pytest.approx([0.9, -1.9], abs=1e-15)


def test_optimizer_state_roundtrip_continues_identically():
    a = run("adam")
    xp = np
    params, grads = xp.asarray([1.0, -2.0]), xp.zeros(2)
    opt = optim.create("adam", params, grads, 0.1)
    for g in GRADS[:2]:
        grads[...] = g
        opt.step()
    state = {k: np.array(v, copy=True) if not np.isscalar(v) else v for k, v in opt.state_dict().items()}
    params2 = params.copy()
    grads2 = np.zeros(2)
    opt2 = optim.create("adam", params2, grads2, 0.1)
    opt2.load_state_dict(state)
    grads2[...] = GRADS[2]
    opt2.step()
    assert params2.tolist() == a[2].tolist()


@pytest.mark.parametrize("bad", [dict(name="lbfgs"), dict(lr=0.0), dict(lr=-1.0), dict(momentum=1.5, name="momentum")])
def test_bad_optimizer_arguments(bad):
    name = bad.pop("name", "sgd")
    lr = bad.pop("lr", 0.1)
    with pytest.raises(ValueError):
        optim.create(name, np.zeros(2), np.zeros(2), lr, **bad)


def test_schedules_with_warmup():
    const = optim.Schedule(0.1, 100, "constant", warmup=4)
    assert [const(s) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    step = optim.Schedule(1.0, 100, "step", warmup=0, step_size=10, gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 19, 20, 35)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.125])
    cos = optim.Schedule(1.0, 12, "cosine", warmup=2, min_lr=0.0)
    # after warmup: 10 steps; progress 0 -> 1.0, 5 -> 0.5, 10 -> 0.0
    assert cos(1) == pytest.approx(1.0) and cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError):
        optim.Schedule(0.1, 10, "exponential")


@pytest.mark.parametrize("device", BACKENDS)
def test_ema_follows_the_parameters_with_a_warm_up(device):
    sgd = run("sgd", device)  # the raw parameters after each step
    xp = backend64(device).xp
    params, grads = xp.asarray([1.0, -2.0]), xp.zeros(2)
    opt = optim.create("sgd", params, grads, 0.1, ema=0.5)
    average = np.array([1.0, -2.0])  # starts at the initial weights
    for t, g in enumerate(GRADS, start=1):
        grads[...] = xp.asarray(g)
        opt.step()
        decay = min(0.5, (1 + t) / (10 + t))  # 2/11, 3/12, then 0.5 from t = 8 on; here 4/13
        average = decay * average + (1 - decay) * sgd[t - 1]
        assert np.allclose(np.asarray(params.tolist()), sgd[t - 1], rtol=0, atol=1e-15)  # training is unchanged
        assert np.allclose(np.asarray(opt.state["ema"].tolist()), average, rtol=0, atol=1e-15)
    with opt.averaged_weights():
        assert params.tolist() == opt.state["ema"].tolist()
    assert params.tolist() == sgd[-1].tolist()


def test_averaged_weights_without_ema_is_the_raw_weights():
    params = np.array([1.0, -2.0])
    opt = optim.create("adam", params, np.zeros(2), 0.1)
    with opt.averaged_weights():
        assert params.tolist() == [1.0, -2.0]
    assert "ema" not in opt.state_dict()


def test_resuming_with_ema_from_a_checkpoint_without_it_starts_the_average_there():
    params = np.array([1.0, -2.0])
    opt = optim.create("adam", params, np.zeros(2), 0.1, ema=0.99)
    params[...] = [3.0, 4.0]
    opt.load_state_dict({"t": 7, "m": np.zeros(2), "v": np.zeros(2)})
    assert opt.state["ema"].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("bad", [1.0, -0.1, 2.0])
def test_ema_decay_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="--ema"):
        optim.create("adam", np.zeros(2), np.zeros(2), 0.1, ema=bad)

"""Optimizers and learning-rate schedules over the flat parameter buffer.

An optimizer's whole state is a few flat arrays the size of the parameter
buffer (plus a step counter), so a checkpoint or a broadcast is one array
each.  Every rank runs the same update on bitwise-identical inputs, so the
replicas stay bitwise identical.

Regularisation, for every optimizer:
- ``l2``: coupled L2, adds ``l2 * p`` to the gradient (what "weight decay"
  means for plain SGD);
- ``weight_decay``: decoupled decay, ``p -= lr * weight_decay * p`` apart from
  the gradient step (AdamW is Adam with this).
Both apply to weights only (``model.decay_ranges``), never to biases or norms.

``ema``: every optimizer can also keep an exponential moving average of the
parameters (Polyak averaging), state ``ema``, which evaluation, checkpoints'
users (evaluate, predict, export) and the reported test accuracy take as
the model; training itself goes on from the raw parameters.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from ddp_cnn.model import cpu_kernels
from ddp_cnn.system.backend import array_module, on_gpu

# Elements per slice of the fused CPU updates: five float32 slices of 1 MiB stay in L2.
_CHUNK = 1 << 18


class Optimizer:
    state_names: tuple = ()

    def __init__(self, params, grads, lr: float = 0.01, l2: float = 0.0, weight_decay: float = 0.0,
                 decay_ranges=None, ema: float = 0.0):
        if not lr > 0:
            raise ValueError(f"--lr: must be > 0, got {lr}")
        if l2 < 0 or weight_decay < 0:
            raise ValueError(f"--l2/--weight-decay: must be >= 0, got {l2}, {weight_decay}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"--ema: expected a decay in [0, 1) (0: off), got {ema}")
        self.params, self.grads = params, grads
        self.lr = float(lr)
        self.l2 = float(l2)
        self.weight_decay = float(weight_decay)
        self.decay_ranges = [(0, params.size)] if decay_ranges is None else list(decay_ranges)
        self.t = 0
        self.gpu = on_gpu(params)  # the fused updates pick their CPU or GPU form by this, once
        xp = array_module(params)
        self.state = {name: xp.zeros_like(params) for name in self.state_names}
        self.ema = float(ema)
        if self.ema:
            self.state["ema"] = params.copy()

    def step(self, lr: float | None = None) -> None:
        """Apply one update with `lr` (default: the base lr) using ``self.grads``."""
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        if self.l2:
            for a, b in self.decay_ranges:
                self.grads[a:b] += self.l2 * self.params[a:b]
        if self.weight_decay:
            for a, b in self.decay_ranges:
                self.params[a:b] *= 1.0 - lr * self.weight_decay
        self._update(lr)
        if self.ema:
            self._update_average()

    def _update_average(self) -> None:
        """ema += (1 - d) (params - ema), with d = min(ema, (1 + t) / (10 + t)): the
        warm-up keeps the first steps' average from clinging to the initial weights."""
        decay = min(self.ema, (1.0 + self.t) / (10.0 + self.t))
        weight = self.params.dtype.type(1.0 - decay)
        average, params = self.state["ema"], self.params
        chunk = max(params.size, 1) if self.gpu else _CHUNK  # three kernels, or L2-sized slices
        for lo in range(0, params.size, chunk):
            hi = min(params.size, lo + chunk)
            delta = params[lo:hi] - average[lo:hi]
            delta *= weight
            average[lo:hi] += delta

    @contextmanager
    def averaged_weights(self):
        """Within this block the parameters are the moving average (when ``ema`` is on)."""
        if not self.ema:
            yield
            return
        raw = self.params.copy()
        self.params[...] = self.state["ema"]
        try:
            yield
        finally:
            self.params[...] = raw

    def _update(self, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"t": self.t, **self.state}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for name in self.state_names:
            self.state[name][...] = array_module(self.params).asarray(state[name])
        if self.ema:  # a checkpoint written without --ema: the average starts from its weights
            self.state["ema"][...] = array_module(self.params).asarray(state["ema"]) if "ema" in state else self.params


class SGD(Optimizer):
    """p -= lr * g."""

    def _update(self, lr):
        self.params -= lr * self.grads


class Momentum(Optimizer):
    """Heavy ball (PyTorch form): v = mu v + g; p -= lr v.  Nesterov: p -= lr (g + mu v)."""

    state_names = ("velocity",)

    def __init__(self, params, grads, lr=0.01, momentum: float = 0.9, nesterov: bool = False, **kw):
        if not 0 <= momentum < 1:
            raise ValueError(f"--momentum: must be in [0, 1), got {momentum}")
        super().__init__(params, grads, lr, **kw)
        self.momentum = float(momentum)
        self.nesterov = nesterov

    def _update(self, lr):
        v = self.state["velocity"]
        v *= self.momentum
        v += self.grads
        if self.nesterov:
            self.params -= lr * (self.grads + self.momentum * v)
        else:
            self.params -= lr * v


class Adam(Optimizer):
    """Adam with bias correction; AdamW = Adam(weight_decay=...) (decoupled)."""

    state_names = ("m", "v")

    def __init__(self, params, grads, lr=1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, **kw):
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1) or eps <= 0:
            raise ValueError(f"--beta1/--beta2 must be in [0, 1) and --eps > 0, got {beta1}, {beta2}, {eps}")
        super().__init__(params, grads, lr, **kw)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self._tmp = None if self.gpu else np.empty(max(1, min(_CHUNK, params.size)), dtype=params.dtype)
        self.jit = not self.gpu and cpu_kernels.active()

    def _update(self, lr):
        # Fold both bias corrections into one step size (as the Adam paper's sec. 2 suggests).
        step = lr * math.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        eps_hat = self.eps * math.sqrt(1 - self.beta2 ** self.t)
        if self.gpu:  # one fused kernel over the whole flat buffer (cuda_kernels.adam_update)
            from ddp_cnn.model import cuda_kernels
            cuda_kernels.adam_update(self.params, self.grads, self.state["m"], self.state["v"],
                                     self.beta1, self.beta2, step, eps_hat)
            return
        if self.jit:  # one pass on every core, the same operations (cpu_kernels.adam_update)
            cpu_kernels.adam_update(self.params, self.grads, self.state["m"], self.state["v"],
                                    self.beta1, self.beta2, step, eps_hat)
            return
        self._adam_cpu(step, eps_hat)

    def _adam_cpu(self, step, eps_hat):
        """In place, one cache-sized slice at a time, with one reused temporary: the
        same operations in the same order as m = b1 m + (1 - b1) g;
        v = b2 v + (1 - b2) g^2; p -= step * (m / (sqrt(v) + eps_hat)), so the
        result is bitwise that of the textbook lines."""
        chunk = self._tmp.size
        for a in range(0, self.params.size, chunk):
            b = min(self.params.size, a + chunk)
            p, g = self.params[a:b], self.grads[a:b]
            m, v, t = self.state["m"][a:b], self.state["v"][a:b], self._tmp[:b - a]
            m *= self.beta1
            np.multiply(g, 1 - self.beta1, out=t)
            m += t
            v *= self.beta2
            np.multiply(g, g, out=t)
            t *= 1 - self.beta2
            v += t
            np.sqrt(v, out=t)
            t += eps_hat
            np.divide(m, t, out=t)
            t *= step
            p -= t


class AdaGrad(Optimizer):
    """s += g^2; p -= lr g / (sqrt(s) + eps)."""

    state_names = ("sum_sq",)

    def __init__(self, params, grads, lr=0.01, eps: float = 1e-10, **kw):
        super().__init__(params, grads, lr, **kw)
        self.eps = float(eps)

    def _update(self, lr):
        xp = array_module(self.params)
        s = self.state["sum_sq"]
        s += self.grads * self.grads
        self.params -= lr * self.grads / (xp.sqrt(s) + self.eps)


class RMSprop(Optimizer):
    """s = rho s + (1 - rho) g^2; p -= lr g / (sqrt(s) + eps)."""

    state_names = ("mean_sq",)

    def __init__(self, params, grads, lr=1e-3, rho: float = 0.9, eps: float = 1e-8, **kw):
        if not 0 <= rho < 1:
            raise ValueError(f"--rho: must be in [0, 1), got {rho}")
        super().__init__(params, grads, lr, **kw)
        self.rho, self.eps = float(rho), float(eps)

    def _update(self, lr):
        xp = array_module(self.params)
        s = self.state["mean_sq"]
        s *= self.rho
        s += (1 - self.rho) * (self.grads * self.grads)
        self.params -= lr * self.grads / (xp.sqrt(s) + self.eps)


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "rmsprop")


DEFAULT_WEIGHT_DECAY = {"adamw": 0.01}  # AdamW's customary default; 0 for the others


def create(name: str, params, grads, lr: float, *, momentum=0.9, beta1=0.9, beta2=0.999, eps=None,
           rho=0.9, l2=0.0, weight_decay=None, decay_ranges=None, ema=0.0) -> Optimizer:
    """The optimizer called `name` (one of OPTIMIZERS) over the flat buffers.

    ``weight_decay``: None for the optimizer's default (DEFAULT_WEIGHT_DECAY:
    0.01 for adamw, 0 otherwise); any number, 0 included, is taken as given.
    """
    if weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAY.get(name, 0.0)
    kw = dict(l2=l2, weight_decay=weight_decay, decay_ranges=decay_ranges, ema=ema)
    if name == "sgd":
        return SGD(params, grads, lr, **kw)
    if name in ("momentum", "nesterov"):
        return Momentum(params, grads, lr, momentum=momentum, nesterov=name == "nesterov", **kw)
    if name in ("adam", "adamw"):
        return Adam(params, grads, lr, beta1=beta1, beta2=beta2, eps=1e-8 if eps is None else eps, **kw)
    if name == "adagrad":
        return AdaGrad(params, grads, lr, eps=1e-10 if eps is None else eps, **kw)
    if name == "rmsprop":
        return RMSprop(params, grads, lr, rho=rho, eps=1e-8 if eps is None else eps, **kw)
    raise ValueError(f"--optimizer: unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


class Schedule:
    """Learning rate at a step: linear warmup, then constant, step or cosine decay.

    - constant: base
    - step: base * gamma ** (completed decay periods), one period = `step_size` steps
    - cosine: min_lr + (base - min_lr) * (1 + cos(pi * progress)) / 2 over the steps after warmup
    Warmup ramps linearly from base/warmup to base over `warmup` steps.
    """

    KINDS = ("constant", "step", "cosine")

    def __init__(self, base_lr: float, total_steps: int, kind: str = "constant", warmup: int = 0,
                 step_size: int = 1, gamma: float = 0.1, min_lr: float = 0.0):
        if kind not in self.KINDS:
            raise ValueError(f"--schedule: expected one of {', '.join(self.KINDS)}, got {kind!r}")
        if warmup < 0 or step_size < 1:
            raise ValueError(f"--warmup must be >= 0 and the decay period >= 1, got {warmup}, {step_size}")
        self.base_lr, self.total, self.kind = float(base_lr), int(total_steps), kind
        self.warmup, self.step_size, self.gamma, self.min_lr = int(warmup), int(step_size), float(gamma), float(min_lr)

    def __call__(self, step: int) -> float:
        """LR for the update number `step` (0-based)."""
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        after = step - self.warmup
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            return self.base_lr * self.gamma ** (after // self.step_size)
        span = max(self.total - self.warmup, 1)
        progress = min(after / span, 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["SGD", "Momentum", "Adam", "AdaGrad", "RMSprop", "Schedule", "create", "OPTIMIZERS",
           "DEFAULT_WEIGHT_DECAY"]

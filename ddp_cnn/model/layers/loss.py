"""Softmax cross-entropy on logits, with label smoothing and knowledge distillation."""
from __future__ import annotations

import numpy as np

from ddp_cnn.system.backend import array_module


class SoftmaxCrossEntropy:
    """Fused softmax + categorical cross-entropy on logits.

    ``forward(logits, labels)`` returns the mean loss over the batch as a 0-d
    device array (no host sync); ``backward()`` returns dL/dlogits =
    (softmax - target) / batch.  With label smoothing eps the target is
    (1 - eps) * one_hot + eps / classes.

    Knowledge distillation (Hinton et al. 2015): given ``teacher_logits``, the
    loss is (1 - w) * the above + w * T^2 * KL(softmax(teacher / T) ||
    softmax(logits / T)), w = ``distill_weight``, T = ``temperature``; the T^2
    keeps the soft term's gradient, w * T * (softmax(logits / T) -
    softmax(teacher / T)) / batch, on the scale of the hard one.
    """

    def __init__(self, label_smoothing: float = 0.0, distill_weight: float = 0.0, temperature: float = 1.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.eps = float(label_smoothing)
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.soft = None

    def forward(self, logits, labels, teacher_logits=None):
        xp = array_module(logits)
        if logits.ndim != 2:
            raise ValueError(f"SoftmaxCrossEntropy: expected logits of shape (batch, classes), got {logits.shape}")
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"SoftmaxCrossEntropy: expected labels of shape ({logits.shape[0]},), got {labels.shape}")
        logp = _log_softmax(xp, logits)
        self.probs = xp.exp(logp)
        self.labels = labels
        picked = xp.take_along_axis(logp, labels[:, None].astype(np.int64), axis=1)[:, 0]
        nll = -picked
        if self.eps:
            nll = (1.0 - self.eps) * nll - self.eps * logp.mean(axis=1)
        self.soft = None
        if teacher_logits is None or not self.distill_weight:
            return nll.mean()
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"SoftmaxCrossEntropy: teacher logits of shape {teacher_logits.shape}, "
                             f"expected {logits.shape}")
        t, w = self.temperature, self.distill_weight
        log_q = _log_softmax(xp, teacher_logits / t)
        log_p = _log_softmax(xp, logits / t)
        q = xp.exp(log_q)
        self.soft = (xp.exp(log_p), q)
        kl = (q * (log_q - log_p)).sum(axis=1)
        return (1.0 - w) * nll.mean() + (w * t * t) * kl.mean()

    def backward(self):
        xp = array_module(self.probs)
        n, k = self.probs.shape
        d = self.probs.copy()
        if self.eps:
            d -= self.eps / k
        rows = xp.arange(n)
        d[rows, self.labels] -= 1.0 - self.eps
        if self.soft is not None:
            p_t, q = self.soft
            d *= 1.0 - self.distill_weight
            d += (self.distill_weight * self.temperature) * (p_t - q)
        d /= n
        return d


def _log_softmax(xp, logits):
    shifted = logits - logits.max(axis=1, keepdims=True)  # exp never overflows
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))

"""Distributed evaluation: the loss, accuracy and confusion matrix of a model over all ranks.

Each rank scores its own contiguous slice of the test set (every sample on
exactly one rank, no padding, so nothing is counted twice); the loss sum,
the correct count and the confusion matrix are summed over ranks with one
allreduce.  The result is the same whatever the number of ranks.
"""
from __future__ import annotations

import numpy as np

from ddp_cnn.model.layers import SoftmaxCrossEntropy
from ddp_cnn.system.backend import to_host


def evaluate(model, loader, comm, num_classes: int) -> dict:
    """Collective: loss, accuracy and confusion matrix (rows: true, cols: predicted) over all ranks."""
    xp = model.xp
    loss_fn = SoftmaxCrossEntropy()
    loss_sum = xp.zeros((), dtype=np.float64)
    confusion = xp.zeros(num_classes * num_classes, dtype=np.int64)
    for x, y in loader.epoch(0):
        logits = model.forward(x, train=False)  # loader batches are channels-last, as the model takes them
        loss_sum += loss_fn.forward(logits, y).astype(np.float64) * y.shape[0]
        pred = logits.argmax(axis=1)
        confusion += xp.bincount(y.astype(np.int64) * num_classes + pred, minlength=num_classes * num_classes)
    local = np.concatenate([[float(to_host(loss_sum))], to_host(confusion).astype(np.float64)])
    total = comm.allreduce_host(local)
    conf = total[1:].reshape(num_classes, num_classes).astype(np.int64)
    count = int(conf.sum())
    return {"loss": total[0] / max(count, 1), "accuracy": float(np.trace(conf)) / max(count, 1),
            "count": count, "confusion": conf}


def split_scores(split: str, model, loader, comm, num_classes: int) -> dict:
    """Collective: :func:`evaluate` as metrics named after the split (``val_acc``, ``test_loss``, ...)."""
    result = evaluate(model, loader, comm, num_classes)
    return {f"{split}_loss": result["loss"], f"{split}_acc": result["accuracy"], f"{split}_count": result["count"],
            f"{split}_confusion": result["confusion"].tolist()}


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    totals = confusion.sum(axis=1)
    return np.divide(np.diag(confusion), totals, out=np.zeros(len(totals)), where=totals > 0)


def format_confusion(confusion: np.ndarray, class_names) -> str:
    width = max(6, max(len(n) for n in class_names) + 1)
    head = " " * width + "".join(f"{i:>7d}" for i in range(len(class_names)))
    rows = [f"{name:<{width}}" + "".join(f"{v:>7d}" for v in row) for name, row in zip(class_names, confusion)]
    return "\n".join([head + "   <- predicted"] + rows)

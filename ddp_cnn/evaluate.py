"""Distributed evaluation, and ``python -m ddp_cnn.evaluate`` for a saved model.

Each rank scores its own contiguous slice of the test set (every sample on
exactly one rank, no padding, so nothing is counted twice); the loss sum,
the correct count and the confusion matrix are summed over ranks with one
allreduce.  The result is the same whatever the number of ranks.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ddp_cnn.system.backend import to_host
from ddp_cnn.model.layers import SoftmaxCrossEntropy


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


def print_report(split: str, result: dict, names) -> None:
    """Overall accuracy and loss, per-class accuracy and the confusion matrix, on stdout."""
    print(f"{split} accuracy {result['accuracy'] * 100:.2f}%  loss {result['loss']:.4f}  "
          f"({result['count']} images)")
    for name, acc in zip(names, per_class_accuracy(result["confusion"])):
        print(f"  {name:<14} {acc * 100:6.2f}%")
    print(format_confusion(result["confusion"], names))


def main(argv=None) -> int:
    from ddp_cnn.dist import comm as comm_mod
    from ddp_cnn.data.loader import Loader, open_rank_data
    from ddp_cnn.dist.faults import EXIT_USAGE, RankZeroParser, SetupError, agreed
    from ddp_cnn.inference import load_model

    p = RankZeroParser(allow_abbrev=False, prog="python -m ddp_cnn.evaluate",
                                description="Accuracy, per-class accuracy and confusion matrix of a saved model.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint (.h5) from ddp_cnn.train, .npz from ddp_cnn.export, or a run folder "
                        "(or its checkpoints folder): its newest checkpoint")
    p.add_argument("--data", required=True, help="folder with test.h5 (made by data_tools.shard)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="which split to score (default: test)")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch per rank (default: 1000)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"], help="default: cpu")
    args = p.parse_args(argv)
    comm = comm_mod.create("auto")

    def make_loader(model, meta, data):
        shape = tuple(data.images.shape[1:])
        if shape != tuple(model.input_shape):
            raise SetupError(f"--data {args.data}: images of shape {shape}, the model takes {tuple(model.input_shape)}")
        return Loader(data, batch_size=args.batch_size, comm=comm, seed=0, xp=model.xp, dtype=model.backend.dtype,
                      shuffle=False, drop_last=False, mean=meta.get("mean"), std=meta.get("std"))

    try:  # a bad input stops every rank, and is said once; each step's collectives stay in step
        model, meta = agreed(comm, lambda: load_model(args.checkpoint, device=args.device))
        data = agreed(comm, lambda: open_rank_data(args.data, args.split, comm))
        loader = agreed(comm, lambda: make_loader(model, meta, data))
    except SetupError as exc:
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = evaluate(model, loader, comm, model.output_shape[0])
    if comm.is_root:
        names = meta.get("class_names") or [str(i) for i in range(model.output_shape[0])]
        try:
            print_report(args.split, result, names)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader left (`| head -1`): what it took is all it wanted.  Point stdout at
            # /dev/null so the interpreter's last flush does not fail again at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())

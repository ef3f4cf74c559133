"""``python -m ddp_cnn.evaluate``: a saved model scored on a split over all ranks (the scoring itself is
:mod:`ddp_cnn.run.evaluation`), its per-class accuracy and confusion matrix printed."""
from __future__ import annotations

import os
import sys

from ddp_cnn.run.evaluation import evaluate, format_confusion, per_class_accuracy


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
    from ddp_cnn.dist.faults import EXIT_USAGE
    from ddp_cnn.cli.argtypes import RankZeroParser
    from ddp_cnn.dist.agree import SetupError, agreed
    from ddp_cnn.inference.models import load_model

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

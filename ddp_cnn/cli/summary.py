"""``python -m ddp_cnn.summary --model NAME|FILE.toml``: layers, output shapes, parameters, MFLOPs."""
from __future__ import annotations

import argparse
import sys

from ddp_cnn.model import modelfile
from ddp_cnn.model import network as model_mod
from ddp_cnn.model.network import format_summary
from ddp_cnn.system.backend import get_backend


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m ddp_cnn.summary", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--model", default="fmnist-cnn", metavar="NAME|FILE.toml",
                   help=f"architecture ({', '.join(sorted(model_mod.ARCHITECTURES))}) or a model file, as "
                        "ddp_cnn.train takes them (default: fmnist-cnn)")
    p.add_argument("--input-shape", default="28,28,1", help="H,W,C of one image (default: 28,28,1)")
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes (default: 10; a model file's last layer sets it, checked when given)")
    args = p.parse_args(argv)
    if args.model not in model_mod.ARCHITECTURES and not modelfile.is_model_file(args.model):
        p.error(f"argument --model: invalid choice: {args.model!r} (choose from "
                f"{', '.join(sorted(model_mod.ARCHITECTURES))}, or a model file FILE.toml)")
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
        if modelfile.is_model_file(args.model):
            model = modelfile.load(args.model, shape, get_backend("cpu"), num_classes=args.classes)
        else:
            model = model_mod.build(args.model, get_backend("cpu"), input_shape=shape,
                                    num_classes=10 if args.classes is None else args.classes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())

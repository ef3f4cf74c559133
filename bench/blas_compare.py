"""NumPy's BLAS against MKL (``--blas mkl``) for ddp_cnn's training step, in one process.

    python bench/blas_compare.py                  # fmnist-cnn, batch 128, 12 pairs of 8 steps
    python bench/blas_compare.py --model lenet --batch 256 --pairs 20

One model trains on random images of the Fashion-MNIST shape; before each
timed repeat the GEMMs switch between NumPy's BLAS and MKL (:mod:`ddp_cnn.blas`),
the two alternating which goes first.  The two repeats of a pair run within a
second or two of each other, so a shared VM's slow spells (steal time) touch
both alike: the ratio pair by pair is the figure to read, more than either
rate.  Needs ``pip install mkl``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="steps per timed repeat")
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--threads", type=int, default=None, help="ddp_cnn threads (default: the cores)")
    args = p.parse_args(argv)

    import numpy as np

    from ddp_cnn import blas, model as model_mod, optim, threads
    from ddp_cnn.backend import get_backend
    from ddp_cnn.layers import SoftmaxCrossEntropy

    try:
        blas.use("mkl")  # checked first: without MKL there is nothing to compare
    except RuntimeError as exc:
        p.exit(2, f"error: {exc}\n")
    model = model_mod.build(args.model, get_backend("cpu", threads=args.threads), seed=0)
    opt = optim.create("adam", model.params, model.grads, 1e-3, decay_ranges=model.decay_ranges)
    loss = SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8 * args.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 8 * args.batch)

    def step(i):
        k = i % 8
        rows = slice(k * args.batch, (k + 1) * args.batch)
        loss.forward(model.forward(x[rows], train=True, step=i), y[rows])
        model.backward(loss.backward())
        opt.step()

    def repeat(name) -> float:
        blas.use(name)
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(i)
        return args.steps * args.batch / (time.perf_counter() - t0)

    for name in ("numpy", "mkl"):  # warm-up: buffers, MKL's first call
        blas.use(name)
        for i in range(3):
            step(i)
    rates = {"numpy": [], "mkl": []}
    for pair in range(args.pairs):
        for name in ("numpy", "mkl") if pair % 2 == 0 else ("mkl", "numpy"):
            rates[name].append(repeat(name))
    ratios = sorted(m / n for m, n in zip(rates["mkl"], rates["numpy"]))
    print(f"{args.model}, batch {args.batch}, {threads.count()} thread(s), {args.pairs} pairs of {args.steps} steps")
    print(f"img/s, median: NumPy's BLAS {statistics.median(rates['numpy']):.0f}, "
          f"MKL {statistics.median(rates['mkl']):.0f}")
    print(f"MKL / NumPy's BLAS pair by pair: median {statistics.median(ratios):.2f}, "
          f"range {ratios[0]:.2f}-{ratios[-1]:.2f}; MKL faster in {sum(r > 1 for r in ratios)} of {len(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

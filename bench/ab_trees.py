"""Training speed of two checkouts of ddp_cnn side by side, in one run (before/after a change).

    python bench/ab_trees.py --before /tmp/before --after . --data data/fashion-mnist-2

Each configuration is one ``python -m ddp_cnn.train`` job on the CPU (fmnist-cnn,
batch 128, ``--max-steps`` steps of one epoch, no evaluation); the jobs of
every (tree, configuration) pair take turns, ``--rounds`` times, in rotating
order, so a slow spell of a shared VM hits both trees alike.  The figure is
the epoch line's img/s (all ranks together); the table shows each pair's
median and the after/before ratio of the medians.  Configurations: ``1x``
(one rank; before: ``--threads`` = cores, after: BLAS threads = cores) and
``Nx1`` (one rank per core).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path


def run(tree: Path, ranks: int, extra: list[str], args) -> float:
    cmd = [str(tree / "launch" / "mpirun.sh"), "-n", str(ranks), sys.executable, "-m", "ddp_cnn.train",
           "--data", str(Path(args.data).resolve()), "--model", args.model, "--batch-size", str(args.batch),
           "--epochs", "1", "--max-steps", str(args.steps), "--eval-every", "0", "--device", "cpu",
           "--progress", "off", "--run-dir", f"/tmp/ab_trees/{tree.name}-{ranks}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                             "MKL_NUM_THREADS")}
    if ranks == 1:
        env["OMP_NUM_THREADS"] = str(args.cores)
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    found = re.search(r"([0-9.]+) img/s", proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return float(found.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", required=True, type=Path)
    p.add_argument("--data", required=True, help="shards both trees can read")
    p.add_argument("--model", default="fmnist-cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--before-one-rank", default=None,
                   help="extra flags of the before tree's one-rank job (default: --threads CORES)")
    args = p.parse_args()
    one_before = (args.before_one_rank or f"--threads {args.cores}").split()
    jobs = [("before", args.before, f"1 rank x {args.cores} threads (replicas)", 1, one_before),
            ("after", args.after, f"1 rank, {args.cores} BLAS threads", 1, []),
            ("before", args.before, f"{args.cores} ranks x 1", args.cores, []),
            ("after", args.after, f"{args.cores} ranks x 1", args.cores, [])]
    results: dict = {i: [] for i in range(len(jobs))}
    for r in range(args.rounds):
        order = list(range(len(jobs)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            _, tree, _, ranks, extra = jobs[i]
            results[i].append(run(tree.resolve(), ranks, extra, args))
            print(f"round {r + 1}: {jobs[i][0]:6s} {jobs[i][2]:32s} {results[i][-1]:7.0f} img/s", flush=True)
    print(f"\n{args.model}, batch {args.batch}, {args.steps} steps, median of {args.rounds} rounds (img/s):")
    for i, (side, _, label, _, _) in enumerate(jobs):
        print(f"  {side:6s} {label:32s} {statistics.median(results[i]):7.0f}  {results[i]}")
    best_before = max(statistics.median(results[i]) for i, j in enumerate(jobs) if j[0] == "before")
    best_after = max(statistics.median(results[i]) for i, j in enumerate(jobs) if j[0] == "after")
    print(f"best after / best before: {best_after / best_before:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streamed shards against the in-memory loader (issue 28): images/s of the loader alone and of training,
and each rank's peak resident memory, on Fashion-MNIST and on a synthetic set several times larger than
an address-space limit put on every process of the streaming runs.

    python bench/data_stream.py --work /tmp/data-stream            # the figures in bench/RESULTS.md
    python bench/data_stream.py --work /tmp/ds --rows 400000 --reps 1 --steps 50   # a quick look

Every measurement is its own process (peak RSS is VmHWM from /proc/self/status at its end), and the
two sides alternate (in-memory, streamed, in-memory, ...) so a machine shared with other work loads
both alike.  The synthetic set is Fashion-MNIST's training images repeated, each copy shifted right
by one more pixel, written as an uncompressed .npz a block at a time and sharded by
``data_tools.shard --from-npz`` under the same limit (so that step is measured too).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "MALLOC_ARENA_MAX": "2"}  # fewer 64 MB malloc arenas reserved per thread: address space, not memory

PEAK = "[int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"

LOADER = f"""
import json, sys, time
from ddp_cnn.dist.comm import SingleComm
from ddp_cnn.data.loader import Loader, open_rank_data
from ddp_cnn.data.stream import ChunkCache
folder, stream, limit, cache_mb = sys.argv[1], sys.argv[2] == "stream", int(sys.argv[3]), float(sys.argv[4])
try:
    started = time.perf_counter()
    data = open_rank_data(folder, "train", SingleComm(), stream=stream, cache=ChunkCache(cache_mb * 2**20))
    loader = Loader(data, batch_size=128, comm=SingleComm(), seed=0)
    opened, seen = time.perf_counter(), 0
    for x, y in loader.epoch(0):
        seen += len(y)
        if seen >= limit:
            break
    ended = time.perf_counter()
    print(json.dumps({{"images": seen, "images_per_s": seen / (ended - opened), "open_s": opened - started,
                      "wait_s": loader.wait_seconds, "peak": {PEAK}}}))
except MemoryError:
    print(json.dumps({{"error": "MemoryError", "peak": {PEAK}}}))
"""

TRAIN = f"""
import json, os, sys
from ddp_cnn.cli.train import main
code = main(sys.argv[2:])
from mpi4py import MPI
rank = MPI.COMM_WORLD.rank
with open(os.path.join(sys.argv[1], f"peak-{{rank}}.json"), "w") as fh:
    json.dump({{"rank": rank, "code": code, "peak": {PEAK}}}, fh)
"""

SHARD = f"""
import json, sys
from data_tools.shard import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "peak": {PEAK}}}))
"""


def limited(cmd, limit_mb):
    """``cmd`` under an address-space limit (ulimit -v) inherited by every process it starts."""
    if not limit_mb:
        return cmd
    return ["bash", "-c", f'ulimit -v {int(limit_mb * 1024)}; exec "$@"', "limited", *map(str, cmd)]


def run(cmd, timeout=3600):
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc


def write_synthetic_npz(path: Path, rows: int) -> None:
    """Fashion-MNIST's training images repeated to ``rows``, copy k shifted right by k pixels, as an
    uncompressed .npz written a block at a time (never the whole array in memory)."""
    sys.path.insert(0, str(REPO))
    from data_tools import idx
    images, labels = idx.read_pair(FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "train-labels-idx1-ubyte.gz")
    base, base_labels = images.array, labels.array
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("labels.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.resize(base_labels, rows).astype(np.uint8))
        with z.open("images.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (rows, 28, 28)})
            for start in range(0, rows, len(base)):
                copy = np.roll(base, start // len(base) % 28, axis=2)
                fh.write(copy[:min(len(base), rows - start)].tobytes())


def loader_run(folder, mode, limit_images, cache_mb, limit_mb=None):
    proc = run(limited([sys.executable, "-c", LOADER, folder, mode, limit_images, cache_mb], limit_mb))
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.splitlines()[-1])


def train_run(folder, mode, ranks, steps, work: Path, tag, cache_mb=None, limit_mb=None):
    run_dir = work / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    flags = ["--data", folder, "--model", "lenet", "--device", "cpu", "--progress", "off", "--eval-every", 0,
             "--epochs", 1, "--max-steps", steps, "--batch-size", 128, "--run-dir", run_dir, "--overwrite"]
    flags += ["--data-in-memory"] if mode == "memory" else []
    flags += ["--data-cache-mb", cache_mb] if cache_mb else []
    python = [sys.executable, "-c", TRAIN, run_dir]
    cmd = python + flags if ranks == 1 else [REPO / "launch" / "mpirun.sh", "-n", ranks, *python, *flags]
    proc = run(limited(cmd, limit_mb))
    peaks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("peak-*.json"))]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line] if (run_dir / "metrics.jsonl").exists() else []
    if proc.returncode != 0 or not epochs:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
                "peak": [p["peak"] for p in peaks]}
    return {"images_per_s": epochs[-1]["images_per_s"], "wait_s": epochs[-1]["data_wait_seconds"],
            "peak": [p["peak"] for p in peaks]}


def mb(value):
    return f"{value / 2**20:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/data-stream"), help="scratch folder (GBs)")
    p.add_argument("--rows", type=int, default=4_000_000, help="rows of the synthetic set (28x28 each)")
    p.add_argument("--limit-mb", type=float, default=1024, help="address-space limit of the streamed runs")
    p.add_argument("--cache-mb", type=float, default=128, help="--data-cache-mb of the runs under the limit")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each comparison")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--loader-images", type=int, default=600_000, help="images per loader-alone run")
    args = p.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    fmnist, synthetic = work / "fmnist", work / "synthetic"
    results = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_at_start": os.getloadavg()}

    if not (fmnist / "manifest.json").exists():
        proc = run([sys.executable, "-m", "data_tools.shard", FMNIST, "--out", fmnist, "--shards", 2, "--force"])
        assert proc.returncode == 0, proc.stderr
    if not (synthetic / "manifest.json").exists():
        npz = work / "synthetic.npz"
        started = time.perf_counter()
        write_synthetic_npz(npz, args.rows)
        shard = run(limited([sys.executable, "-c", SHARD, "--from-npz", npz, "--out", synthetic, "--shards", 2,
                             "--test-fraction", 0.01, "--force"], args.limit_mb))
        assert shard.returncode == 0, shard.stderr[-2000:]
        results["shard_synthetic"] = {**json.loads(shard.stdout.splitlines()[-1]),
                                      "seconds": time.perf_counter() - started,
                                      "npz_bytes": npz.stat().st_size}
        npz.unlink()
    results["synthetic_bytes"] = args.rows * 28 * 28

    loader = {"fmnist": {"memory": [], "stream": []}}
    for _ in range(args.reps):  # alternating sides
        for mode in ("memory", "stream"):
            loader["fmnist"][mode].append(loader_run(fmnist, mode, 10**9, args.cache_mb))
    loader["synthetic"] = {"stream": [loader_run(synthetic, "stream", args.loader_images, args.cache_mb,
                                                 args.limit_mb)],
                           "memory": [loader_run(synthetic, "memory", args.loader_images, args.cache_mb,
                                                 args.limit_mb)]}
    results["loader"] = loader

    training = {"fmnist-1": {"memory": [], "stream": []}, "fmnist-2": {"memory": [], "stream": []}}
    for rep in range(args.reps):
        for ranks in (1, 2):
            for mode in ("memory", "stream"):
                training[f"fmnist-{ranks}"][mode].append(
                    train_run(fmnist, mode, ranks, args.steps, work, f"fmnist-{ranks}-{mode}-{rep}"))
    training["synthetic-1"] = {"stream": [train_run(synthetic, "stream", 1, args.steps, work, "syn-1",
                                                    args.cache_mb, args.limit_mb)]}
    training["synthetic-2"] = {"stream": [train_run(synthetic, "stream", 2, args.steps, work, "syn-2",
                                                    args.cache_mb, args.limit_mb)],
                               "memory": [train_run(synthetic, "memory", 2, args.steps, work, "syn-2-mem",
                                                    None, args.limit_mb)]}
    results["training"] = training
    results["load_at_end"] = os.getloadavg()
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results, args))
    return 0


def summary(runs):
    ok = [r for r in runs if "images_per_s" in r]
    if not ok:
        return "does not run: " + "; ".join(str(r.get("error")) for r in runs), ""
    rates = [r["images_per_s"] for r in ok]
    peaks = [max(np.atleast_1d(r["peak"])) for r in ok]
    waits = [r.get("wait_s", 0.0) for r in ok]
    return (f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})",
            f"{mb(max(peaks))} MB, data wait {statistics.median(waits):.2f} s")


def report(results, args) -> str:
    lines = [f"machine {results['machine']}, {results['cpus']} CPUs, load {results['load_at_start']} at start, "
             f"{results['load_at_end']} at end; synthetic set {mb(results['synthetic_bytes'])} MB of images, "
             f"runs under the limit: ulimit -v {args.limit_mb:.0f} MB, --data-cache-mb {args.cache_mb:g}", ""]
    if "shard_synthetic" in results:
        s = results["shard_synthetic"]
        lines.append(f"sharding the synthetic .npz ({mb(s['npz_bytes'])} MB) under the limit: {s['seconds']:.0f} s "
                     f"including writing the .npz, peak RSS {mb(s['peak'])} MB")
    lines += ["", "| what | side | images/s median (range) | peak RSS per rank, data wait |", "|---|---|---|---|"]
    for part in ("loader", "training"):
        for name, sides in results[part].items():
            for side, runs in sides.items():
                rate, rest = summary(runs)
                lines.append(f"| {part} {name} | {side} | {rate} | {rest} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Scaling on one node: images/s and the exposed-communication share on 1 and 2 ranks, ddp_cnn's two
data orders (``--data-order shard|global``) beside PyTorch DDP (gloo), interleaved round by round.

    python bench/scaling.py                          # 3 rounds x 6 runs, ~4 minutes on the 2-core VM
    python bench/scaling.py --rounds 1 --steps 10    # a quick look

ddp_cnn runs as a user runs it, ``launch/mpirun.sh -n R python -m ddp_cnn.train``, on the real
Fashion-MNIST (sharded here into 2 stratified shards), fmnist-cnn, Adam lr 1e-3, global batch 128,
buckets of 4 MB, 1 BLAS thread per rank, with ``--trace``: the numbers come from the trace of the
steps after ``--warmup``.  images/s: the global batch x steps over rank 0's wall time from the end of
the last warm-up step to the end of the last step (data waits included).  Exposed share: the time a
rank waited for the gradient allreduce after its backward (the "allreduce wait" spans, what backward
did not hide), over that wall time, averaged over ranks.  In flight: from each step's first bucket
issued to its last bucket complete, over the wall time.

PyTorch DDP: R processes (gloo, 1 thread each), the same network (``torch_net`` of
bench/cpu_throughput.py), the same training images and global batch, Adam, DDP buckets of the same
4 MB.  DDP does not say how long it waited, so each worker alternates blocks of steps with the
gradient allreduce and blocks under ``no_sync()`` (none); its exposed share is 1 - t(no_sync) / t(sync):
the step time the allreduce adds.  That also counts the CPU the allreduce takes from the compute (2
ranks on 2 cores), which ddp_cnn's wait share does not.

PyTorch is a benchmark-only dependency (``pip install torch``, the CPU build); ddp_cnn never imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def env_threads(threads: int) -> dict:
    env = dict(os.environ)
    env.update({var: str(threads) for var in THREAD_VARS})
    return env


# ---- ddp_cnn: the training command, measured from its trace -------------------------------------------
def has_data_order() -> bool:
    """Whether this checkout's ddp_cnn.train takes --data-order (the global order)."""
    out = subprocess.run([sys.executable, "-m", "ddp_cnn.train", "--help"], cwd=ROOT, capture_output=True, text=True)
    return "--data-order" in out.stdout


def run_ddp(args, data: Path, work: Path, ranks: int, order: str | None) -> dict:
    trace = work / f"trace-{ranks}-{order}.json"
    cmd = [str(ROOT / "launch" / "mpirun.sh"), "-n", str(ranks), sys.executable, "-m", "ddp_cnn.train",
           "--data", str(data), "--model", "fmnist-cnn", "--batch-size", str(args.batch), "--optimizer", "adam",
           "--lr", "1e-3", "--epochs", "1", "--max-steps", str(args.warmup + args.steps), "--eval-every", "0",
           "--bucket-mb", str(args.bucket_mb), "--progress", "off", "--run-dir", str(work / "run"), "--overwrite",
           "--trace", str(trace)] + (["--data-order", order] if order else [])
    out = subprocess.run(cmd, cwd=ROOT, env=env_threads(args.threads), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return measure_trace(json.loads(trace.read_text()), args.warmup, args.batch)


def measure_trace(doc: dict, warmup: int, global_batch: int) -> dict:
    """images/s, exposed and in-flight shares over the steps after `warmup`, and per bucket the median
    issue-to-completion and reducing times (ms), from a --trace document."""
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    ranks = sorted({e["pid"] for e in spans})
    steps = {(e["pid"], e["args"]["step"]): e for e in spans if e["cat"] == "step"}
    last = max(s for _, s in steps)

    def end(e):
        return e["ts"] + e["dur"]
    wall = {r: end(steps[r, last]) - end(steps[r, warmup - 1]) for r in ranks}  # µs
    waited = {r: 0.0 for r in ranks}
    flight = {r: 0.0 for r in ranks}
    buckets: dict = {}
    for r in ranks:
        for s in range(warmup, last + 1):
            step = steps[r, s]
            inside = [e for e in spans if e["pid"] == r and step["ts"] <= e["ts"] <= end(step)]
            waited[r] += sum(e["dur"] for e in inside if e["name"] == "allreduce wait")
            mine = [e for e in inside if "bucket" in e.get("args", {})]
            flight[r] += max(end(e) for e in mine) - min(e["ts"] for e in mine)
            backward = next(e for e in inside if e["name"] == "backward")
            for e in mine:
                b = buckets.setdefault(e["args"]["bucket"], {"bytes": e["args"]["bytes"], "total": [], "reducing": [],
                                                             "hidden_by": []})
                b["total"].append(e["dur"] / 1e3)
                b["reducing"].append(e["dur"] / 1e3 - e["args"].get("queued_ms", 0.0))
                b["hidden_by"].append(max(0.0, end(backward) - e["ts"]) / 1e3)  # backward left after its issue
    steps_n = last + 1 - warmup
    return {"images_per_s": global_batch * steps_n / (wall[0] / 1e6), "step_ms": wall[0] / steps_n / 1e3,
            "exposed_share": statistics.mean(waited[r] / wall[r] for r in ranks),
            "in_flight_share": statistics.mean(flight[r] / wall[r] for r in ranks),
            "buckets": {k: {"bytes": b["bytes"], "total_ms": statistics.median(b["total"]),
                            "reducing_ms": statistics.median(b["reducing"]),
                            "backward_after_issue_ms": statistics.median(b["hidden_by"])}
                        for k, b in sorted(buckets.items())}}


# ---- PyTorch DDP ----------------------------------------------------------------------------------------
def worker_torch(args) -> None:
    """One DDP rank: warm up, then alternate blocks of synced steps and no_sync() steps; rank 0 prints JSON."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from cpu_throughput import load_images, torch_net
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    torch.manual_seed(0)
    x_np, y_np = load_images("real", 60000)
    x_all = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(y_np)
    rows = np.arange(args.rank, len(y_np), args.world)  # this rank's part of the training set
    order = np.random.default_rng([0, args.rank]).permutation(rows)
    net = DistributedDataParallel(torch_net(), bucket_cap_mb=args.bucket_mb)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    local = args.batch // args.world

    def step(i):
        idx = torch.from_numpy(order[(i * local) % (len(order) - local):][:local])
        opt.zero_grad(set_to_none=False)
        loss_fn(net(x_all[idx]), y_all[idx]).backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    times = {"sync": 0.0, "no_sync": 0.0}
    block, i = max(1, args.steps // 4), args.warmup
    for b in range(2 * (args.steps // block)):
        kind = "sync" if b % 2 == 0 else "no_sync"
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(block):
            if kind == "sync":
                step(i)
            else:
                with net.no_sync():
                    step(i)
            i += 1
        times[kind] += time.perf_counter() - t0
    n = block * (args.steps // block)
    if args.rank == 0:
        print(json.dumps({"images_per_s": args.batch * n / times["sync"], "step_ms": 1e3 * times["sync"] / n,
                          "no_sync_step_ms": 1e3 * times["no_sync"] / n,
                          "exposed_share": max(0.0, 1 - times["no_sync"] / times["sync"]),
                          "torch": torch.__version__}), flush=True)
    dist.destroy_process_group()


def run_torch(args, ranks: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(ranks),
                               "--port", str(port), "--batch", str(args.batch), "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--threads", str(args.threads),
                               "--bucket-mb", str(args.bucket_mb)],
                              env=env_threads(args.threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(ranks)]
    outs = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("PyTorch DDP worker failed:\n" + "\n".join(err[-2000:] for _, err in outs))
    return json.loads(outs[0][0].strip().splitlines()[-1])


# ---- driver ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="each configuration once per round, in rotating order")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads per rank")
    p.add_argument("--bucket-mb", type=float, default=4.0, help="gradient bucket size, both frameworks")
    p.add_argument("--no-torch", action="store_true", help="ddp_cnn only")
    p.add_argument("--json", metavar="FILE", help="also write every run's result as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_torch(args)
        return 0
    orders = ["shard", "global"] if has_data_order() else [None]
    configs = [("ddp_cnn", r, o) for r in (1, 2) for o in orders]
    configs += [] if args.no_torch else [("torch", r, None) for r in (1, 2)]
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; fmnist-cnn, global batch {args.batch}, {args.threads} thread(s) per rank, "
          f"buckets {args.bucket_mb} MB; {args.steps} timed steps after {args.warmup}, {args.rounds} rounds"
          + ("" if orders[0] else "; this ddp_cnn has no --data-order: one data order"), flush=True)
    results: dict = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="ddp_cnn-scaling-") as tmp:
        work, data = Path(tmp), Path(tmp) / "fm2"
        subprocess.run([sys.executable, "-m", "data_tools.shard", "--out", str(data), "--shards", "2", "--stratify",
                        "--force"], cwd=ROOT, check=True, capture_output=True)
        for rnd in range(args.rounds):
            turn = configs[rnd % len(configs):] + configs[:rnd % len(configs)]  # each goes first in turn
            for framework, ranks, order in turn:
                time.sleep(1.0)  # let the last run's processes be gone
                r = (run_ddp(args, data, work, ranks, order) if framework == "ddp_cnn" else run_torch(args, ranks))
                results[framework, ranks, order].append(r)
                print(f"round {rnd + 1}: {framework} {ranks} rank(s) {order or ''}: {r['images_per_s']:.0f} img/s, "
                      f"exposed {100 * r['exposed_share']:.1f}%; load average {os.getloadavg()[0]:.1f}", flush=True)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{f} {n} {o}": rs for (f, n, o), rs in results.items()}, indent=1))
    return 0


def median_run(runs: list) -> dict:
    return sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]


def report(results: dict, args) -> None:
    print("\n| framework | data order | ranks x threads | img/s (median) | range | scaling 1 -> 2 | "
          "exposed comm share | allreduce in flight share | ms/step |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (framework, ranks, order), runs in results.items():
        m, rates = median_run(runs), sorted(r["images_per_s"] for r in runs)
        one = results.get((framework, 1, order))
        scaling = f"{m['images_per_s'] / (2 * median_run(one)['images_per_s']):.2f}" if ranks == 2 and one else ""
        flight = f"{100 * m['in_flight_share']:.1f}%" if "in_flight_share" in m else "–"
        how = " (1 - t no_sync / t sync)" if framework == "torch" else ""
        print(f"| {framework} | {order or '–'} | {ranks} x {args.threads} | {m['images_per_s']:.0f} | "
              f"{rates[0]:.0f}-{rates[-1]:.0f} | {scaling} | {100 * m['exposed_share']:.1f}%{how} | {flight} | "
              f"{m['step_ms']:.1f} |")
    for order in ("shard", "global", None):  # ddp_cnn on 2 ranks against PyTorch DDP, run beside it in each round
        mine, theirs = results.get(("ddp_cnn", 2, order)), results.get(("torch", 2, None))
        if mine and theirs:
            pairs = sorted(a["images_per_s"] / b["images_per_s"] for a, b in zip(mine, theirs))
            print(f"ddp_cnn ({order or 'default'} order) / PyTorch DDP, 2 ranks, round by round: median "
                  f"{statistics.median(pairs):.2f}, range {pairs[0]:.2f}-{pairs[-1]:.2f}")
    for ranks in (1, 2):
        shard, glob = results.get(("ddp_cnn", ranks, "shard")), results.get(("ddp_cnn", ranks, "global"))
        if shard and glob:
            pairs = sorted(a["images_per_s"] / b["images_per_s"] for a, b in zip(glob, shard))
            print(f"global / shard order, {ranks} rank(s), round by round: median {statistics.median(pairs):.2f}, "
                  f"range {pairs[0]:.2f}-{pairs[-1]:.2f}")
    two = [r for (f, n, _), runs in results.items() if f == "ddp_cnn" and n == 2 for r in runs]
    for k in sorted(two[0]["buckets"]) if two else []:
        b = [r["buckets"][k] for r in two]
        print(f"ddp_cnn 2 ranks, bucket {k} ({b[0]['bytes'] / 2**20:.2f} MB): issue to completion "
              f"{statistics.median(x['total_ms'] for x in b):.2f} ms, reducing "
              f"{statistics.median(x['reducing_ms'] for x in b):.2f} ms, backward left after its issue "
              f"{statistics.median(x['backward_after_issue_ms'] for x in b):.1f} ms (medians)")


if __name__ == "__main__":
    sys.exit(main())

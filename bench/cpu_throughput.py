"""CPU training throughput: ddp_cnn (NumPy backend) against PyTorch on the same network.

    python bench/cpu_throughput.py                       # table for batch 64/128/256 + per-layer split
    python bench/cpu_throughput.py --batches 128 --no-torch
    python bench/cpu_throughput.py --ranks                # also N ranks x 1 BLAS thread vs 1 rank x N threads
    python bench/cpu_throughput.py --model lenet --cpu-kernels both   # the compiled kernels and the NumPy path

Every framework runs in its own subprocess, so its peak RSS (``ru_maxrss``)
is its own and the BLAS thread count (``--threads``, default: every core) is
fixed before NumPy or PyTorch loads: ddp_cnn in one process uses BLAS's own threads.
The workers of one batch size stay alive side by side and take turns: one
timed repeat each, in rotating order, ``--rounds`` x ``--repeats`` times, so
a slow spell of a shared VM hits every framework alike; the ratio is also
given repeat by repeat.  Both train ``--model`` (default seed 002's ``fmnist-cnn``: conv3x3-32, conv3x3-64,
pool, dropout .25, conv3x3-128, pool, dropout .25, dense 3200->512, dropout
.5, dense 512->10, LeakyReLU 0.1, valid padding; or ``lenet``, ``fmnist-vgg``) with Adam lr 1e-3 on the same
images: random ones of the Fashion-MNIST shape by default, or the real training
set with ``--data real``.  A timed repeat is ``--steps`` steps (forward,
backward, optimizer step, dropout on) after ``--warmup`` steps; the table shows
the median of the repeats.  ``--cpu-kernels`` picks ddp_cnn's CPU path (``jit``: the
compiled kernels of ddp_cnn/model/cpu_kernels.py; ``numpy``: the NumPy reference; ``both``: the
two side by side).  The first step's time is printed too: it includes the kernels'
compilation when their disk cache is cold, or loading them from it.

PyTorch is an optional bench dependency (``pip install torch``, CPU build);
it is never imported by ddp_cnn itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
N_IMAGES = 2048  # distinct images cycled through (the same for both frameworks)


# ---- data -----------------------------------------------------------------

def load_images(kind: str, n: int, seed: int = 0):
    """(n, 28, 28, 1) float32 standardised images and int64 labels."""
    import numpy as np
    if kind == "real":
        sys.path.insert(0, str(ROOT))
        from data_tools import idx
        folder = Path("/usr/share/datasets/fashion-mnist")
        images = idx.read_idx(folder / "train-images-idx3-ubyte.gz").array[:n]
        labels = idx.read_idx(folder / "train-labels-idx1-ubyte.gz").array[:n]
        x = images.astype(np.float32) / 255.0
        x = (x - x.mean()) / x.std()
        return np.ascontiguousarray(x[..., None]), labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
                     f"x{i.get('num_threads')}" for i in threadpool_info())


def serve(step, batch: int, steps: int, warmup: int, info: dict) -> dict:
    """Warm up, then time `steps` calls of step(i) each time the driver writes ``run``
    on stdin (one JSON line back per repeat), until it writes ``quit``.

    The driver alternates these repeats between the frameworks' workers, each
    a few seconds long, so that a slow spell of a shared VM (seen here: 30-45%
    of the CPU time stolen by the hypervisor for minutes) hits all of them alike.
    """
    t0 = time.perf_counter()
    step(0)  # compiles the kernels (or loads them from the disk cache): timed, not hidden
    first_step_s = time.perf_counter() - t0
    for i in range(1, warmup):
        step(i)
    i = max(warmup, 1)
    print("ready", flush=True)
    for command in sys.stdin:
        if command.strip() != "run":
            break
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            step(i)
            i += 1
        wall = time.perf_counter() - t0
        print(json.dumps({"rate": batch * steps / wall, "cpu_per_wall": (time.process_time() - cpu0) / wall}),
              flush=True)
    return {**info, "batch": batch, "peak_rss_mb": peak_rss_mb(), "first_step_s": first_step_s}


# ---- workers (one per subprocess) ------------------------------------------

def ddp_setup(args):
    """The model, Adam, the loss and the images both ddp_cnn workers train on."""
    sys.path.insert(0, str(ROOT))
    from ddp_cnn import model as model_mod
    from ddp_cnn.model import optim
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.model.layers import SoftmaxCrossEntropy

    x_all, y_all = load_images(args.data, N_IMAGES)
    model = model_mod.build(args.model, get_backend("cpu"), seed=0)
    opt = optim.create("adam", model.params, model.grads, 1e-3, decay_ranges=model.decay_ranges)
    return model, opt, SoftmaxCrossEntropy(), x_all, y_all


def worker_ddp(args) -> dict:
    import numpy as np
    model, opt, loss_fn, x_all, y_all = ddp_setup(args)
    b = args.batch
    per_epoch = N_IMAGES // b

    def step(i):
        k = i % per_epoch
        logits = model.forward(x_all[k * b:(k + 1) * b], train=True, step=i)
        loss_fn.forward(logits, y_all[k * b:(k + 1) * b])
        model.backward(loss_fn.backward())
        opt.step()

    from ddp_cnn.model import cpu_kernels
    result = serve(step, b, args.steps, args.warmup, {"framework": args.worker, "blas": blas_info(),
                                                      "cpu_kernels": "jit" if cpu_kernels.active() else "numpy"})
    assert np.isfinite(model.params).all()
    return result


def torch_net(model: str = "fmnist-cnn"):
    """PyTorch's twin of ddp_cnn.model's network of that name (NCHW; the same layers and sizes)."""
    import torch.nn as nn
    if model == "lenet":
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                             nn.Dropout(0.25), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    if model == "fmnist-vgg":
        layers, c = [], 1
        for stage, f in enumerate((64, 128, 256)):
            for _ in range(2):
                layers += [nn.Conv2d(c, f, 3, padding=1, bias=False), nn.BatchNorm2d(f), nn.ReLU()]
                c = f
            if stage < 2:
                layers += [nn.MaxPool2d(2), nn.Dropout(0.1 * (stage + 1))]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))
    act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
    # ddp_cnn's layer order: each max-pool before the activation (the same function as seed 002's order).
    return nn.Sequential(nn.Conv2d(1, 32, 3), act(), nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), act(), nn.Dropout(0.25),
                         nn.Conv2d(64, 128, 3), nn.MaxPool2d(2), act(), nn.Dropout(0.25), nn.Flatten(),
                         nn.Linear(3200, 512), act(), nn.Dropout(0.5), nn.Linear(512, 10))


def worker_torch(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_np, y_np = load_images(args.data, N_IMAGES)
    x_all = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()  # NCHW, PyTorch's native layout
    y_all = torch.from_numpy(y_np)
    net = torch_net(args.model)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    b = args.batch
    per_epoch = N_IMAGES // b

    def step(i):
        k = i % per_epoch
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(net(x_all[k * b:(k + 1) * b]), y_all[k * b:(k + 1) * b])
        loss.backward()
        opt.step()

    return serve(step, b, args.steps, args.warmup, {"framework": "torch", "torch": torch.__version__,
                                                    "torch_threads": torch.get_num_threads()})


def worker_profile(args) -> dict:
    """Seconds per step of each layer's forward and backward, the loss and the optimizer (ddp_cnn)."""
    import numpy as np
    model, opt, loss_fn, x_all, y_all = ddp_setup(args)
    from ddp_cnn.system.backend import STREAM_DROPOUT
    from ddp_cnn.model.layers import Dropout
    b = args.batch
    per_epoch = N_IMAGES // b
    names = [f"{layer.name}" for layer in model.layers]
    totals = {key: 0.0 for key in [f"fwd {n}" for n in names] + ["loss"] + [f"bwd {n}" for n in reversed(names)]
              + ["optimizer"]}
    clock = time.perf_counter

    def step(i, record):
        k = i % per_epoch
        x = x_all[k * b:(k + 1) * b]
        for j, layer in enumerate(model.layers):  # model.forward, timed layer by layer
            if isinstance(layer, Dropout):
                layer.key = (model.seed, STREAM_DROPOUT, model.rank, i, j)
            t0 = clock()
            x = layer.forward(x, True)
            record[f"fwd {layer.name}"] += clock() - t0
        t0 = clock()
        loss_fn.forward(x, y_all[k * b:(k + 1) * b])
        dy = loss_fn.backward()
        record["loss"] += clock() - t0
        for j in reversed(range(len(model.layers))):
            t0 = clock()
            dy = model.layers[j].backward(dy, need_dx=j > 0)
            record[f"bwd {model.layers[j].name}"] += clock() - t0
        t0 = clock()
        opt.step()
        record["optimizer"] += clock() - t0

    scratch = dict(totals)
    for i in range(args.warmup):
        step(i, scratch)
    steps = args.steps * args.repeats
    t0 = clock()
    for i in range(args.warmup, args.warmup + steps):
        step(i, totals)
    wall = clock() - t0
    assert np.isfinite(model.params).all()
    return {"framework": "ddp_cnn-profile", "batch": b,
            "ms_per_step": {k: 1e3 * v / steps for k, v in totals.items()},
            "wall_ms_per_step": 1e3 * wall / steps, "images_per_s": b * steps / wall}


def worker_mpi(args) -> dict:
    """Data-parallel steps over the ranks of mpirun: local batch = batch / ranks, the real GradReducer."""
    import numpy as np
    sys.path.insert(0, str(ROOT))
    from ddp_cnn.dist import comm as comm_mod
    from ddp_cnn import model as model_mod
    from ddp_cnn.model import optim
    from ddp_cnn.system.backend import get_backend
    from ddp_cnn.model.layers import SoftmaxCrossEntropy
    from ddp_cnn.dist.reducer import GradReducer
    from ddp_cnn.run.step import compute_gradients

    comm, _ = comm_mod.for_device(comm_mod.create("auto"), get_backend("cpu"))
    x_all, y_all = load_images(args.data, N_IMAGES, seed=comm.rank)
    backend = get_backend("cpu")
    model = model_mod.build(args.model, backend, seed=0)
    model.rank = comm.rank
    opt = optim.create("adam", model.params, model.grads, 1e-3, decay_ranges=model.decay_ranges)
    loss_fn = SoftmaxCrossEntropy()
    reducer = GradReducer(comm, model.grad_buffer, list(zip(model.layer_offsets, model.layer_ends)), args.bucket_mb)
    local = args.batch // comm.size
    per_epoch = N_IMAGES // local

    def step(i):
        k = i % per_epoch
        compute_gradients(model, loss_fn, reducer, x_all[k * local:(k + 1) * local],
                          y_all[k * local:(k + 1) * local], i)
        opt.step()

    for i in range(args.warmup):
        step(i)
    comm.barrier()
    rates, comm_s, exposed_s, walls = [], [], [], []
    i = args.warmup
    for _ in range(args.repeats):
        reducer.comm_seconds = reducer.exposed_seconds = 0.0
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(i)
            i += 1
        wall = time.perf_counter() - t0
        walls.append(wall)
        rates.append(args.batch * args.steps / wall)
        comm_s.append(reducer.comm_seconds)
        exposed_s.append(reducer.exposed_seconds)
    reducer.close()
    digests = comm.allgather_obj(float(np.abs(model.params).sum()))
    rss = comm.allgather_obj(peak_rss_mb())
    r = rates.index(statistics.median(rates))
    return {"framework": "ddp_cnn-mpi", "ranks": comm.size, "threads": args.threads, "batch": args.batch,
            "images_per_s": rates[r], "rates": rates, "comm_share": comm_s[r] / walls[r],
            "exposed_share": exposed_s[r] / walls[r], "ms_per_step": 1e3 * walls[r] / args.steps,
            "replicas_equal": len(set(digests)) == 1, "peak_rss_mb_per_rank": rss, "blas": blas_info(),
            "is_root": comm.is_root}


WORKERS = {"ddp": worker_ddp, "torch": worker_torch, "profile": worker_profile, "mpi": worker_mpi}


# ---- driver -------------------------------------------------------------------

def worker_command(kind: str, args, batch: int, threads: int, ranks: int = 1):
    """(argv, env, cwd) of a worker subprocess with its thread count fixed before NumPy/PyTorch load.

    Kinds ending in ``-before`` run the worker of that name from the ``--before``
    checkout (its own bench/cpu_throughput.py and ddp_cnn), for before/after tables."""
    tree = ROOT
    if kind.endswith("-before"):
        kind, tree = kind[:-len("-before")], Path(args.before).resolve()
    env = dict(os.environ)
    env["DDP_CNN_CPU_KERNELS"] = "numpy" if args.cpu_kernels == "numpy" or kind == "ddp-numpy" else "jit"
    kind = "ddp" if kind == "ddp-numpy" else kind
    for var in THREAD_VARS:
        env[var] = str(threads)
    if args.unset_coretype:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    cmd = [sys.executable, str(tree / "bench" / "cpu_throughput.py"), "--worker", kind, "--batch", str(batch),
           "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--data", args.data, "--bucket-mb", str(args.bucket_mb)]
    if args.model != "fmnist-cnn":  # (a --before checkout may not know --model)
        cmd += ["--model", args.model]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks)] + cmd
    return cmd, env, tree


def run_worker(kind: str, args, batch: int, threads: int, ranks: int = 1) -> dict:
    """Run a one-shot worker (profile, mpi) to its end; its last JSON line."""
    cmd, env, cwd = worker_command(kind, args, batch, threads, ranks)
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")][-1]


class Served:
    """A throughput worker kept alive between repeats (:func:`serve`): ``repeat()``
    times one repeat, ``close()`` ends it and returns its summary."""

    def __init__(self, kind, args, batch, threads):
        self.cmd, env, cwd = worker_command(kind, args, batch, threads)
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.repeats: list[dict] = []
        self._expect("ready")

    def _expect(self, what=None):
        line = self.proc.stdout.readline()
        if not line or (what and line.strip() != what):
            self.proc.kill()
            raise SystemExit(f"{' '.join(self.cmd)} stopped ({line.strip() or 'no output'}); its stderr is above")
        return line

    def repeat(self) -> None:
        try:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise SystemExit(f"{' '.join(self.cmd)} stopped between repeats; its stderr is above") from None
        self.repeats.append(json.loads(self._expect()))

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        summary = json.loads(self._expect())
        self.proc.wait()
        rates = [r["rate"] for r in self.repeats]
        return {**summary, "rates": rates, "images_per_s": statistics.median(rates),
                "cpu_per_wall": statistics.median(r["cpu_per_wall"] for r in self.repeats)}


def print_profile(p: dict) -> None:
    ms = p["ms_per_step"]
    total = sum(ms.values())
    print(f"\nddp_cnn per-layer split, batch {p['batch']}: "
          f"{p['wall_ms_per_step']:.1f} ms/step "
          f"({p['images_per_s']:.0f} img/s while timing each layer)")
    print(f"| {'phase':<22} | {'ms/step':>8} | {'share':>6} |")
    print(f"| {'-' * 22} | {'-' * 8}:| {'-' * 6}:|")
    for key, v in ms.items():
        print(f"| {key:<22} | {v:8.2f} | {100 * v / total:5.1f}% |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS / torch threads")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="timed repeats per framework and batch = rounds x repeats, alternating between frameworks")
    p.add_argument("--data", choices=["random", "real"], default="random")
    p.add_argument("--model", choices=["fmnist-cnn", "lenet", "fmnist-vgg"], default="fmnist-cnn",
                   help="the network (PyTorch trains its twin, torch_net)")
    p.add_argument("--cpu-kernels", choices=["jit", "numpy", "both"], default="jit",
                   help="ddp_cnn's CPU path: the compiled kernels, the NumPy reference, or both side by side "
                        "(sets DDP_CNN_CPU_KERNELS in the workers)")
    p.add_argument("--no-torch", action="store_true", help="ddp_cnn only")
    p.add_argument("--no-profile", action="store_true", help="skip the per-layer split")
    p.add_argument("--profile-batch", type=int, default=128)
    p.add_argument("--ranks", action="store_true",
                   help="also: N ranks x 1 BLAS thread vs 1 rank x N BLAS threads, N = the cores (mpirun), "
                        "with the allreduce share")
    p.add_argument("--bucket-mb", type=float, default=4.0, help="allreduce bucket size (as ddp_cnn.train)")
    p.add_argument("--unset-coretype", action="store_true",
                   help="drop OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in the workers (benchmark only)")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    p.add_argument("--before", metavar="CHECKOUT", default=None,
                   help="also time the ddp_cnn of another checkout (e.g. the commit before a change; its "
                        "one-process worker and, with --ranks, its one rank per core), side by side")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def time_frameworks(args) -> list:
    """(batch, {kind: summary}) per batch size.  Every worker of a batch size stays alive;
    their timed repeats alternate, a few seconds each, so that a slow spell of a shared
    machine hits all of them."""
    kinds = (("ddp",) + (("ddp-numpy",) if args.cpu_kernels == "both" else ())
             + (("ddp-before",) if args.before else ()) + (() if args.no_torch else ("torch",)))
    rows = []
    for b in args.batches:
        workers: dict = {}
        try:
            for kind in kinds:
                workers[kind] = Served(kind, args, b, args.threads)
            for r in range(args.rounds * args.repeats):
                for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # each goes first in turn
                    time.sleep(0.2)  # let the last worker's BLAS/OpenMP threads stop spinning
                    workers[kind].repeat()
            done = {kind: w.close() for kind, w in workers.items()}
        finally:  # a worker that failed: end the others too, not leave them waiting on stdin
            for w in workers.values():
                if w.proc.poll() is None:  # close() has waited for the ones that ended well
                    w.proc.kill()
        rows.append((b, done))
    return rows


def print_frameworks(rows, args) -> None:
    first = rows[0][1]
    print(f"BLAS: {first['ddp']['blas']}; cores in use while timing: ddp_cnn {first['ddp']['cpu_per_wall']:.2f}"
          + ("" if args.no_torch else f", torch {first['torch']['torch']} ({first['torch']['torch_threads']} "
                                      f"threads) {first['torch']['cpu_per_wall']:.2f}"))
    print("| batch | ddp_cnn img/s | PyTorch img/s | ratio | ddp_cnn peak RSS MB | PyTorch peak RSS MB | RSS ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b, done in rows:
        d, t = done["ddp"], done.get("torch")
        head = f"| {b} | {d['images_per_s']:.0f} |"
        if t:
            print(f"{head} {t['images_per_s']:.0f} | {d['images_per_s'] / t['images_per_s']:.2f} | "
                  f"{d['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {d['peak_rss_mb'] / t['peak_rss_mb']:.2f} |")
        else:
            print(f"{head} - | - | {d['peak_rss_mb']:.0f} | - | - |")
    for b, done in rows if args.before else []:  # this checkout against --before, repeat by repeat
        pairs = sorted(a / c for a, c in zip(done["ddp"]["rates"], done["ddp-before"]["rates"]))
        print(f"batch {b}: ddp_cnn {done['ddp']['images_per_s']:.0f} img/s, --before "
              f"{done['ddp-before']['images_per_s']:.0f} img/s; ratio repeat by repeat: median "
              f"{statistics.median(pairs):.2f}, range {pairs[0]:.2f}-{pairs[-1]:.2f} ({len(pairs)} pairs)")
    if not args.no_torch:  # the ratio repeat by repeat: both timed within seconds of each other
        for b, done in rows:
            for kind in ("ddp", "ddp-numpy"):
                if kind not in done:
                    continue
                pairs = sorted(a / c for a, c in zip(done[kind]["rates"], done["torch"]["rates"]))
                print(f"batch {b}: ratio of each {kind} repeat ({done[kind]['cpu_kernels']} kernels) to the "
                      f"PyTorch repeat beside it: median {statistics.median(pairs):.2f}, range "
                      f"{pairs[0]:.2f}-{pairs[-1]:.2f} ({len(pairs)} pairs)")
    for b, done in rows:
        print(f"batch {b}: first step (compilation or cache load included) "
              + ", ".join(f"{kind} {d['first_step_s']:.2f} s" for kind, d in done.items() if "first_step_s" in d))


def compare_ranks(args) -> list:
    """1 rank with BLAS threads = cores against one rank per core with 1 BLAS thread
    each, interleaved round by round; prints the median rounds, returns every result."""
    cores = os.cpu_count() or 1
    print(f"\nOne node, global batch {args.profile_batch}, bucket {args.bucket_mb} MB: 1 rank with BLAS threads "
          f"= cores, against one rank per core with 1 BLAS thread each:")
    print("| layout | img/s | ms/step | allreduce time / step time | exposed (waited) share |")
    print("| --- | ---: | ---: | ---: | ---: |")
    layouts = [("mpi", 1, cores), ("mpi", cores, 1)] + ([("mpi-before", cores, 1)] if args.before else [])
    per_layout: dict = {}
    for _ in range(args.rounds):
        for kind, ranks, threads in layouts:
            per_layout.setdefault((kind, ranks), []).append(run_worker(kind, args, args.profile_batch, threads, ranks))
    results = []
    for kind, ranks, threads in layouts:
        rs = sorted(per_layout[kind, ranks], key=lambda r: r["images_per_s"])
        results += rs
        r = rs[len(rs) // 2]  # the median round
        where = " (--before)" if kind.endswith("-before") else ""
        print(f"| {ranks} rank(s) x {threads} BLAS thread(s){where} | {r['images_per_s']:.0f} | {r['ms_per_step']:.1f} | "
              f"{100 * r['comm_share']:.1f}% | {100 * r['exposed_share']:.1f}% |")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        if result.get("is_root", True):  # under mpirun, rank 0 alone reports
            print(json.dumps(result), flush=True)
        return 0
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"{args.threads} thread(s); data {args.data}; model {args.model}; ddp_cnn CPU kernels {args.cpu_kernels}; "
          f"median of {args.rounds * args.repeats} x {args.steps} steps after {args.warmup} warm-up; "
          f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows = time_frameworks(args)
    print(f"load average after the timing: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print_frameworks(rows, args)
    results = [summary for _, done in rows for summary in done.values()]
    if not args.no_profile:
        prof = run_worker("profile", args, args.profile_batch, args.threads)
        results.append(prof)
        print_profile(prof)
    if args.ranks:
        results += compare_ranks(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())

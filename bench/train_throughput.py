"""Training throughput on one GPU: ddp_cnn against PyTorch (eager and whole-step CUDA graph).

Same network (fmnist-cnn: seed 002's), float32, TF32 off everywhere, Adam,
data resident on the GPU, one process.  Prints images/s, the ratios and the
peak GPU memory of each; run on the GPU machine:

    PYTHONPATH=. python bench/train_throughput.py --batches 64,128,512
    PYTHONPATH=. python bench/train_throughput.py --model fmnist-vgg --batches 256 --no-torch --profile

(--profile: each layer's forward and backward timed with the device synchronised
around it, so the sum is a little above the free-running step.)

PyTorch is only the comparison here; the product never imports it.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def ddp_cnn_setup(name: str, batch: int):
    import cupy

    from ddp_cnn.model import layers as L
    from ddp_cnn import model as M
    from ddp_cnn.model import optim
    from ddp_cnn.system.backend import get_backend

    cupy.get_default_memory_pool().free_all_blocks()
    model = M.build(name, get_backend("gpu", "float32"), seed=0)
    opt = optim.create("adam", model.params, model.grads, 1e-3)
    rng = np.random.default_rng(0)
    xs = [cupy.asarray(rng.standard_normal((batch, 28, 28, 1)).astype(np.float32)) for _ in range(4)]
    ys = [cupy.asarray(rng.integers(0, 10, batch)) for _ in range(4)]
    return model, opt, L.SoftmaxCrossEntropy(), xs, ys


def ddp_cnn_profile(name: str, batch: int, steps: int, warmup: int) -> dict:
    """Milliseconds per step of each layer's forward and backward, the loss and the optimizer."""
    import cupy

    from ddp_cnn.system.backend import STREAM_DROPOUT
    from ddp_cnn.model.layers import Dropout
    model, opt, loss_fn, xs, ys = ddp_cnn_setup(name, batch)
    sync = cupy.cuda.Device().synchronize
    totals: dict = {}

    def timed(key, fn, *a, **kw):
        sync()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        sync()
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
        return out

    for i in range(warmup + steps):
        if i == warmup:
            totals.clear()
        x = xs[i % 4]
        for j, layer in enumerate(model.layers):
            if isinstance(layer, Dropout):
                layer.key = (model.seed, STREAM_DROPOUT, model.rank, i, j)
            x = timed(f"fwd {j:2d} {layer.name}", layer.forward, x, True)
        timed("loss", lambda: loss_fn.forward(x, ys[i % 4]))
        dy = timed("loss backward", loss_fn.backward)
        for j in reversed(range(len(model.layers))):
            dy = timed(f"bwd {j:2d} {model.layers[j].name}", model.layers[j].backward, dy, need_dx=j > 0)
        timed("optimizer", opt.step)
    return {k: 1e3 * v / steps for k, v in totals.items()}


def ddp_cnn_rate(batch: int, steps: int, warmup: int, name: str = "fmnist-cnn") -> tuple[float, int]:
    import cupy

    pool = cupy.get_default_memory_pool()
    model, opt, loss_fn, xs, ys = ddp_cnn_setup(name, batch)

    def step(i):
        loss_fn.forward(model.forward(xs[i % 4], train=True, step=i), ys[i % 4])
        model.backward(loss_fn.backward())
        opt.step()

    for i in range(warmup):
        step(i)
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    cupy.cuda.Device().synchronize()
    return batch * steps / (time.perf_counter() - t0), pool.total_bytes()


def torch_net(torch):
    nn = torch.nn
    act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
    return nn.Sequential(nn.Conv2d(1, 32, 3), act(), nn.Conv2d(32, 64, 3), act(), nn.MaxPool2d(2), nn.Dropout(0.25),
                         nn.Conv2d(64, 128, 3), act(), nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
                         nn.Linear(3200, 512), act(), nn.Dropout(0.5), nn.Linear(512, 10))


def torch_rate(batch: int, steps: int, warmup: int, graph: bool) -> tuple[float, int]:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    net = torch_net(torch).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=graph)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        run = g.replay
    else:
        for _ in range(warmup):
            step()
        run = step
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0), torch.cuda.max_memory_allocated()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="64,128,512")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--model", default="fmnist-cnn", help="ddp_cnn architecture (PyTorch's twin: fmnist-cnn only)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--profile", action="store_true", help="also print ddp_cnn's time per layer")
    p.add_argument("--json", help="write the table here too")
    args = p.parse_args()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        if args.profile:
            split = ddp_cnn_profile(args.model, batch, max(args.steps // 5, 5), args.warmup)
            print(f"{args.model}, batch {batch}: ms per step, each pass synchronised "
                  f"(sum {sum(split.values()):.2f} ms)")
            for key, ms in split.items():
                print(f"  {key:<28} {ms:8.3f}")
        ours, ours_mem = ddp_cnn_rate(batch, args.steps, args.warmup, args.model)
        row = {"batch": batch, "model": args.model, "ddp_cnn": ours, "ddp_cnn_mem_mb": ours_mem / 2**20}
        if not args.no_torch and args.model == "fmnist-cnn":
            eager, eager_mem = torch_rate(batch, args.steps, args.warmup, graph=False)
            graph, graph_mem = torch_rate(batch, args.steps, args.warmup, graph=True)
            row.update(torch_eager=eager, torch_graph=graph, torch_eager_mem_mb=eager_mem / 2**20,
                       torch_graph_mem_mb=graph_mem / 2**20)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'batch':>6} {'ddp_cnn':>10} {'torch eager':>12} {'torch graph':>12} {'/eager':>7} {'/graph':>7}"
          f" {'mem MB ours':>11} {'mem MB torch':>12}")
    for r in rows:
        if "torch_eager" in r:
            print(f"{r['batch']:>6} {r['ddp_cnn']:>10.0f} {r['torch_eager']:>12.0f} {r['torch_graph']:>12.0f} "
                  f"{r['ddp_cnn'] / r['torch_eager']:>7.2f} {r['ddp_cnn'] / r['torch_graph']:>7.2f} "
                  f"{r['ddp_cnn_mem_mb']:>11.0f} {r['torch_eager_mem_mb']:>12.0f}")
        else:
            print(f"{r['batch']:>6} {r['ddp_cnn']:>10.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

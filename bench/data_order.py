"""What the global data order costs to read: per-step batch time, global against shard order.

    python -m data_tools.shard --out /tmp/fm --shards 4 --force
    python bench/data_order.py /tmp/fm --ranks 2 --batch-size 128

For rank 0 of ``--ranks`` (a stand-in communicator, one process), the time
to produce each training batch of the first two epochs (rows, pixels,
normalisation to float32; no augmentation), in the shard order (rank 0's
shards, read whole at start) and the global order (every shard, chunks
read as batches need them).  Also the start-up time of each.  The batches
are produced in the main thread (no prefetch) so that the cost is seen,
not hidden behind compute as in training.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


class RankStandIn:
    """Rank ``rank`` of ``size`` for the reader's collectives (errors, step count), in one process."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def allreduce_scalar(self, value, op="sum"):
        return value

    def allgather_obj(self, obj):
        return [obj] * self.size


def per_step_ms(loader, epochs=2, steps=None):
    out = []
    for epoch in range(epochs):
        order = loader.order(epoch)
        times = []
        for step in range(min(steps or loader.steps_per_epoch, loader.steps_per_epoch)):
            t = time.perf_counter()
            loader.batch(order, epoch, step)
            times.append(time.perf_counter() - t)
        out.append(1e3 * np.array(times))
    return out


def main(argv=None):
    from ddp_cnn.data.loader import Loader, open_rank_data
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    args = p.parse_args(argv)
    comm = RankStandIn(0, args.ranks)
    local = args.batch_size // args.ranks
    print(f"rank 0 of {args.ranks}, global batch {args.batch_size} ({local}/rank); ms per batch: "
          "median [p90] of each epoch")
    for order in ("shard", "global"):
        t = time.perf_counter()
        data = open_rank_data(args.data, "train", comm, data_order=order, stream=order == "global")
        opened = time.perf_counter() - t
        loader = Loader(data, batch_size=local, comm=comm, seed=0, dtype=np.float32, data_order=order,
                        global_batch=args.batch_size, prefetch=0)
        epochs = per_step_ms(loader)
        cells = ", ".join(f"epoch {i + 1}: {np.median(e):.3f} [{np.percentile(e, 90):.3f}]"
                          for i, e in enumerate(epochs))
        print(f"{order:>6}: open {opened:.2f} s ({len(data)} rows on this rank), {loader.steps_per_epoch} "
              f"steps/epoch; {cells}")


if __name__ == "__main__":
    main()

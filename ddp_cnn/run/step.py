"""One training step's gradient: forward, loss, backward with the bucketed allreduce overlapping it.

The step issues no host synchronisation of its own: the loss and the
correct count stay on the device, and the ranks' agreement on stopping or
skipping rides in the gradient allreduce (:mod:`ddp_cnn.dist.reducer`).

The averaged gradient is the mean over the GLOBAL batch, however it is cut:
each (micro-)batch's gradient, a mean over its m images, is weighted by
m x ranks / global batch before the ranks' mean.  With equal shares and no
accumulation the weight is exactly 1 and nothing is scaled.
"""
from __future__ import annotations

from ddp_cnn.model import cpu_kernels

# The deadline of the first step a process runs: it compiles the CPU kernels (Numba) where their disk cache is cold
# or stale, seconds to a minute or more on a busy machine, on every rank at once.  A stall there still ends the job,
# later; every later step has --collective-timeout.
FIRST_STEP_TIMEOUT = 600.0


def step_timeout(timeout: float, first: bool) -> float:
    """Seconds a step may take before its gradient allreduce is called lost (0: no limit)."""
    if timeout > 0 and first and cpu_kernels.active():
        return max(timeout, FIRST_STEP_TIMEOUT)
    return timeout


def compute_gradients(model, loss_fn, reducer, x, y, step: int, *, soft=None, poison: bool = False,
                      stop=False, checkpoint=False, deadline: float | None = None, micro_batches: int = 1, share: float = 1.0,
                      first_row: int = 0):
    """Collective: one step's gradient, averaged over ranks into ``model.grads``.

    Returns (loss, correct) as device scalars (the loss: this rank's mean);
    the agreed flag (non-finite gradient on any rank, stop requested on any
    rank) is ``reducer.flag``.  Each bucket's allreduce starts as soon as
    the last micro-batch's backward has produced it.
    `soft`: the teacher's logits for this batch (distillation); `stop`: this
    rank's stop request, or a callable asked for it as late as possible;
    `checkpoint`: likewise, this rank's request for a checkpoint after the step;
    `micro_batches` K (``--accumulate``): forward and backward K slices of
    the batch one after the other, summing their weighted gradients, and
    allreduce once; `share`: this rank's batch x ranks / global batch (1
    when every rank has an equal share); `first_row`: where this rank's rows
    begin in the global batch (the global data order), which with the
    micro-batch's own start places each row's dropout mask.
    """
    n, k = x.shape[0], micro_batches
    loss = correct = None
    for i in range(k):
        rows = slice(i * n // k, (i + 1) * n // k)
        last = i == k - 1
        logits = model.forward(x[rows], train=True, step=step, first_row=first_row + rows.start)
        part_loss = loss_fn.forward(logits, y[rows], None if soft is None else soft[rows])
        part_correct = (logits.argmax(axis=1) == y[rows]).sum()
        dlogits = loss_fn.backward()
        weight = (rows.stop - rows.start) / n
        if k > 1 or share != 1.0:
            dlogits *= weight * share
            part_loss = part_loss * weight
        loss = part_loss if loss is None else loss + part_loss
        correct = part_correct if correct is None else correct + part_correct
        if poison and last:  # --inject-nan: this rank's gradient turns NaN, as after an overflow
            dlogits[...] = float("nan")
        if not last:  # summed into the reducer's accumulator; the last micro-batch's buckets add it in
            model.backward(dlogits)
            reducer.accumulate()
            continue
        reducer.begin(stop, loss, checkpoint)
        model.backward(dlogits, reducer.layer_done)
        reducer.finish(deadline)
    return loss, correct

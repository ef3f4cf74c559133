"""One training step's gradient: forward, loss, backward with the bucketed allreduce overlapping it.

The step issues no host synchronisation of its own: the loss and the
correct count stay on the device, and the ranks' agreement on stopping or
skipping rides in the gradient allreduce (:mod:`ddp_cnn.reducer`).
"""
from __future__ import annotations


def compute_gradients(model, loss_fn, reducer, x, y, step: int, *, soft=None, poison: bool = False,
                      stop=False, deadline: float | None = None):
    """Collective: one step's gradient, averaged over ranks into ``model.grads``.

    Returns (loss, correct) as device scalars; the agreed flag (non-finite
    gradient on any rank, stop requested on any rank) is ``reducer.flag``.
    Each bucket's allreduce starts as soon as backward has produced it.
    `soft`: the teacher's logits for this batch (distillation); `stop`: this
    rank's stop request, or a callable asked for it as late as possible.
    """
    logits = model.forward(x, train=True, step=step)
    loss = loss_fn.forward(logits, y, soft)
    correct = (logits.argmax(axis=1) == y).sum()
    dlogits = loss_fn.backward()
    if poison:  # --inject-nan: this rank's gradient turns NaN, as after an overflow
        dlogits[...] = float("nan")
    reducer.begin(stop, loss)
    model.backward(dlogits, reducer.layer_done)
    reducer.finish(deadline)
    return loss, correct

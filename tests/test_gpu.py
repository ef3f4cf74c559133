"""GPU-only checks: CuPy against NumPy on whole training runs, the GPU gradient
transports.  Skipped, with the reason shown, where CuPy or a GPU is missing."""
import numpy as np
import pytest

from ddp_cnn.model import layers as L
from ddp_cnn import model as M
from ddp_cnn.model import optim
from ddp_cnn.system.backend import get_backend, gpu_available, to_host
from ddp_cnn.dist.reducer import GradReducer
from helpers import GPU_REASON

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason=GPU_REASON)]


def twenty_steps(device, dtype, optimizer):
    bk = get_backend(device, dtype)
    model = M.build("fmnist-cnn", bk, seed=4, dropout=False)
    opt = optim.create(optimizer, model.params, model.grads, 1e-3 if optimizer == "adam" else 0.005)
    loss_fn = L.SoftmaxCrossEntropy(0.1)
    losses = []
    for step in range(20):
        rng = np.random.default_rng(step)
        x = bk.xp.asarray(rng.standard_normal((32, 28, 28, 1)), dtype=bk.dtype)
        y = bk.xp.asarray(rng.integers(0, 10, 32))
        losses.append(float(loss_fn.forward(model.forward(x, train=True, step=step), y)))
        model.backward(loss_fn.backward())
        opt.step()
    return to_host(model.params).astype(np.float64), np.array(losses)


@pytest.mark.parametrize("dtype,optimizer,tol", [
    ("float64", "adam", 1e-9),       # the same math in float64: only rounding differs
    ("float32", "momentum", 1e-4),   # float32, an update rule that does not amplify rounding
    ("float32", "adam", 2e-3),       # Adam divides tiny noisy gradients by their own size:
])                                   # float32 rounding grows to ~5e-4 in 20 steps (measured on the H100)
def test_gpu_and_cpu_training_agree(dtype, optimizer, tol):
    p_gpu, l_gpu = twenty_steps("gpu", dtype, optimizer)
    p_cpu, l_cpu = twenty_steps("cpu", dtype, optimizer)
    assert np.allclose(l_gpu, l_cpu, rtol=1e-3, atol=1e-4), (l_gpu, l_cpu)
    rel = np.linalg.norm(p_gpu - p_cpu) / np.linalg.norm(p_cpu)
    assert rel < tol, f"GPU vs CPU parameters after 20 steps ({dtype}, {optimizer}): relative difference {rel:.2e}"


def test_nccl_communicator_with_one_rank_averages_in_place():
    pytest.importorskip("cupy.cuda.nccl")
    from ddp_cnn.dist.comm import MPIComm, NCCLComm
    world = MPIComm()
    if world.size != 1:
        pytest.skip("the NCCL check runs with one rank (NCCL cannot pair ranks on one GPU)")
    bk = get_backend("gpu", "float32")
    comm = NCCLComm(world)
    model = M.build("lenet", bk, seed=0)
    reducer = GradReducer(comm, model.grad_buffer, list(zip(model.layer_offsets, model.layer_ends)), 0.01)
    values = bk.xp.asarray(np.random.default_rng(0).standard_normal(model.num_params).astype(np.float32))
    model.grads[...] = values
    reducer.begin()
    for i in reversed(range(len(model.layers))):
        reducer.layer_done(i)
    reducer.finish()
    assert bool((model.grads == values).all()) and float(reducer.flag) == 0.0


def test_host_staged_reducer_on_gpu_with_one_rank_thread():
    from ddp_cnn.dist.comm import MPIComm
    comm = MPIComm()
    bk = get_backend("gpu", "float64")
    model = M.build("lenet", bk, seed=0)
    reducer = GradReducer(comm, model.grad_buffer, list(zip(model.layer_offsets, model.layer_ends)), 0.01)
    values = np.random.default_rng(comm.rank).standard_normal(model.num_params)
    model.grads[...] = bk.xp.asarray(values)
    reducer.begin()
    for i in reversed(range(len(model.layers))):
        reducer.layer_done(i)
    reducer.finish()
    reducer.close()
    expected = comm.allreduce_host(values) / comm.size
    assert np.allclose(to_host(model.grads), expected, rtol=1e-14)
    assert float(reducer.flag) == 0.0

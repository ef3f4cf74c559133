"""Shared test helpers: backends to parametrize over, and the gradient check."""
from __future__ import annotations

import numpy as np
import pytest

from ddp_cnn.system.backend import get_backend, gpu_available, to_host
from ddp_cnn.model import Sequential

# How long a subprocess may take before a test calls it hung: sized for a busy 2-core machine (load 10),
# never a statement of how fast a healthy run is (speed lives in bench/).
HANG_S = 300

GPU_REASON = "needs CuPy and a CUDA GPU (run the suite on the GPU machine)"

# Every numeric check runs on NumPy and, where a GPU is present, on CuPy.
BACKENDS = [pytest.param("cpu", id="cpu"),
            pytest.param("gpu", id="gpu", marks=[pytest.mark.gpu,
                                                  pytest.mark.skipif(not gpu_available(), reason=GPU_REASON)])]


def backend64(device="cpu"):
    return get_backend(device, "float64")


def rel_error(a, b) -> float:
    a, b = np.asarray(to_host(a), np.float64), np.asarray(to_host(b), np.float64)
    denom = max(np.linalg.norm(a), np.linalg.norm(b), 1e-30)
    return float(np.linalg.norm(a - b) / denom)


def check_layer_gradients(layer, input_shape, device="cpu", batch=2, train=True, eps=1e-6, seed=0,
                          x=None, tol=1e-6):
    """Central finite differences vs backward, element by element, float64.

    L(x, params) = sum(forward(x) * R) for a fixed random R, so dL/dy = R.
    Checks dL/dx and dL/dparam for every parameter; returns the errors.
    """
    bk = backend64(device)
    xp = bk.xp
    model = Sequential([layer], input_shape, bk, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if x is None:
        x = rng.standard_normal((batch,) + tuple(input_shape))
    x = xp.asarray(x, dtype=np.float64)
    # Perturb parameters away from their (often constant) init so gradients are generic.
    model.params[...] = xp.asarray(to_host(model.params) + 0.1 * rng.standard_normal(model.num_params))
    r = xp.asarray(rng.standard_normal((batch,) + tuple(model.output_shape)))

    def loss():
        return float(to_host((model.forward(x, train=train, step=7) * r).sum()))

    model.forward(x, train=train, step=7)
    dx = layer.backward(r, need_dx=True)
    dx = to_host(dx).copy()
    grads = to_host(model.grads).copy()

    def numeric(arr):
        flat = arr.reshape(-1)
        out = np.empty(flat.size)
        for i in range(flat.size):
            old = float(flat[i])
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            out[i] = (up - down) / (2 * eps)
        return out

    errors = {"x": rel_error(dx.ravel(), numeric(x))}
    if model.num_params:
        errors["params"] = rel_error(grads, numeric(model.params))
    for what, err in errors.items():
        assert err < tol, f"{layer.name}: d{what} relative error {err:.3e} >= {tol}"
    return errors


def write_idx(path, array: np.ndarray) -> None:
    """A raw (uncompressed) IDX file of unsigned bytes."""
    import struct
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def make_synthetic_idx(folder, n_train=1200, n_test=300, seed=0, size=28):
    """An MNIST-style folder of easy classes: class c lights up a band at row 2c (+ noise)."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 3:2 * c + 6, 4:24] = 220
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def make_synthetic_shards(out, shards, seed=0, **kw):
    """Shard a synthetic set with the real tool; returns the output folder."""
    from pathlib import Path
    from data_tools.shard import main as shard_main
    src = make_synthetic_idx(Path(out).parent / (Path(out).name + "-idx"), seed=seed, **kw)
    code = shard_main([str(src), "--out", str(out), "--shards", str(shards), "--dataset", "synthetic"])
    assert code in (0, None), f"sharding the synthetic set failed with {code}"
    return Path(out)


def ranks_of(run_dir) -> list[int]:
    """The pids of the rank processes of the job writing in run_dir: not its launcher, supervisor or shell."""
    from pathlib import Path
    marker = f"--run-dir {run_dir} "
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and "ddp_cnn.train" in cmdline and marker in cmdline + " " \
                and not any(word in cmdline for word in ("ddp_cnn.supervise", "mpirun", "mpiexec", "/bin/sh")):
            pids.append(int(entry.name))
    return pids

"""Training on the real Fashion-MNIST (Debian's dataset-fashion-mnist), single process and 4 ranks."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.model import layers as L
from ddp_cnn import model as M
from ddp_cnn.model import optim
from ddp_cnn.system.backend import get_backend

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(),
                                  reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")


def read_fmnist(split, count):
    from data_tools.idx import read_idx
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz").array[:count]
    labels = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz").array[:count]
    x = ((images.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[..., None]  # NHWC
    return x, labels.astype(np.int64)


@needs_fmnist
def test_single_process_lenet_on_a_real_slice_beats_75_percent():
    """The library API end to end, on 8,000 real images read straight from the IDX files."""
    t0 = time.perf_counter()
    x, y = read_fmnist("train", 8000)
    xt, yt = read_fmnist("test", 2000)
    model = M.build("lenet", get_backend("cpu"), seed=0)
    opt = optim.create("adam", model.params, model.grads, 2e-3)
    loss_fn = L.SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    step = 0
    for epoch in range(2):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - 63, 64):
            idx = order[i:i + 64]
            loss_fn.forward(model.forward(x[idx], train=True, step=step), y[idx])
            model.backward(loss_fn.backward())
            opt.step()
            step += 1
    accuracy = float((model.predict(xt).argmax(axis=1) == yt).mean())
    elapsed = time.perf_counter() - t0
    print(f"lenet, 8000 images x 2 epochs: test accuracy {accuracy:.4f} in {elapsed:.1f} s")
    assert accuracy > 0.75  # how long it takes is bench/'s business, not an assertion


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    if not FMNIST.is_dir():
        pytest.skip("needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("fmnist") / "shards"
    subprocess.run([sys.executable, "-m", "data_tools.shard", str(FMNIST), "--out", str(out), "--shards", "4",
                    "--stratify"], check=True, cwd=REPO)
    return out


def test_mpirun_4_ranks_one_epoch_of_real_data_beats_80_percent(real_shards, tmp_path):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "-n", "4", sys.executable, "-m", "ddp_cnn.train",
                           "--data", str(real_shards), "--model", "lenet", "--epochs", "1", "--device", "cpu",
                           "--run-dir", str(run), "--progress", "off", "--check-replicas", "100"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    test = [r for r in records if r["kind"] == "test"]  # scored once, at the end
    assert len(test) == 1 and "test_acc" not in epoch
    print(f"4 ranks, 1 epoch: test acc {test[0]['test_acc']:.4f}, {epoch['images_per_s']:.0f} img/s, "
          f"comm {epoch['comm_seconds']:.2f}s of {epoch['seconds']:.2f}s; wall {time.perf_counter() - t0:.1f}s")
    assert test[0]["test_count"] == 10000  # every test image scored exactly once
    assert test[0]["test_acc"] > 0.80
    assert "4 rank(s)" in proc.stdout
    assert proc.stdout.count("epoch 1/1") == 1  # rank 0 alone prints

"""What survives what: checkpoint retention around corrupt files, models too large for memory, a full
disk while training, and the small promises a new user leans on (issue 32, items 2-5).

Runs of the CLI are real subprocesses in one process (no launcher needed for these paths), each bounded
by a timeout sized to catch a hang on a loaded machine."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn import checkpoint as ckpt
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("survival") / "d1", 1)


def train(data_dir, run_dir, *flags, timeout=300, env=None):
    cmd = [sys.executable, "-m", "ddp_cnn.train", "--data", str(data_dir), "--run-dir", str(run_dir),
           "--device", "cpu", "--progress", "off", "--local-batch-size", "8", *map(str, flags)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])  # as by a full disk


def flip_params(path: Path) -> None:
    """Flip bytes inside the stored parameters (the file still opens; its checksum disagrees)."""
    import h5py
    with h5py.File(path, "r+") as f:
        f["params"][:4] = -f["params"][:4] - 1.0


# ---- item 2: --keep counts only checkpoints that verify -------------------------------------

def small_save(folder, step, keep, warn):
    params = np.arange(10, dtype=np.float32) + step
    return ckpt.save(folder, step, params, {"m": params * 0}, {}, {"global_step": step}, keep=keep, warn=warn)


def test_keep_counts_only_checkpoints_that_verify_and_moves_corrupt_ones_aside(tmp_path):
    for step in (1, 2, 3, 4, 5):
        small_save(tmp_path, step, keep=0, warn=print)
    truncate(tmp_path / "ckpt-00000005.h5")
    flip_params(tmp_path / "ckpt-00000004.h5")
    said = []
    small_save(tmp_path, 6, keep=3, warn=said.append)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-00000002.h5", "ckpt-00000003.h5", "ckpt-00000006.h5"]  # three that verify
    for step in (4, 5):
        name = f"ckpt-0000000{step}.h5"
        assert (tmp_path / (name + ckpt.CORRUPT_SUFFIX)).is_file()  # moved aside, not deleted
        assert any(str(tmp_path / name) in line and "moved aside" in line for line in said), said
    assert len(said) == 2
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.load(path)


def test_a_resume_past_two_corrupt_checkpoints_keeps_the_one_it_resumed_from(data, tmp_path):
    common = ["--model", "lenet", "--epochs", 2, "--checkpoint-every", 4, "--eval-every", 0]
    first = train(data, tmp_path, *common, "--max-steps", 20, "--keep", 0)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = tmp_path / "checkpoints"
    names = [p.name for p in ckpt.list_checkpoints(folder)]
    assert names[-3:] == ["ckpt-00000012.h5", "ckpt-00000016.h5", "ckpt-00000020.h5"], names
    truncate(folder / "ckpt-00000020.h5")
    flip_params(folder / "ckpt-00000016.h5")
    proc = train(data, tmp_path, *common, "--max-steps", 13, "--keep", 3, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {folder / 'ckpt-00000012.h5'}" in proc.stdout
    kept = [p.name for p in ckpt.list_checkpoints(folder)]
    assert kept == ["ckpt-00000008.h5", "ckpt-00000012.h5", "ckpt-00000013.h5"], kept
    for name in ("ckpt-00000016.h5", "ckpt-00000020.h5"):
        assert (folder / (name + ckpt.CORRUPT_SUFFIX)).is_file()
        assert f"{folder / name}" in proc.stdout and "moved aside" in proc.stdout

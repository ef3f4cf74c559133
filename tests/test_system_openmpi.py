"""The system's Open MPI (Debian's openmpi-bin, /usr/bin/mpirun.openmpi) as a user's cluster has it,
instead of the `mpich` wheel: the multi-rank tests at 2 ranks, and a 4-rank training through
launch/mpirun.sh that ends where one process ends (float64, the global data order).

mpi4py's PyPI wheel runs on it (MPI4PY_LIBMPI, see system_openmpi.py); each run checks that the
ranks got Open MPI.  Skipped with the reason where Open MPI is not installed."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import system_openmpi
from ddp_cnn.run.checkpoint import list_checkpoints, load
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "mpirun.sh")
PROBE = ("import sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "  # a file per rank: no interleaved lines
         "open(f'{sys.argv[1]}/rank{c.rank}', 'w').write(f'{c.size} ' + MPI.Get_library_version())")

pytestmark = pytest.mark.skipif(system_openmpi.why_not() is not None, reason=str(system_openmpi.why_not()))


def launch(ranks, *cmd, timeout):
    """launch/mpirun.sh on the system Open MPI, bounded by ``timeout``."""
    env = system_openmpi.env(MPIRUN=system_openmpi.MPIRUN)
    return subprocess.run([LAUNCH, "-n", str(ranks), *map(str, cmd)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_ranks_run_on_the_system_open_mpi(tmp_path):
    proc = launch(2, sys.executable, "-c", PROBE, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert sorted(said) == ["rank0", "rank1"]  # one job of 2 ranks, not 2 jobs of 1
    assert all(text.startswith("2 Open MPI v4") for text in said.values()), said  # not the mpich wheel's


def test_the_multi_rank_tests_pass_at_2_ranks():
    proc = launch(2, sys.executable, "-m", "pytest", "--only-mpi", "-q", "-p", "no:cacheprovider", "tests",
                  timeout=1200)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail


def test_a_4_rank_training_ends_where_one_process_ends(tmp_path):
    data = make_synthetic_shards(tmp_path / "data", 4)
    shm = system_openmpi.shm_entries()
    flags = ["-m", "ddp_cnn.train", "--data", data, "--model", "lenet", "--dtype", "float64", "--device", "cpu",
             "--data-order", "global", "--batch-size", 32, "--max-steps", 12, "--eval-every", 0, "--progress", "off"]
    proc = launch(4, sys.executable, *flags, "--run-dir", tmp_path / "four", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp_cnn: 4 rank(s)" in proc.stdout
    assert not system_openmpi.orphaned_shm(shm, system_openmpi.OPEN_MPI_SHM), "segments left in /dev/shm"
    one = subprocess.run([sys.executable, *map(str, flags), "--comm", "single", "--run-dir", tmp_path / "one"],
                         cwd=REPO, env=system_openmpi.env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    four, single = (load(list_checkpoints(tmp_path / run / "checkpoints")[-1]) for run in ("four", "one"))
    assert four["meta"]["global_step"] == single["meta"]["global_step"] == 12
    assert four["meta"]["world_size"] == 4
    rel = np.linalg.norm(four["params"] - single["params"]) / np.linalg.norm(single["params"])
    assert rel < 1e-10  # float64: only the order of the allreduce's sums differs

"""launch/mpirun.sh: the one-node launcher."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "mpirun.sh")
# One write per rank (atomic on a pipe), so the ranks' lines never interleave.
SIZE = ("from mpi4py import MPI; import os; "
        "os.write(1, f\"{MPI.COMM_WORLD.Get_size()} {os.environ['OMP_NUM_THREADS']}\\n\".encode())")


def launch(*args):
    return subprocess.run([LAUNCH, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_n_auto_runs_one_rank_per_core_with_one_blas_thread_each_without_gpus():
    env_gpus = subprocess.run("nvidia-smi -L", shell=True, capture_output=True, text=True).stdout.count("GPU")
    proc = launch("-n", "auto", sys.executable, "-c", SIZE)
    assert proc.returncode == 0, proc.stderr
    expected = env_gpus or (os.cpu_count() or 1)
    lines = proc.stdout.split("\n")[:-1]
    assert len(lines) == expected and set(lines) == {f"{expected} {max(1, os.cpu_count() // expected)}"}
    assert f"-n auto: {expected} ranks" in proc.stderr


def test_a_bad_rank_count_is_a_usage_error():
    proc = launch("-n", "many", "true")
    assert proc.returncode == 2 and "usage: launch/mpirun.sh -n RANKS|auto" in proc.stderr

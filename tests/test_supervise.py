"""The supervisor (python -m ddp_cnn.supervise) over real mpirun jobs: a killed or stopped rank is
survived and lands on the uninterrupted run's parameters; a usage error, bad data or a divergence is
not retried; SIGTERM checkpoints and exits 75; nothing is left behind.  Every job is bounded by a
timeout sized to catch a hang on a busy machine, not to time it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.dist.faults import EXIT_DIVERGED, EXIT_PREEMPTED
from helpers import HANG_S, make_synthetic_shards, ranks_of

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "mpirun.sh")
sys.path.insert(0, str(REPO / "launch"))
import leftovers  # noqa: E402  (launch/leftovers.py: what an aborted MPI job leaves on this host)

pytestmark = pytest.mark.skipif(subprocess.run(["bash", "-c", "command -v mpirun || command -v mpiexec"],
                                               capture_output=True).returncode != 0, reason="needs mpirun")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("supervise") / "d2", 2)


def train_flags(data_dir, run_dir, *flags):
    return [sys.executable, "-m", "ddp_cnn.train", "--data", str(data_dir), "--run-dir", str(run_dir),
            "--device", "cpu", "--progress", "off", "--model", "lenet", "--eval-every", "0", *map(str, flags)]


def supervise(ranks, train, *options):
    return [sys.executable, "-m", "ddp_cnn.supervise", "-n", str(ranks), *map(str, options), "--", *train]


def start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def records(run_dir, kind=None):
    path = Path(run_dir) / "metrics.jsonl"
    found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in found if kind is None or r["kind"] == kind]


def wait_for(predicate, proc, timeout=HANG_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"ended early with {proc.returncode}: {proc.communicate()[1][-3000:]}"
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def rank_pid(run_dir, rank):
    """The pid of a rank of the job writing in run_dir (MPICH and Open MPI export the rank)."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--run-dir {run_dir} " in cmdline + " " and "ddp_cnn.train" in cmdline \
                and not any(word in cmdline for word in ("ddp_cnn.supervise", "mpirun", "mpiexec")) \
                and (f"PMI_RANK={rank}".encode() in environ or f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ):
            return int(entry.name)
    return None


def alive(pid):
    """Whether the process runs (a zombie waiting for its parent does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def final(run_dir):
    return ckpt.load(ckpt.list_checkpoints(Path(run_dir) / "checkpoints")[-1])


class Watched:
    """The MPI segments and launcher files a job's ranks and proxies hold, gathered while it runs
    (other jobs on the machine make their own): none may outlive the job."""

    def __init__(self, run_dir):
        self.run_dir, self.files = run_dir, set()

    def look(self):
        self.files |= leftovers.held_by(ranks_of(self.run_dir))
        return True

    def until_end(self, job):
        deadline = time.time() + HANG_S
        while job.poll() is None and time.time() < deadline:
            self.look()
            time.sleep(0.1)
        return job.communicate(timeout=HANG_S)

    def left(self):
        assert any("mpich_shm" in f for f in self.files), "the job's shared memory was never seen"
        return sorted(f for f in self.files if os.path.exists(f))


def steps_logged(run_dir):
    return max([r["step"] for r in records(run_dir, "step")], default=0)


GLOBAL = ["--data-order", "global", "--batch-size", 16, "--epochs", 200, "--max-steps", 400, "--checkpoint-every", 10,
          "--log-every", 1, "--keep", 0]


def test_a_killed_worker_is_survived_and_the_run_equals_an_uninterrupted_one(data, tmp_path):
    whole = subprocess.run([LAUNCH, "-n", "2", *train_flags(data, tmp_path / "whole", *GLOBAL)], cwd=REPO,
                           capture_output=True, text=True, timeout=HANG_S)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "supervised"
    watched = Watched(run_dir)
    job = start(supervise(2, train_flags(data, run_dir, *GLOBAL), "--max-restarts", 2))
    try:
        wait_for(lambda: watched.look() and steps_logged(run_dir) >= 25, job)
        pid = rank_pid(run_dir, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, err = watched.until_end(job)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("supervise: restart")]
    assert len(lines) == 1 and "rank 1 on " in lines[0] and "killed" in lines[0], err[-3000:]
    restart = records(run_dir, "restart")
    assert len(restart) == 1 and restart[0]["rank"] == 1 and restart[0]["world_size"] == 2
    assert restart[0]["from_step"] >= 20 and restart[0]["from_step"] % 10 == 0
    assert f"resuming from step {restart[0]['from_step']}" in lines[0]
    steps = [r["step"] for r in records(run_dir, "step")]
    assert steps == list(range(1, 401)), "lost or repeated steps in the metrics of the supervised run"
    a, b = final(tmp_path / "whole"), final(run_dir)
    assert a["meta"]["global_step"] == b["meta"]["global_step"] == 400
    assert np.array_equal(a["params"], b["params"]), "the restarted run left the uninterrupted run's trajectory"
    assert not watched.left(), watched.left()
    assert not list((run_dir / "checkpoints").glob("*.tmp-*")), "a partial checkpoint was left"
    assert rank_pid(run_dir, 0) is None and rank_pid(run_dir, 1) is None


def test_a_stopped_rank_is_named_and_the_run_goes_on(data, tmp_path):
    flags = ["--epochs", 200, "--max-steps", 60, "--checkpoint-every", 10, "--log-every", 1,
             "--collective-timeout", 4]
    watched = Watched(tmp_path)
    job = start(supervise(2, train_flags(data, tmp_path, *flags), "--max-restarts", 1))
    try:
        wait_for(lambda: watched.look() and steps_logged(tmp_path) >= 15, job)
        pid = rank_pid(tmp_path, 1)
        os.kill(pid, signal.SIGSTOP)  # as a rank whose node froze: alive, silent
        out, err = watched.until_end(job)
        gone = time.time() + 30
        while alive(pid) and time.time() < gone:
            time.sleep(0.1)
        stopped_rank_left = alive(pid)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        if pid and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    assert job.returncode == 0, err[-3000:]
    assert not stopped_rank_left, "the stopped rank outlived its job"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1 did not reach" in errors[0] and "within 4 s (stalled, dead or " \
        "unreachable)" in errors[0], err[-3000:]
    restart = [line for line in err.splitlines() if line.startswith("supervise: restart 1/1")]
    assert len(restart) == 1 and "rank 1 on " in restart[0] and " did not reach" in restart[0], err[-3000:]
    assert final(tmp_path)["meta"]["global_step"] == 60
    assert not watched.left(), watched.left()


@pytest.mark.parametrize("case", ["indivisible batch", "corrupt shard", "divergence"])
def test_a_usage_error_bad_data_or_a_divergence_is_not_retried(data, tmp_path, case):
    flags, code = ["--epochs", 1, "--max-steps", 20], 2
    data_dir = data
    if case == "indivisible batch":
        flags += ["--batch-size", 15]
    elif case == "corrupt shard":
        import shutil
        data_dir = tmp_path / "data"
        shutil.copytree(data, data_dir)
        shard = data_dir / "train-00001-of-00002.h5"
        raw = bytearray(shard.read_bytes())
        raw[:4096] = os.urandom(4096)  # the HDF5 superblock: the file no longer opens
        shard.write_bytes(bytes(raw))
    else:
        flags += ["--optimizer", "sgd", "--lr", "1e6"]
        code = EXIT_DIVERGED
    proc = subprocess.run(supervise(2, train_flags(data_dir, tmp_path / "run", *flags), "--max-restarts", 3),
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"supervise: the job ended with exit code {code}" in proc.stderr and "not restarted" in proc.stderr
    assert "supervise: restart" not in proc.stderr
    assert not records(tmp_path / "run", "restart")


def test_sigterm_to_the_supervisor_checkpoints_and_exits_75_without_restart(data, tmp_path):
    job = start(supervise(2, train_flags(data, tmp_path, "--epochs", 200, "--log-every", 1)))
    try:
        wait_for(lambda: steps_logged(tmp_path) >= 10, job)
        os.kill(job.pid, signal.SIGTERM)
        out, err = job.communicate(timeout=HANG_S)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stopped by a signal" in out and "supervise: restart" not in err
    assert final(tmp_path)["meta"]["global_step"] >= 10


def test_once_the_restarts_are_spent_the_jobs_own_code_is_returned(data, tmp_path):
    job = start(supervise(2, train_flags(data, tmp_path, "--epochs", 200, "--log-every", 1), "--max-restarts", 0))
    try:
        wait_for(lambda: steps_logged(tmp_path) >= 5, job)
        os.kill(rank_pid(tmp_path, 1), signal.SIGKILL)
        out, err = job.communicate(timeout=HANG_S)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 9, err[-3000:]  # MPICH's hydra reports the signal that killed the rank
    assert "no restart left (0 of --max-restarts 0 used): exit 9" in err
    assert "rank 1 on " in err.splitlines()[-1]


def test_bad_supervisor_flags_are_one_line(tmp_path):
    for argv, needle in ((["-n", "2", "--", "python", "-m", "ddp_cnn.evaluate"], "must run `python -m ddp_cnn.train"),
                         (["-n", "2", "--min-ranks", "3", "--", "python", "-m", "ddp_cnn.train"], "--min-ranks 3"),
                         (["-n", "2", "--hostfile", str(tmp_path / "none"), "--", "python", "-m", "ddp_cnn.train"],
                          "--hostfile")):
        proc = subprocess.run([sys.executable, "-m", "ddp_cnn.supervise", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=HANG_S)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr


def test_stop_and_checkpoint_requests_agree_in_the_flag_on_3_ranks(tmp_path):
    """Every combination of the ranks' stop requests and rank 0's checkpoint request, decoded alike on
    every rank from the one flag that rides in the gradient allreduce."""
    script = tmp_path / "flags.py"
    script.write_text(
        "import itertools, numpy as np\n"
        "from ddp_cnn import comm\n"
        "from ddp_cnn.dist.reducer import GradReducer\n"
        "world = comm.create()\n"
        "buffer = np.zeros(5, np.float32)\n"
        "reducer = GradReducer(world, buffer, [(0, 4)], bucket_mb=0)\n"
        "for stops in itertools.product([False, True], repeat=world.size):\n"
        "    for due in (False, True):\n"
        "        reducer.begin(stop=stops[world.rank], checkpoint=due and world.rank == 0)\n"
        "        reducer.layer_done(0)\n"
        "        reducer.finish()\n"
        "        got = reducer.requests(float(reducer.flag))\n"
        "        assert got == (any(stops), due), (stops, due, got, float(reducer.flag))\n"
        "reducer.close()\n"
        "print('checked', world.rank)\n")
    proc = subprocess.run([LAUNCH, "-n", "3", sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0 and proc.stdout.count("checked") == 3, proc.stderr[-3000:]


def test_checkpoint_every_seconds_saves_between_epochs_on_every_rank_alike(data, tmp_path):
    # 600 steps of 75-step epochs; a checkpoint at least every 0.2 s of rank 0's clock, at a step every rank
    # agreed on (--check-replicas would catch ranks that disagreed on anything).
    flags = ["--epochs", 8, "--max-steps", 600, "--checkpoint-every-seconds", 0.2, "--keep", 0, "--check-replicas", 25]
    proc = subprocess.run([LAUNCH, "-n", "2", *train_flags(data, tmp_path, *flags)], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = records(tmp_path, "checkpoint")
    between = [r["step"] for r in saved if r["step"] % 75]  # not at an epoch's end
    assert between, "no time-based checkpoint was written"
    times = [r["time"] for r in saved]
    assert all(r["write_seconds"] >= 0 for r in saved)
    assert len(set(r["step"] for r in saved)) == len(saved) and times == sorted(times)
    for r in saved:
        assert ckpt.load(r["path"])["meta"]["global_step"] == r["step"]


def test_a_rank_that_raises_is_restarted_and_named(data, tmp_path):
    # --fail-at 1:3 raises on rank 1 at global step 3 of every attempt (the checkpoints are taken after
    # step 3): one restart, then the restarts are spent and the job's own code (1) is returned.
    proc = subprocess.run(supervise(2, train_flags(data, tmp_path, "--max-steps", 10, "--checkpoint-every", 1,
                                                   "--fail-at", "1:3"), "--max-restarts", 1),
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("supervise:")]
    assert len(lines) == 2 and lines[0].startswith("supervise: restart 1/1: rank 1 raised an exception") \
        and "resuming from step 3 (ckpt-00000003.h5)" in lines[0], proc.stderr[-3000:]
    assert "no restart left (1 of --max-restarts 1 used): exit 1" in lines[1]
    assert [r["from_step"] for r in records(tmp_path, "restart")] == [3]

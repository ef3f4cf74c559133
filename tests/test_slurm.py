"""launch/slurm.sbatch on a real SLURM (slurmctld, slurmd and munged started here, see
slurm_cluster.py) with the system Open MPI under srun --mpi=pmix: a run to completion, scancel
(a checkpoint, the ranks' clean exit 75, the job over), and the time-limit signal and an admin's
requeue (the job comes back and ends on the same parameters as a run never stopped).

Every wait on SLURM has a deadline; the daemons stop in the fixture's finally, and each test looks
for the job's processes once SLURM says it is over."""
import fcntl
import importlib.metadata
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import slurm_cluster
import system_openmpi
from ddp_cnn.run import checkpoint as ckpt
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"
JOB_TIMEOUT = 600  # a hang, not a slow machine: these jobs take well under a minute unloaded
STEPS = 60
TRAIN_FLAGS = ["--model", "lenet", "--device", "cpu", "--progress", "off", "--eval-every", "0",
               "--local-batch-size", "8", "--log-every", "1"]


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.why_not() or system_openmpi.why_not()
    if reason:
        pytest.skip(reason)
    # One test SLURM on a machine at a time: two clusters whose slurmd share the node's name fail each other's
    # step launches ("task launch failed"), e.g. when two checkouts run their suites side by side.
    with open("/tmp/ddp_cnn-test-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cluster = slurm_cluster.Cluster()
        try:
            yield cluster.start()
        finally:
            leftover = cluster.stop()
    assert not leftover, f"processes left after the SLURM shut down (killed now): {leftover}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("slurm") / "data", 2)


def submit(cluster, data: Path, work: Path, *flags, mpich=False) -> str:
    """sbatch the script as a user would (2 ranks on the one node, its #SBATCH lines) on the system
    Open MPI, or on the `mpich` wheel (srun --mpi=pmi2); the job's id."""
    work.mkdir(parents=True, exist_ok=True)
    env = system_openmpi.env(SLURM_CONF=cluster.env["SLURM_CONF"], DATA=str(data), CONFIG="",
                             RUN_DIR=str(work / "run"))
    if mpich:
        del env["MPI4PY_LIBMPI"]
        env["SRUN_MPI"] = "pmi2"
    small = ["--overcommit"] if (os.cpu_count() or 1) < 2 else []  # the script asks for 2 tasks
    proc = cluster.run("sbatch", "--parsable", "--job-name", work.name, "--chdir", work, *small,
                       "--output", work / "job-%j.out", SCRIPT, *TRAIN_FLAGS, *flags, env=env)
    return proc.stdout.strip().split(";")[0]


def output(work: Path, job_id: str) -> str:
    return (work / f"job-{job_id}.out").read_text()


def steps_logged(work: Path) -> int:
    path = work / "run" / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip() and json.loads(line)["kind"] == "step")


def assert_nothing_left(cluster, job_id: str, shm_before: set, shm_prefixes=system_openmpi.OPEN_MPI_SHM):
    """The job's ranks, srun and batch shell (all carry SLURM_JOB_ID in their environment) are gone,
    and its MPI left no shared-memory segment in /dev/shm."""
    tag = f"SLURM_JOB_ID={job_id}\0".encode()

    def left():
        found = {}
        for pid in cluster.pids():
            try:
                if tag in Path(f"/proc/{pid}/environ").read_bytes():
                    found[pid] = cluster.describe(pid)
            except OSError:
                pass
        return found
    try:
        slurm_cluster.wait_until(lambda: not left(), 60, "the job's processes to end")
    except TimeoutError:
        raise AssertionError(f"job {job_id} is over but its processes are not: {left()}") from None
    orphaned = system_openmpi.orphaned_shm(shm_before, shm_prefixes)
    assert not orphaned, f"job {job_id} left shared memory in /dev/shm: {orphaned}"


def final_params(work: Path, step: int):
    return ckpt.load(work / "run" / "checkpoints" / f"ckpt-{step:08d}.h5")["params"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, data):
    """A job run to completion: the reference for the stopped ones."""
    work = data.parent / "uninterrupted"
    shm = system_openmpi.shm_entries()
    job = submit(cluster, data, work, "--max-steps", STEPS)
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT)
    return work, job, state, shm


def test_the_script_trains_to_completion_on_a_cpu_node(cluster, uninterrupted):
    work, job, state, shm = uninterrupted
    text = output(work, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-3000:]
    assert f"--resume auto: nothing to resume in {work / 'run' / 'checkpoints'} yet; starting a new run" in text
    assert "ddp_cnn: 2 rank(s)" in text  # one job of 2 ranks under srun, not 2 jobs of 1
    assert steps_logged(work) == STEPS and (work / "run" / "checkpoints" / f"ckpt-{STEPS:08d}.h5").exists()
    assert_nothing_left(cluster, job, shm)


def test_the_script_runs_on_the_mpich_wheel_with_srun_mpi_pmi2(cluster, data, uninterrupted):
    try:
        importlib.metadata.version("mpich")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs the mpich wheel (pip install mpich)")
    work = data.parent / "mpich"
    shm = system_openmpi.shm_entries()
    job = submit(cluster, data, work, "--max-steps", STEPS, mpich=True)
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT)
    text = output(work, job)
    assert state["JobState"] == "COMPLETED" and "ddp_cnn: 2 rank(s)" in text, text[-3000:]
    # Two ranks' sums are one addition each, so the MPI library cannot change a bit.
    assert np.array_equal(final_params(work, STEPS), final_params(uninterrupted[0], STEPS))
    assert_nothing_left(cluster, job, shm, system_openmpi.MPICH_SHM)


def test_scancel_stops_with_a_checkpoint_and_a_clean_exit(cluster, data):
    work = data.parent / "cancelled"
    shm = system_openmpi.shm_entries()
    job = submit(cluster, data, work, "--max-steps", 100000)
    slurm_cluster.wait_until(lambda: steps_logged(work) >= 3 or cluster.job(job).get("JobState") not in
                             ("PENDING", "RUNNING"), JOB_TIMEOUT, "3 steps of the job")
    cluster.run("scancel", job)
    state = cluster.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, JOB_TIMEOUT)
    assert_nothing_left(cluster, job, shm)
    text = output(work, job)
    assert state["JobState"] == "CANCELLED", text[-3000:]  # scancel ends the job: no requeue
    stopped = re.findall(r"^stopped by a signal at global step (\d+); checkpoint written", text, re.M)
    assert len(stopped) == 1, text[-3000:]  # the ranks agreed, rank 0 wrote it, printed once
    step = int(stopped[0])
    assert step >= 3
    assert ckpt.load(work / "run" / "checkpoints" / f"ckpt-{step:08d}.h5")["meta"]["global_step"] == step
    assert cluster.job(job).get("Restarts") == "0"


@pytest.mark.parametrize("how", ["time limit signal", "scontrol requeue"])
def test_a_stopped_job_comes_back_and_ends_as_if_never_stopped(how, cluster, data, uninterrupted):
    """The time limit's SIGTERM (--signal, here sent by scancel -s TERM to the job's steps): the ranks
    checkpoint, exit 75 and the script requeues the job itself (this SLURM has no RequeueExit).
    scontrol requeue (an admin, a preemption): SLURM requeues it.  Either way it resumes exactly."""
    work = data.parent / how.replace(" ", "-")
    shm = system_openmpi.shm_entries()
    job = submit(cluster, data, work, "--max-steps", STEPS)
    slurm_cluster.wait_until(lambda: steps_logged(work) >= 3 or cluster.job(job).get("JobState") not in
                             ("PENDING", "RUNNING"), JOB_TIMEOUT, "3 steps of the job")
    if how == "scontrol requeue":
        cluster.run("scontrol", "requeue", job)
    else:
        cluster.run("scancel", "--signal", "TERM", job)
    slurm_cluster.wait_until(lambda: cluster.job(job).get("Restarts", "0") != "0" or cluster.job(job).get(
        "JobState") not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), JOB_TIMEOUT, "the requeue")
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    text = output(work, job)  # both runs' lines: --open-mode=append
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    assert "checkpoint written" in text and "resumed from" in text
    if how == "time limit signal":
        assert f"slurm.sbatch: the ranks stopped with a checkpoint (exit 75); requeueing job {job}" in text
    assert uninterrupted[2]["JobState"] == "COMPLETED"
    assert np.array_equal(final_params(work, STEPS), final_params(uninterrupted[0], STEPS))
    assert_nothing_left(cluster, job, shm)

"""Reliability: failing ranks, preemption, kill -9, corrupt checkpoints, non-finite
gradients, mismatched ranks, and a soak run.  Each test launches real MPI jobs
(launch/mpirun.sh) in subprocesses and bounds them with timeouts, so a hang
fails the test instead of stalling the suite."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.dist.faults import EXIT_DIVERGED, EXIT_PREEMPTED
from helpers import HANG_S, make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "mpirun.sh")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    return {n: make_synthetic_shards(base / f"d{n}", n) for n in (2, 4)}


def train_cmd(ranks, data_dir, run_dir, *flags):
    return [LAUNCH, "-n", str(ranks), sys.executable, "-m", "ddp_cnn.train", "--data", str(data_dir),
            "--run-dir", str(run_dir), "--device", "cpu", "--progress", "off", "--local-batch-size", "8",
            "--model", "lenet", *map(str, flags)]


def run(cmd, timeout=HANG_S):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def start(cmd):
    """A job in its own process group, so the whole job can be signalled or killed."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(predicate, proc, timeout=HANG_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended early with {proc.returncode}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def step_records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    return [json.loads(l) for l in lines]


def last_step(run_dir):
    steps = [r["step"] for r in step_records(run_dir) if r["kind"] == "step"]
    return max(steps, default=0)


def final(run_dir):
    return ckpt.load(ckpt.list_checkpoints(Path(run_dir) / "checkpoints")[-1])


def test_a_rank_that_raises_ends_the_whole_job_within_30_seconds(data, tmp_path):
    # The collective deadline (900 s) is far beyond HANG_S: a job that ends at all was ended by the abort.
    proc, _ = run(train_cmd(2, data[2], tmp_path, "--epochs", 5, "--fail-at", "1:3", "--collective-timeout", 900))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1  # faults.EXIT_FAILED: a rank raised (ddp_cnn.supervise restarts it)
    assert "did not reach" not in out and "not complete" not in out  # not by a deadline
    assert "[rank 1] uncaught exception" in out
    assert "InjectedFault: injected failure on rank 1 at step 3" in out  # that rank's traceback


def test_sigterm_checkpoints_at_a_step_boundary_and_resume_matches_uninterrupted(data, tmp_path):
    # 600 steps (~3 s here): the signal, sent after step 10, always lands before the end.
    flags = ["--epochs", 20, "--max-steps", 600, "--log-every", 1, "--eval-every", 0, "--augment-shift", 1]
    whole, _ = run(train_cmd(2, data[2], tmp_path / "whole", *flags))
    assert whole.returncode == 0, whole.stderr[-2000:]
    job = start(train_cmd(2, data[2], tmp_path / "parts", *flags))
    wait_for(lambda: last_step(tmp_path / "parts") >= 10, job)
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=HANG_S)
    assert job.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stopped by a signal" in out
    stopped_at = final(tmp_path / "parts")["meta"]["global_step"]
    assert 10 <= stopped_at < 600
    resumed, _ = run(train_cmd(2, data[2], tmp_path / "parts", *flags, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at epoch" in resumed.stdout and f"(global step {stopped_at})" in resumed.stdout
    # Epochs counted from 1, as in the epoch lines: "at epoch 1/20, step 12/75 (global step 12)".
    assert re.search(rf"at epoch \d+/20, step \d+/75 \(global step {stopped_at}\)", resumed.stdout)
    a, b = final(tmp_path / "whole"), final(tmp_path / "parts")
    assert a["meta"]["global_step"] == b["meta"]["global_step"] == 600
    assert np.array_equal(a["params"], b["params"]), "resumed parameters differ from the uninterrupted run"


def test_kill_9_during_checkpointing_leaves_loadable_checkpoints(data, tmp_path):
    # fmnist-cnn with Adam: ~21 MB per checkpoint, written after every step, so the kill
    # is likely to land inside a save.
    cmd = train_cmd(2, data[2], tmp_path, "--model", "fmnist-cnn", "--epochs", 5, "--checkpoint-every", 1,
                    "--keep", 0, "--eval-every", 0)
    job = start(cmd)
    wait_for(lambda: len(ckpt.list_checkpoints(tmp_path / "checkpoints")) >= 3, job, timeout=HANG_S)
    time.sleep(0.15)
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate(timeout=HANG_S)
    files = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert len(files) >= 3
    for path in files:  # every file that carries a checkpoint name is complete
        ckpt.load(path)
    newest = ckpt.load_latest(tmp_path / "checkpoints")
    assert newest["path"] == str(files[-1])


def test_corrupt_newest_checkpoint_is_named_and_resume_falls_back(data, tmp_path):
    flags = ["--epochs", 2, "--max-steps", 12, "--checkpoint-every", 4, "--keep", 2, "--eval-every", 0]
    first, _ = run(train_cmd(2, data[2], tmp_path, *flags))
    assert first.returncode == 0, first.stderr[-2000:]
    files = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in files] == ["ckpt-00000008.h5", "ckpt-00000012.h5"]  # --keep 2
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated, as by a full disk
    proc, _ = run(train_cmd(2, data[2], tmp_path, *flags, "--max-steps", 14, "--resume", "latest"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: skipping checkpoint {newest}" in proc.stdout
    assert f"resumed from {files[0]}" in proc.stdout


@pytest.mark.parametrize("skip", [False, True])
def test_non_finite_gradient_on_one_rank_is_seen_by_all(data, tmp_path, skip):
    flags = ["--epochs", 1, "--max-steps", 10, "--inject-nan", "1:5", "--eval-every", 0, "--check-replicas", 1]
    proc, elapsed = run(train_cmd(2, data[2], tmp_path, *flags, *(["--skip-nonfinite"] if skip else [])),
                        timeout=HANG_S)
    if skip:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "skipped the update of step 5" in proc.stdout
        epoch = [r for r in step_records(tmp_path) if r["kind"] == "epoch"][-1]
        assert epoch["skipped_steps"] == 1 and epoch["step"] == 10
    else:
        assert proc.returncode == EXIT_DIVERGED
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert lines == ["error: non-finite loss or gradient at global step 5 (epoch 1); "
                         "lower --lr or use --skip-nonfinite"]
        assert "Traceback" not in proc.stderr  # a decision taken by every rank, not a crash


def test_ranks_with_different_configs_are_refused(data, tmp_path):
    one = [sys.executable, "-m", "ddp_cnn.train", "--data", str(data[2]), "--run-dir", str(tmp_path),
           "--device", "cpu", "--progress", "off"]
    proc, _ = run([LAUNCH, "-n", "1", *one, "--lr", "0.1", ":", "-n", "1", *one, "--lr", "0.2"])
    assert proc.returncode == 2
    assert "error: ranks disagree on the training configuration" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_missing_shard_for_a_rank_is_refused(data, tmp_path):
    broken = tmp_path / "data"
    broken.mkdir()
    for f in Path(data[4]).iterdir():
        if f.name != "train-00002-of-00004.h5":
            (broken / f.name).symlink_to(f)
    proc, _ = run(train_cmd(4, broken, tmp_path / "run", "--epochs", 1))
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "train-00002-of-00004.h5" in err[0]


def test_soak_4_ranks_300_steps_with_a_preemption(data, tmp_path):
    flags = ["--epochs", 20, "--max-steps", 300, "--checkpoint-every", 50, "--log-every", 1, "--check-replicas", 10,
             "--keep", 0]
    job = start(train_cmd(4, data[4], tmp_path, *flags))
    wait_for(lambda: last_step(tmp_path) >= 120, job, timeout=HANG_S)
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=HANG_S)
    assert job.returncode == EXIT_PREEMPTED, err[-2000:]
    proc, _ = run(train_cmd(4, data[4], tmp_path, *flags, "--resume", "latest"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # --check-replicas would have raised on drift
    records = step_records(tmp_path)
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(1, 301)), "lost or duplicated steps in the metrics file"
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch" and r["complete"]]
    assert epochs == sorted(set(epochs)) and epochs == list(range(len(epochs)))
    assert final(tmp_path)["meta"]["global_step"] == 300


def rank_pid(job_marker: str, rank: int) -> int | None:
    """The pid of the training process of `rank` (MPICH and Open MPI both export the rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if job_marker in cmdline and "ddp_cnn.train" in cmdline and (
                f"PMI_RANK={rank}".encode() in environ or f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ):
            return int(entry.name)
    return None


@pytest.mark.parametrize("sigterm", [False, True])  # True: the job is also told to stop during the stall
def test_a_stalled_rank_ends_the_job_at_the_collective_deadline(data, tmp_path, sigterm):
    job = start(train_cmd(2, data[2], tmp_path, "--epochs", 200, "--eval-every", 0, "--log-every", 1,
                          "--collective-timeout", 3))
    wait_for(lambda: last_step(tmp_path) >= 20, job)
    pid = rank_pid(str(tmp_path), 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # as a rank whose node froze: alive, silent
    if sigterm:
        time.sleep(0.5)
        os.killpg(job.pid, signal.SIGTERM)
    try:
        out, err = job.communicate(timeout=HANG_S)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    assert job.returncode != 0
    gone = time.perf_counter() + 60  # a rank that outlives the job by a minute is left behind
    while Path(f"/proc/{pid}").exists() and time.perf_counter() < gone:  # no rank outlives the job
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # The stall meets rank 0 in the step's gradient allreduce, or (--log-every 1) in the loss's allreduce,
    # which the watchdog covers: either way one line naming the stopped rank and the collective.
    assert len(errors) == 1 and re.fullmatch(
        r"error: global step \d+: rank 1 did not reach (the gradient allreduce|an allreduce of a number) "
        r"within 3 s \(stalled, dead or unreachable\)", errors[0]), (out[-2000:], err[-2000:])
    assert "Traceback" not in err


def test_the_first_step_may_compile_the_cpu_kernels_beyond_a_short_deadline(data, tmp_path):
    """A cold kernel cache (a fresh install, an edited kernel): compiling in the first step is no lost rank."""
    from ddp_cnn.model import cpu_kernels
    if not cpu_kernels.active():
        pytest.skip("the compiled CPU kernels are not in use (numba missing or DDP_CNN_CPU_KERNELS=numpy)")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "empty-cache")}
    proc = subprocess.run(train_cmd(2, data[2], tmp_path / "run", "--max-steps", 3, "--eval-every", 0,
                                    "--collective-timeout", 1),
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_S, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any((tmp_path / "empty-cache").rglob("*.nbi")), "nothing was compiled: the test tests nothing"


def test_a_blocking_collective_past_its_deadline_ends_the_job_with_one_line(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(
        "import time\n"
        "from ddp_cnn import comm\n"
        "world = comm.create()\n"
        "world.set_timeout(2)\n"
        "if world.rank == 1:\n"
        "    time.sleep(3600)  # a rank that stalls before the barrier: only the deadline can end this\n"
        "world.barrier()\n")
    proc, _ = run([LAUNCH, "-n", "2", sys.executable, str(script)])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 did not reach a barrier within 2 s (stalled, dead or unreachable)"], \
        proc.stderr[-2000:]


@pytest.mark.parametrize("attr,value,needle", [
    ("std", 0.0, "pixel std must be a number > 0"),
    ("mean", 5.0, "ranks disagree on the training pixel mean of their shards"),
])
def test_a_bad_shard_attribute_on_one_rank_is_one_line_not_a_hang(data, tmp_path, attr, value, needle):
    import h5py
    broken = tmp_path / "data"
    shutil.copytree(data[2], broken)
    with h5py.File(broken / "train-00001-of-00002.h5", "r+") as f:  # rank 1's shard only
        f.attrs[attr] = value
    proc, elapsed = run(train_cmd(2, broken, tmp_path / "run", "--epochs", 1), timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_two_signals_in_a_row_still_checkpoint_and_exit_75(data, tmp_path, sig):
    job = start(train_cmd(2, data[2], tmp_path, "--epochs", 200, "--eval-every", 0, "--log-every", 1))
    wait_for(lambda: last_step(tmp_path) >= 10, job)
    os.killpg(job.pid, sig)
    time.sleep(0.1)
    os.killpg(job.pid, sig)
    out, err = job.communicate(timeout=HANG_S)
    assert job.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stopped by a signal" in out and "assert" not in err  # no launcher assertion lines either
    assert final(tmp_path)["meta"]["global_step"] >= 10


def emptied(data_dir, tmp_path, name):
    """A copy of data_dir whose file `name` keeps its attributes and no rows."""
    import h5py
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    with h5py.File(data_dir / name, "r") as src, h5py.File(out / name, "w") as dst:
        dst.attrs.update(dict(src.attrs))
        for key in src:
            dst.create_dataset(key, data=src[key][:0])
    return out


@pytest.mark.parametrize("name,needle", [
    ("test.h5", "the test split has no rows"),
    ("train-00001-of-00002.h5", "train-00001-of-00002.h5: no training rows for rank 1"),
])
def test_an_empty_split_or_shard_is_refused_naming_the_cause(data, tmp_path, name, needle):
    proc, _ = run(train_cmd(2, emptied(data[2], tmp_path, name), tmp_path / "run", "--epochs", 1), timeout=HANG_S)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_two_jobs_on_one_run_dir_the_second_is_refused_naming_the_first(data, tmp_path):
    first = start(train_cmd(2, data[2], tmp_path, "--epochs", 200, "--eval-every", 0, "--log-every", 1))
    try:
        wait_for(lambda: last_step(tmp_path) >= 5, first)
        second, _ = run(train_cmd(2, data[2], tmp_path, "--epochs", 1, "--resume", "latest"), timeout=HANG_S)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1 and f"--run-dir {tmp_path}: in use by process" in errors[0]
        assert first.poll() is None  # the first job goes on, untouched
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=HANG_S)
    assert first.returncode == EXIT_PREEMPTED


@pytest.mark.parametrize("flags,code,needle", [
    (["--run-dir", "/dev/null/run"], 2, "/dev/null/run: cannot be a folder, /dev/null is a file"),
    (["--optimizer", "sgd", "--lr", "1e6", "--eval-every", 0], EXIT_DIVERGED, "non-finite loss or gradient at global step"),
])
def test_bad_settings_end_a_2_rank_job_with_one_line(data, tmp_path, flags, code, needle):
    proc, _ = run(train_cmd(2, data[2], tmp_path / "run", "--epochs", 2, *flags), timeout=HANG_S)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]


def test_a_2_rank_resume_with_another_batch_size_is_refused(data, tmp_path):
    first, _ = run(train_cmd(2, data[2], tmp_path, "--max-steps", 3, "--eval-every", 0))
    assert first.returncode == 0, first.stderr[-2000:]
    proc, _ = run(train_cmd(2, data[2], tmp_path, "--max-steps", 5, "--eval-every", 0, "--resume", "latest",
                            "--local-batch-size", 4))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1
    assert "trained with --batch-size (global) 16, this run has 8" in errors[0]


def test_a_rank_whose_launcher_proxy_dies_is_killed_even_when_stopped(data, tmp_path):
    job = start(train_cmd(2, data[2], tmp_path, "--epochs", 200, "--eval-every", 0, "--log-every", 1))
    try:
        wait_for(lambda: last_step(tmp_path) >= 5, job)
        pid = rank_pid(str(tmp_path), 1)
        proxy = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        os.kill(pid, signal.SIGSTOP)  # deaf to SIGTERM: only SIGKILL (PR_SET_PDEATHSIG) can end it
        os.kill(proxy, signal.SIGKILL)
        gone = time.perf_counter() + 60  # a rank that outlives the job by a minute is left behind
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" \
                and time.perf_counter() < gone:
            time.sleep(0.1)
        alive = Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate(timeout=HANG_S)
    assert not alive, "the stopped rank outlived its launcher proxy"

"""Two hosts made from Linux network namespaces: MPI over TCP between them, and a cut link.

Each "host" is a network namespace of its own (and a UTS namespace, for its own
hostname), joined to the other by a veth pair on a private test range that this
test makes and removes.  MPICH's hydra starts the second host's ranks through a
stand-in for ssh (`ip netns exec`), and UCX is told to use TCP (it would
otherwise find the shared memory of one kernel).  Skipped, with the reason,
where this is not root, `ip netns` or `unshare` is missing, or mpiexec is not
MPICH's hydra.
"""
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
from helpers import HANG_S, make_synthetic_shards, ranks_of

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import leftovers  # noqa: E402  (launch/leftovers.py: what an aborted MPI job leaves on this host)
TAG = f"ddpt{os.getpid() % 100000}"
HOSTS = {"10.77.0.1": f"{TAG}a", "10.77.0.2": f"{TAG}b"}  # address -> namespace


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        return "needs mpiexec"
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    if "HYDRA" not in version:
        return "needs MPICH's hydra launcher (its -launcher-exec starts the second host's ranks)"
    probe = subprocess.run(["ip", "netns", "add", f"{TAG}p"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", f"{TAG}p"], capture_output=True)
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip()}"
    return None


UNAVAILABLE = _unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two namespaces joined by a veth pair; yields the stand-in for ssh."""
    (a_addr, a), (b_addr, b) = HOSTS.items()
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"{TAG}x", "type", "veth", "peer", "name", f"{TAG}y")
        sh("ip", "link", "set", f"{TAG}x", "netns", a)
        sh("ip", "link", "set", f"{TAG}y", "netns", b)
        for ns, dev, addr in ((a, f"{TAG}x", a_addr), (b, f"{TAG}y", b_addr)):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        ssh = tmp_path_factory.mktemp("two-hosts") / "netns-ssh"
        cases = "\n".join(f"    {addr}) ns={ns} ;;" for addr, ns in HOSTS.items())
        ssh.write_text("#!/usr/bin/env bash\n"
                       "# ssh stand-in: [options] HOST COMMAND... runs COMMAND in HOST's namespaces\n"
                       'while [[ "${1:-}" == -* ]]; do shift; done\n'
                       'host=$1; shift\n'
                       f'case "$host" in\n{cases}\n    *) echo "netns-ssh: unknown host $host" >&2; exit 255 ;;\nesac\n'
                       'exec ip netns exec "$ns" unshare --uts /bin/sh -c "hostname $ns; $*"\n')
        ssh.chmod(0o755)
        yield ssh
    finally:
        for ns in HOSTS.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its end of the veth along


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("two-hosts-data") / "d", 4)


def train_cmd(data_dir, run_dir, flags) -> list:
    return [sys.executable, "-m", "ddp_cnn.train", "--data", str(data_dir), "--run-dir", str(run_dir),
            "--device", "cpu", "--progress", "off", "--model", "lenet", *map(str, flags)]


def two_host_job(ssh, run_dir, data_dir, *flags):
    """4 ranks, 2 on each host, started from the first host; stdout/stderr piped."""
    first = next(iter(HOSTS.values()))
    hosts = ",".join(f"{addr}:2" for addr in HOSTS)
    train = " ".join(train_cmd(data_dir, run_dir, ["--local-batch-size", "8", *flags]))
    cmd = (f"hostname {first}; {shutil.which('mpiexec')} -genv UCX_TLS tcp,self -genv PYTHONPATH {REPO} "
           f"-hosts {hosts} -n 4 -launcher ssh -launcher-exec {ssh} {train}")
    return subprocess.Popen(["ip", "netns", "exec", first, "unshare", "--uts", "/bin/sh", "-c", cmd], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_four_ranks_on_two_hosts_train_as_on_one(hosts, data, tmp_path):
    flags = ["--dtype", "float64", "--max-steps", 20, "--epochs", 1, "--eval-every", 0, "--seed", 3]
    job = two_host_job(hosts, tmp_path / "two", data, *flags)
    out, err = job.communicate(timeout=240)
    assert job.returncode == 0, err[-3000:]
    assert out.count("epoch 1/1") == 1
    one = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "-n", "4", sys.executable, "-m", "ddp_cnn.train",
                          "--data", str(data), "--run-dir", str(tmp_path / "one"), "--device", "cpu", "--progress",
                          "off", "--model", "lenet", "--local-batch-size", "8", *map(str, flags)],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    a = ckpt.load(ckpt.list_checkpoints(tmp_path / "two" / "checkpoints")[-1])
    b = ckpt.load(ckpt.list_checkpoints(tmp_path / "one" / "checkpoints")[-1])
    assert a["meta"]["global_step"] == b["meta"]["global_step"] == 20
    assert np.linalg.norm(a["params"] - b["params"]) / np.linalg.norm(b["params"]) < 1e-12


def wait_for_steps(job, metrics, count, seen):
    """Until the job logged ``count`` steps; ``seen`` gathers the MPI segments and launcher files its
    processes hold (none may outlive it)."""
    deadline = time.time() + 180
    while time.time() < deadline and job.poll() is None:
        seen |= leftovers.held_by(ranks_of(metrics.parent))
        steps = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
        if len([r for r in steps if r["kind"] == "step"]) > count:
            return
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()[1][-3000:]


def orphans_after_cut(run_dir, wait=60):
    """The ranks still alive (on either host) once those cut off have had time to end themselves
    (a deadline, the census, faults.ABORT_GRACE): looked at with the link still down."""
    gone = time.time() + wait
    while ranks_of(run_dir) and time.time() < gone:
        time.sleep(0.5)
    return ranks_of(run_dir)


def test_a_cut_link_ends_the_job_within_the_deadline_and_leaves_no_rank(hosts, data, tmp_path):
    seen = set()
    job = two_host_job(hosts, tmp_path, data, "--epochs", 200, "--eval-every", 0, "--log-every", 1,
                       "--collective-timeout", 5)
    wait_for_steps(job, tmp_path / "metrics.jsonl", 20, seen)
    first = next(iter(HOSTS.values()))
    sh("ip", "netns", "exec", first, "ip", "link", "set", f"{TAG}x", "down")  # the cable is pulled, for good
    try:
        out, err = job.communicate(timeout=HANG_S)  # the 5 s deadline ends it; the line below says so
        left = orphans_after_cut(tmp_path)
        stale = sorted(f for f in seen if os.path.exists(f))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for pid in ranks_of(tmp_path):
            os.kill(pid, signal.SIGKILL)
        sh("ip", "netns", "exec", first, "ip", "link", "set", f"{TAG}x", "up")
    assert job.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # The ranks of the first host agree that those of the second did not arrive (in the step's gradient
    # allreduce, or the allreduce of its logged loss); one line.
    assert len(errors) == 1 and re.fullmatch(r"error: global step \d+: ranks 2, 3 did not reach (the gradient "
                                             r"allreduce|an allreduce of a number) within 5 s \(stalled, dead or "
                                             r"unreachable\)", errors[0]), err[-3000:]
    assert any("mpich_shm" in f for f in seen), "the job's shared memory was never seen"
    assert not left, f"ranks {left} outlived the job on the host that was cut off"
    assert not stale, f"left behind: {stale}"


def test_the_supervisor_goes_on_without_a_host_that_stays_cut_off(hosts, data, tmp_path):
    """4 ranks on two hosts; the second host's link is cut for good; the supervisor finds it unreachable
    and resumes on the first host's 2 ranks, landing where an uninterrupted 4-rank run does (the
    global data order: the batches do not depend on the rank count)."""
    flags = ["--data-order", "global", "--batch-size", 16, "--epochs", 200, "--max-steps", 80,
             "--checkpoint-every", 10, "--log-every", 1, "--eval-every", 0, "--collective-timeout", 5]
    whole = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "-n", "4", *train_cmd(data, tmp_path / "whole", flags)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{addr}:2\n" for addr in HOSTS))
    mpirun = tmp_path / "mpiexec-two-hosts"  # what launch/mpirun.sh runs: hydra with the stand-in for ssh
    mpirun.write_text(f"#!/bin/sh\nexec {shutil.which('mpiexec')} -launcher ssh -launcher-exec {hosts} "
                      f"-genv UCX_TLS tcp,self -genv PYTHONPATH {REPO} \"$@\"\n")
    mpirun.chmod(0o755)
    run_dir = tmp_path / "supervised"
    first = next(iter(HOSTS.values()))

    def cut(on: bool):
        """Nothing passes between the hosts (a blackhole route each way: the interfaces stay up, as
        a host's own do when a switch port dies, so the first host's ranks still reach each other)."""
        (a_addr, a), (b_addr, b) = HOSTS.items()
        for ns, other in ((a, b_addr), (b, a_addr)):
            subprocess.run(["ip", "netns", "exec", ns, "ip", "route", "add" if on else "del", "blackhole",
                            f"{other}/32"], check=on, capture_output=True)
    supervise = " ".join([sys.executable, "-m", "ddp_cnn.supervise", "-n", "4", "--hostfile", str(hostfile),
                          "--min-ranks", "2", "--probe-timeout", "10", "--", *train_cmd(data, run_dir, flags)])
    seen = set()
    job = subprocess.Popen(["ip", "netns", "exec", first, "unshare", "--uts", "/bin/sh", "-c",
                            f"hostname {first}; MPIRUN={mpirun} PYTHONPATH={REPO} {supervise}"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_steps(job, run_dir / "metrics.jsonl", 25, seen)
        cut(True)
        end = time.time() + 600
        while job.poll() is None and time.time() < end:  # the restarted job's files too
            seen |= leftovers.held_by(ranks_of(run_dir))
            time.sleep(0.2)
        out, err = job.communicate(timeout=600)
        left = orphans_after_cut(run_dir)
        stale = sorted(f for f in seen if os.path.exists(f))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for pid in ranks_of(run_dir):
            os.kill(pid, signal.SIGKILL)
        cut(False)
    assert job.returncode == 0, err[-3000:]
    restarts = [line for line in err.splitlines() if line.startswith("supervise: restart")]
    second = list(HOSTS)[1]
    # the cut meets the first host's ranks in the step's gradient allreduce or in the allreduce of its logged loss
    assert len(restarts) == 1 and re.search(rf"ranks 2, 3 on {HOSTS[second]} did not reach (the gradient allreduce|"
                                            r"an allreduce of a number)", restarts[0]) \
        and f"on 2 rank(s), without {second} (unreachable)" in restarts[0], err[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restart = [r for r in records if r["kind"] == "restart"]
    assert len(restart) == 1 and restart[0]["world_size"] == 2 and restart[0]["unreachable"] == [second]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 81))
    a = ckpt.load(ckpt.list_checkpoints(tmp_path / "whole" / "checkpoints")[-1])
    b = ckpt.load(ckpt.list_checkpoints(run_dir / "checkpoints")[-1])
    assert a["meta"]["global_step"] == b["meta"]["global_step"] == 80 and b["meta"]["world_size"] == 2
    # float32, 4 ranks then 2 against 4 throughout: the same batches, summed in another order
    assert np.linalg.norm(a["params"] - b["params"]) / np.linalg.norm(a["params"]) < 1e-6
    assert not left, f"ranks {left} outlived the job on the host that was cut off"
    assert not stale, f"left behind: {stale}"

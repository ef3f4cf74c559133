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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_cnn import checkpoint as ckpt
from helpers import make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
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


def two_host_job(ssh, run_dir, data_dir, *flags):
    """4 ranks, 2 on each host, started from the first host; stdout/stderr piped."""
    first = next(iter(HOSTS.values()))
    hosts = ",".join(f"{addr}:2" for addr in HOSTS)
    train = " ".join([sys.executable, "-m", "ddp_cnn.train", "--data", str(data_dir), "--run-dir", str(run_dir),
                      "--device", "cpu", "--progress", "off", "--model", "lenet", "--local-batch-size", "8",
                      *map(str, flags)])
    cmd = (f"hostname {first}; {shutil.which('mpiexec')} -genv UCX_TLS tcp,self -genv PYTHONPATH {REPO} "
           f"-hosts {hosts} -n 4 -launcher ssh -launcher-exec {ssh} {train}")
    return subprocess.Popen(["ip", "netns", "exec", first, "unshare", "--uts", "/bin/sh", "-c", cmd], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def ranks_of(run_dir) -> list[int]:
    marker = f"--run-dir {run_dir} "
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and "ddp_cnn.train" in cmdline and marker in cmdline + " " \
                and "mpiexec" not in cmdline and "/bin/sh" not in cmdline:
            pids.append(int(entry.name))
    return pids


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


def test_a_cut_link_ends_the_job_within_the_deadline_and_leaves_no_rank(hosts, data, tmp_path):
    job = two_host_job(hosts, tmp_path, data, "--epochs", 200, "--eval-every", 0, "--log-every", 1,
                       "--collective-timeout", 5)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
        if len(steps) > 20:
            break
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()[1][-3000:]
    first = next(iter(HOSTS.values()))
    sh("ip", "netns", "exec", first, "ip", "link", "set", f"{TAG}x", "down")  # the cable is pulled
    t0 = time.time()
    try:
        out, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        sh("ip", "netns", "exec", first, "ip", "link", "set", f"{TAG}x", "up")
    assert job.returncode != 0
    assert time.time() - t0 < 5 + 20, f"the job took {time.time() - t0:.0f} s to end after the cut"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors and all("not complete by its deadline" in e or "not complete after 5 s" in e for e in errors), \
        err[-3000:]
    gone = time.time() + 15
    while ranks_of(tmp_path) and time.time() < gone:  # on either host
        time.sleep(0.2)
    assert not ranks_of(tmp_path), "a rank outlived the job"

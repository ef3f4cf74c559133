"""A real one-node SLURM for the tests: munged, slurmctld and slurmd from Debian's slurm-wlm and munge,
started in a temporary folder on ports of their own, so nothing under /etc/slurm is read or written.

Needs root (slurmd runs jobs as their user) and the packages (.ci/run installs them).  The requeue
delay is shortened through AuthInfo's cred_expire (SLURM's minimum wait before a requeued job
starts again; 120 s by default)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch")
MUNGE_KEY = Path("/etc/munge/munge.key")
NEVER_STARTS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit"}  # pending reasons that stay
REQUEUE_WAIT = 10  # cred_expire: seconds a requeued job waits before it may start again


def why_not() -> str | None:
    """The reason a SLURM cannot be started here, or None."""
    if os.geteuid() != 0:
        return "needs root to start slurmd (and munged as the munge user)"
    missing = [b for b in BINARIES if not os.access(b, os.X_OK)]
    if missing or not MUNGE_KEY.exists():
        return (f"needs slurm-wlm and munge from apt (missing: {', '.join(missing) or MUNGE_KEY}); "
                "apt-get install slurm-wlm munge")
    if not shutil.which("runuser"):
        return "needs runuser (util-linux) to start munged as the munge user"
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class Cluster:
    """The daemons, their folder and the commands' environment (``SLURM_CONF``)."""

    def __init__(self, *extra_config: str):
        self.extra_config = list(extra_config)  # more slurm.conf lines, e.g. "RequeueExit=75"
        self.dir = Path(tempfile.mkdtemp(prefix="ddp_cnn-slurm-"))
        self.dir.chmod(0o755)  # munged runs as the munge user and must reach its socket
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.host = socket.gethostname().split(".")[0]

    # ---- start and stop ----------------------------------------------------
    def start(self) -> "Cluster":
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir()
        shutil.chown(d / "munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={d}/munge/munge.socket",
                        f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                        f"--seed-file={d}/munge/munged.seed", f"--key-file={MUNGE_KEY}"],
                       check=True, timeout=30, capture_output=True)
        wait_until(lambda: (d / "munge" / "munge.socket").exists(), 30, "munged's socket")
        self.conf.write_text(self._config())
        try:
            for daemon in ("slurmctld", "slurmd"):
                subprocess.run([f"/usr/sbin/{daemon}", "-f", str(self.conf)], env=self.env, check=True,
                               timeout=60, capture_output=True)
            wait_until(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 60, "slurmctld answering")
            wait_until(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60,
                       "the node idle")
        except (subprocess.SubprocessError, TimeoutError) as exc:
            said = getattr(exc, "stderr", None) or b""
            said = said.decode(errors="replace") if isinstance(said, bytes) else said
            raise RuntimeError(f"SLURM did not start: {exc}\n{said}{self.log_tails()}") from None
        return self

    def log_tails(self, lines: int = 15) -> str:
        """The end of each daemon's log (the folder goes with stop())."""
        tails = []
        for log in sorted(self.dir.glob("log/*.log")) + [self.dir / "munge" / "munged.log"]:
            if log.exists():
                tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def _config(self) -> str:
        d, ctld, slurmd = self.dir, *free_ports(2)
        cpus = os.cpu_count() or 1
        return "\n".join([
            "ClusterName=ddpcnntest", f"SlurmctldHost={self.host}", f"SlurmctldPort={ctld}", f"SlurmdPort={slurmd}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={d}/munge/munge.socket,cred_expire={REQUEUE_WAIT}",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2",
            "KillWait=30", "MinJobAge=600", *self.extra_config,
            f"NodeName={self.host} CPUs={cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""])

    def pids(self) -> list[int]:
        """Every live process that belongs to this cluster: its daemons, and anything started with its
        SLURM_CONF in the environment (batch scripts, srun, the ranks)."""
        mine = str(self.dir).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mine in (entry / "cmdline").read_bytes() or mine in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    def stop(self) -> dict[int, str]:
        """Cancel every job, shut the daemons down, end munged; the processes still alive after each
        polite way was given its time (then killed), pid: command line, for the caller to report."""
        self.run("scancel", "--user", "root", check=False)
        self.run("scontrol", "shutdown", check=False)
        try:
            wait_until(lambda: not any(self._pid_alive(f) for f in ("slurmctld.pid", "slurmd.pid")), 60,
                       "the SLURM daemons to stop")
        except TimeoutError:
            pass
        munge_pid = self._read_pid(self.dir / "munge" / "munged.pid")
        leftover = {pid: self.describe(pid) for pid in self.pids() if pid != munge_pid}
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if munge_pid:
            try:
                os.kill(munge_pid, signal.SIGTERM)
                wait_until(lambda: not Path(f"/proc/{munge_pid}").exists(), 30, "munged to stop")
            except (ProcessLookupError, TimeoutError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        return leftover

    @staticmethod
    def describe(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return "(gone)"

    def _read_pid(self, path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _pid_alive(self, name: str) -> bool:
        pid = self._read_pid(self.dir / name)
        return bool(pid) and Path(f"/proc/{pid}").exists()

    # ---- commands ------------------------------------------------------------
    def run(self, *cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(map(str, cmd)), env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, cmd))}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict:
        """scontrol's view of a job as KEY: value (JobState, Reason, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = {}
        for word in out.split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_state(self, job_id: str, states, timeout: float) -> dict:
        """Poll until the job is in one of ``states``; TimeoutError naming the state it stayed in,
        at once for a job that SLURM will never start (it would pend forever, silently)."""
        last = {}

        def reached():
            nonlocal last
            last = self.job(job_id)
            if last.get("JobState") == "PENDING" and last.get("Reason") in NEVER_STARTS:
                raise AssertionError(f"job {job_id} can never start here: Reason={last['Reason']}")
            return last if last.get("JobState") in states else None
        try:
            return wait_until(reached, timeout, f"job {job_id} in {states}", poll=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; it is {last.get('JobState')} (Reason={last.get('Reason')})") from None

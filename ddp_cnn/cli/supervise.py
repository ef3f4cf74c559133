"""``python -m ddp_cnn.supervise -n N -- python -m ddp_cnn.train ...``: a run that survives a lost rank.

Starts the training job through launch/mpirun.sh (whatever MPI launcher it
finds), passes its output through, and reads how it ended from its exit code
(:mod:`ddp_cnn.dist.faults`): a rank that died, stalled or lost its link (the job
aborted, a rank was killed, a deadline passed) ends the job, and the job is
started again from the newest valid checkpoint (``--resume auto``); a
usage error, bad data or a divergence would only happen again, and end the
supervision with the job's code.  With ``--hostfile`` every host is probed
before a restart (a one-process launch on it), and the job goes on without
the unreachable ones, on fewer ranks down to ``--min-ranks``.

Each restart is one console line (which rank on which host, why, from which
step) and a ``restart`` record in the run's metrics.jsonl (written by the
restarted job, told through $DDP_CNN_RESTART).  SIGTERM or SIGINT to the
supervisor goes to the job, which checkpoints at the next step and exits 75;
so does the supervisor, without restarting.  If the supervisor itself is
killed, the job gets SIGTERM (Linux).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ddp_cnn.cli.argtypes import non_negative_int, positive_float, positive_int
from ddp_cnn.dist.faults import EXIT_PREEMPTED, NOT_RETRIED
from ddp_cnn.run.rundir import remove_dead_temps

LAUNCH = Path(__file__).resolve().parents[2] / "launch" / "mpirun.sh"
TRAIN_MODULE = "ddp_cnn.train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddp_cnn.supervise",
        usage="python -m ddp_cnn.supervise -n N [options] -- python -m ddp_cnn.train [train flags]",
        description="Run a training job under launch/mpirun.sh and restart it from its newest checkpoint "
                    "(--resume auto) when a rank dies, stalls or loses its link; a usage error, bad data or a "
                    "divergence is not retried. Exit 0 when the run completes, the job's code once the restarts "
                    "are spent, 75 after SIGTERM/SIGINT (the job checkpoints first).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("-n", dest="ranks", type=positive_int, required=True, metavar="N", help="ranks to run")
    p.add_argument("--max-restarts", type=non_negative_int, default=3, metavar="K",
                   help="restarts allowed over the whole run")
    p.add_argument("--hostfile", metavar="FILE",
                   help="the launcher's host file (MPICH: HOST:SLOTS, Open MPI: HOST slots=N, one host a line); "
                        "before a restart each host is probed and the unreachable ones are left out")
    p.add_argument("--min-ranks", type=positive_int, default=1, metavar="M",
                   help="with --hostfile: the fewest ranks a restart may run on when hosts stay unreachable")
    p.add_argument("--probe-timeout", type=positive_float, default=20.0, metavar="S",
                   help="with --hostfile: seconds a host has to run one process before it counts as unreachable")
    p.add_argument("--launcher", default=str(LAUNCH), metavar="SCRIPT",
                   help="the launch script, called as SCRIPT -n N [--hostfile FILE] COMMAND (MPIRUN=... in the "
                        "environment picks its MPI launcher)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- python -m ddp_cnn.train [flags]")
    return p


def say(message: str) -> None:
    print(f"supervise: {message}", file=sys.stderr, flush=True)


# ---- the train command ---------------------------------------------------

def split_command(command: list[str]) -> tuple[list[str], list[str]]:
    """(``python -m ddp_cnn.train``, its flags); ValueError for any other command."""
    for i in range(len(command) - 1):
        if command[i] == "-m" and command[i + 1] == TRAIN_MODULE:
            return command[:i + 2], command[i + 2:]
    raise ValueError(f"the command must run `python -m {TRAIN_MODULE} ...` after --, got {' '.join(command) or 'none'}")


def resumed_flags(flags: list[str]) -> list[str]:
    """The train flags of a restart: ``--resume auto`` (the newest valid checkpoint, or a new run when the
    job died before writing any) instead of any --resume or --overwrite."""
    out, i = [], 0
    while i < len(flags):
        flag = flags[i]
        if flag == "--overwrite" or flag.startswith("--resume="):
            i += 1
        elif flag == "--resume":
            i += 2 if i + 1 < len(flags) and not flags[i + 1].startswith("-") else 1
        else:
            out.append(flag)
            i += 1
    return out + ["--resume", "auto"]


def run_paths(flags: list[str]) -> tuple[Path, Path]:
    """(checkpoint folder, metrics file) the job will use, as the Trainer resolves them."""
    from ddp_cnn.model import modelfile
    from ddp_cnn.cli.train import parse_args
    cfg = parse_args(flags)  # a bad flag: its usage line, exit 2, before anything starts
    name = Path(cfg.model).stem if cfg.model and modelfile.is_model_file(cfg.model) else (cfg.model or "lenet")
    run_dir = Path(cfg.run_dir or f"runs/{name}")
    return (Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else run_dir / "checkpoints",
            Path(cfg.metrics) if cfg.metrics else run_dir / "metrics.jsonl")


# ---- hosts -----------------------------------------------------------------

def read_hostfile(path: str) -> list[tuple[str, int, str]]:
    """(host, slots, the line as written) per host line; ValueError (one line) for a bad file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"--hostfile {path}: {exc.strerror}") from None
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        first, *rest = line.split()
        host, _, slots = first.partition(":")
        for word in rest:
            if word.startswith("slots="):
                slots = word[len("slots="):]
        if (slots and not slots.isdigit()) or slots == "0":
            raise ValueError(f"--hostfile {path}: line {number}: expected HOST:SLOTS or HOST slots=N, got {raw!r}")
        hosts.append((host, int(slots or 1), line))
    if not hosts:
        raise ValueError(f"--hostfile {path}: names no host")
    return hosts


def reachable(launcher: str, host_line: str, timeout: float, folder: str) -> bool:
    """Whether the launcher runs one process on the host of ``host_line`` within ``timeout`` seconds."""
    probe = Path(folder) / "probe-hostfile"
    probe.write_text(host_line + "\n")
    job = subprocess.Popen([launcher, "-n", "1", "--hostfile", str(probe), "true"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return job.wait(timeout) == 0
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        return False


# ---- how a job ended ---------------------------------------------------------

def latest_checkpoint_step(checkpoint_dir: Path) -> tuple[int, str | None]:
    """(global step, file) of the newest checkpoint that verifies; (0, None) when there is none."""
    from ddp_cnn.run import checkpoint as ckpt
    state = ckpt.load_latest(checkpoint_dir, warn=lambda message: None)
    return (state["meta"]["global_step"], Path(state["path"]).name) if state else (0, None)


def processes(metrics: Path) -> list:
    """[(host, pid)] per rank of the newest start or resume record, [] when there is none."""
    found = []
    try:
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") in ("start", "resume") and record.get("processes"):
                found = record["processes"]
    except OSError:
        pass
    return found


def cause(code: int, output: list[str], ranks: list) -> dict:
    """Why the job ended, from the lines it printed: {"reason": ..., "rank": ..., "host": ...}."""
    text = "\n".join(output)
    m = re.search(r"error: (?:global step \d+: )?(ranks? [\d, ]+?) did not reach (.+?) within ([\d.]+) s", text)
    if m:
        who = [int(r) for r in re.findall(r"\d+", m.group(1))]
        hosts = sorted({_host(ranks, r) for r in who} - {None})
        return {"reason": f"{m.group(1)}{' on ' + ', '.join(hosts) if hosts else ''} did not reach {m.group(2)} "
                          f"within {m.group(3)} s (stalled, dead or unreachable)",
                "rank": who[0] if len(who) == 1 else who, "host": hosts[0] if len(hosts) == 1 else hosts or None}
    m = re.search(r"error: (?:global step \d+: )?every rank reached (.+?), which did not complete", text)
    if m:
        return {"reason": f"{m.group(1)} did not complete (a lost or slow network link)"}
    m = re.search(r"\[rank (\d+)\] uncaught exception", text)
    if m:
        rank = int(m.group(1))
        return {"reason": f"rank {rank} raised an exception (its traceback is above)", "rank": rank,
                "host": _host(ranks, rank)}
    m = re.search(r"PID (\d+) RUNNING AT (\S+)\s*=\s*(?:EXIT CODE: (\d+)|KILLED BY SIGNAL: (\d+))", text)  # MPICH
    if m:
        pid, host = int(m.group(1)), m.group(2)
        rank = next((r for r, (h, p) in enumerate(ranks) if p == pid), None)
        how = f"was killed by signal {m.group(4)}" if m.group(4) else f"ended with exit code {m.group(3)}"
        if m.group(3) and int(m.group(3)) == 9:
            how = "was killed (signal 9)"
        who = f"rank {rank}" if rank is not None else f"process {pid}"
        return {"reason": f"{who} on {host} {how}", "rank": rank, "host": host}
    m = re.search(r"process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+)", text)  # Open MPI
    if m:
        return {"reason": f"rank {m.group(1)} on {m.group(2)} was killed by signal {m.group(3)}",
                "rank": int(m.group(1)), "host": m.group(2)}
    return {"reason": f"the job ended with exit code {code}"}


def _host(ranks: list, rank: int):
    return ranks[rank][0] if rank < len(ranks) else None


# ---- the supervisor ----------------------------------------------------------

class Supervisor:
    def __init__(self, args, head: list[str], flags: list[str], checkpoint_dir: Path, metrics: Path, folder: str):
        self.args, self.head, self.flags = args, head, flags
        self.checkpoint_dir, self.metrics, self.folder = checkpoint_dir, metrics, folder
        self.hosts = read_hostfile(args.hostfile) if args.hostfile else None
        self.job: subprocess.Popen | None = None
        self.stop_signal = 0

    def on_signal(self, signum, frame):
        self.stop_signal = signum
        if self.job is not None and self.job.poll() is None:
            try:
                os.kill(self.job.pid, signum)  # launch/mpirun.sh hands it to the ranks: checkpoint, exit 75
            except ProcessLookupError:
                pass

    def run(self) -> int:
        ranks, hostfile, restarts, env = self.args.ranks, self.args.hostfile, 0, None
        flags = self.flags
        while True:
            code, output = self.launch(ranks, hostfile, flags, env)
            remove_dead_temps(self.checkpoint_dir)  # a checkpoint a killed rank 0 left half written
            if self.stop_signal:  # told to stop: the job checkpointed and exited 75 (or ended otherwise)
                return code
            if code in NOT_RETRIED:
                if code != 0:
                    say(f"the job ended with exit code {code} ({NOT_RETRIED[code]}): not restarted")
                return code
            why = cause(code, output, processes(self.metrics))
            if restarts >= self.args.max_restarts:
                say(f"{why['reason']}; no restart left ({restarts} of --max-restarts {self.args.max_restarts} "
                    f"used): exit {code}")
                return code
            time.sleep(1.0)  # the launcher's last processes go first
            left_out = []
            if self.hosts:
                ranks, hostfile, left_out = self.reachable_hosts()
                if ranks < self.args.min_ranks:
                    say(f"{why['reason']}; hosts {', '.join(left_out)} unreachable, {ranks} slot(s) left, fewer "
                        f"than --min-ranks {self.args.min_ranks}: exit {code}")
                    return code
            if self.stop_signal:
                return EXIT_PREEMPTED
            restarts += 1
            step, name = latest_checkpoint_step(self.checkpoint_dir)
            origin = f"step {step} ({name})" if name else "the start (no checkpoint yet)"
            say(f"restart {restarts}/{self.args.max_restarts}: {why['reason']}; resuming from {origin} on "
                f"{ranks} rank(s)" + (f", without {', '.join(left_out)} (unreachable)" if left_out else ""))
            record = {"restart": restarts, **why, "exit_code": code, "from_step": step, "world_size": ranks,
                      "unreachable": left_out}
            env = {**os.environ, "DDP_CNN_RESTART": json.dumps(record)}
            flags = resumed_flags(self.flags)

    def launch(self, ranks: int, hostfile: str | None, flags: list[str], env) -> tuple[int, list[str]]:
        """Run the job to its end, its output passed through; (exit code, its last lines)."""
        cmd = [self.args.launcher, "-n", str(ranks), *(["--hostfile", hostfile] if hostfile else []),
               *self.head, *flags]
        tail: collections.deque = collections.deque(maxlen=400)
        self.job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                    errors="replace", start_new_session=True, preexec_fn=_term_when_parent_dies)
        pumps = [threading.Thread(target=_pump, args=(pipe, out, tail), daemon=True)
                 for pipe, out in ((self.job.stdout, sys.stdout), (self.job.stderr, sys.stderr))]
        for pump in pumps:
            pump.start()
        if self.stop_signal:  # a signal that came while the job was being started
            self.on_signal(self.stop_signal, None)
        code = self.job.wait()
        for pump in pumps:
            pump.join()
        self.job = None
        return (128 - code if code < 0 else code), list(tail)

    def reachable_hosts(self) -> tuple[int, str, list[str]]:
        """(ranks, host file of the reachable hosts, hosts left out)."""
        up, down = [], []
        for host, slots, line in self.hosts:
            (up if reachable(self.args.launcher, line, self.args.probe_timeout, self.folder) else down).append(
                (host, slots, line))
        path = Path(self.folder) / "hostfile"
        path.write_text("".join(line + "\n" for _, _, line in up))
        return min(self.args.ranks, sum(slots for _, slots, _ in up)), str(path), [host for host, _, _ in down]


def _pump(pipe, out, tail) -> None:
    for line in iter(pipe.readline, ""):
        out.write(line)
        out.flush()
        tail.append(line.rstrip("\n"))
    pipe.close()


def _term_when_parent_dies() -> None:
    """In the job's launcher, before exec: SIGTERM (a clean checkpoint) when the supervisor dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        head, flags = split_command(command)
        if args.min_ranks > args.ranks:
            raise ValueError(f"--min-ranks {args.min_ranks}: more than the {args.ranks} ranks of -n")
        if not args.hostfile and args.min_ranks != 1:
            raise ValueError("--min-ranks: only with --hostfile (one host cannot lose part of itself)")
        if not Path(args.launcher).is_file():
            raise ValueError(f"--launcher {args.launcher}: no such file")
        if args.hostfile:
            read_hostfile(args.hostfile)
    except ValueError as exc:
        parser.error(str(exc))
    checkpoint_dir, metrics = run_paths(flags)
    with tempfile.TemporaryDirectory(prefix="ddp_cnn-supervise-") as folder:
        supervisor = Supervisor(args, head, flags, checkpoint_dir, metrics, folder)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, supervisor.on_signal)
        return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())

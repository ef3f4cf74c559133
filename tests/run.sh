#!/usr/bin/env bash
# The whole test suite: plain pytest, then the multi-rank tests under 2, 3 and 4 ranks.
# Every stage runs even when an earlier one failed (so one red test does not hide the others); the exit status
# is non-zero when any stage failed. Each mpirun run is bounded by a timeout, so a hang fails the suite instead
# of stalling it.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=()
python -m pytest -q "$@" || failed+=("pytest")
for ranks in 2 3 4; do
    echo "== $ranks ranks: the multi-rank tests (pytest-mpi) =="
    timeout 900 launch/mpirun.sh -n "$ranks" python -m pytest --only-mpi -q -p no:cacheprovider "$@" \
        || failed+=("$ranks ranks")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED stages: ${failed[*]}" >&2
    exit 1
fi
echo "all stages passed"

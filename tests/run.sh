#!/usr/bin/env bash
# The whole test suite: plain pytest, then the multi-rank tests under 2, 3 and 4 ranks.
# Each mpirun run is bounded by a timeout, so a hang fails the suite instead of stalling it.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pytest -q "$@"
for ranks in 2 3 4; do
    echo "== $ranks ranks: the multi-rank tests (pytest-mpi) =="
    timeout 900 launch/mpirun.sh -n "$ranks" python -m pytest --only-mpi -q -p no:cacheprovider "$@"
done

#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no package registry; its python3 is 3.12 on x86-64):
# MPICH's mpiexec and library from PyPI, and pytest-mpi.  Run here, in the repo root; then carry .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl mpich pytest-mpi
ls -la .whl

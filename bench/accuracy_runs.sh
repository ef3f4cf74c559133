#!/usr/bin/env bash
# The recipe runs behind docs/RESULTS.md, all at once on one GPU (each run is
# launch-bound for part of its step, so they overlap well; five at once took
# about 7 minutes on the H100):  bench/accuracy_runs.sh DATA_DIR OUT_DIR
set -uo pipefail
data=${1:?data dir}; out=${2:?out dir}
py=$(command -v python3 || command -v python)
train() { name=$1; shift; "$@" --data "$data" --run-dir "$out/$name" --progress off --keep 1 > "$out/$name.log" 2>&1; echo "$name rc=$?" >> "$out/status"; }
mkdir -p "$out"
train fmnist-cnn    $py -m ddp_cnn.train --config recipes/fmnist-cnn.toml --device gpu &
train fmnist-cnn-bn $py -m ddp_cnn.train --config recipes/fmnist-cnn-bn.toml --device gpu &
for seed in 0 1 2; do
    train fmnist-vgg-seed$seed $py -m ddp_cnn.train --config recipes/fmnist-vgg.toml --device gpu --seed $seed &
done
train mlp           $py -m ddp_cnn.train --config recipes/mlp.toml --device gpu &
wait
# The same global batch over 4 ranks sharing the GPU, once the GPU is free again.
train fmnist-vgg-4ranks launch/mpirun.sh -n 4 $py -m ddp_cnn.train --config recipes/fmnist-vgg.toml --device gpu

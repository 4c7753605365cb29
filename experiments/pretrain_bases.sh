#!/usr/bin/env bash
# Pretrain the three shipped bases (tiny, small, small-bias) from scratch on the synthetic world,
# then write their checkpoints under peftlab/assets/ and their curves and probe results under
# experiments/results/. On an H200 this takes a few minutes; on a 2-core CPU, hours.
#   bash experiments/pretrain_bases.sh [extra key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
for name in tiny small small_bias; do
  python -m peftlab pretrain "experiments/configs/pretrain_${name}.yaml" progress=false "$@"
done

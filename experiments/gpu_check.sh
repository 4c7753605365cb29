#!/usr/bin/env bash
# One GPU session's worth of checks and benchmarks, in the order that matters most:
#   1. bench_quant, bench_kernels, bench_optim (each checks correctness at real shapes first,
#      then prints a table and writes CSV/PNG under experiments/results/);
#   2. the kernel test files on CUDA (bit-exactness, fused matmul accuracy, paged AdamW
#      trajectories, Linear4bit/QLoRA on CUDA), as parallel pytest processes (par_pytest.sh);
#   3. a QLoRA GPU smoke run; diagnostics only when named in ONLY: probe (gemv_probe.py),
#      gemv_vs_dot, adamw_probe, quant_probe (launch paths, quantize kernels, dequantize traffic
#      ceilings, quantize host cost), overlap (linear4bit_overlap_probe.py: chunked dequantize
#      hidden behind cuBLAS at M = 4096, issue 6), mma (mma_probe.py: the small-M mma.sync kernel's
#      correctness and speed against bf16 and the tl.dot kernel).
# Usage on the GPU machine: bash experiments/gpu_check.sh [results_dir]
# Each step has its own time limit, so one slow step cannot starve the others; every step's
# output goes to results_dir/gpu_check_<step>.log.
set -u
cd "$(dirname "$0")/.."
RES=${1:-experiments/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'EOF' | tee "$RES/gpu_check_env.log"
import datetime, torch, triton
try:
    import bitsandbytes as bnb; v = bnb.__version__
except Exception as e:  # noqa
    v = f"not importable ({type(e).__name__})"
print(f"date {datetime.date.today()}  gpu {torch.cuda.get_device_name()}  torch {torch.__version__}  "
      f"triton {triton.__version__}  bitsandbytes {v}")
EOF
step() {  # name, seconds, command...   (ONLY="a b" runs just those steps)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$RES/gpu_check_$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$RES/gpu_check_$name.log"
  echo "=== $name exit $rc"
}
TAIL=40 step bench_quant "${QUANT_LIMIT:-170}" python3 experiments/bench_quant.py --out "$RES"
TAIL=60 step bench_kernels "${KERNELS_LIMIT:-260}" python3 experiments/bench_kernels.py --out "$RES"
TAIL=40 step bench_optim "${OPTIM_LIMIT:-150}" python3 experiments/bench_optim.py --out "$RES"
# TESTS / TESTS_LIMIT choose the test files and their time limit; the files run as parallel
# pytest processes (Triton compiles every variant, CPU-bound), see par_pytest.sh
TAIL=80 step tests "${TESTS_LIMIT:-240}" bash experiments/par_pytest.sh "$RES" ${TESTS:-tests/test_quant_kernels.py \
  tests/test_launch.py tests/test_matmul4bit.py tests/test_matmul4bit_mma.py tests/test_decode4bit.py \
  tests/test_linear4bit.py \
  tests/test_paged_adamw.py}
# the probe and the small-M A/B are diagnostics: only when named in ONLY
[[ " ${ONLY:-} " == *" probe "* ]] && TAIL=30 step probe 90 python3 experiments/gemv_probe.py --out "$RES/probe"
[[ " ${ONLY:-} " == *" gemv_vs_dot "* ]] && TAIL=20 step gemv_vs_dot 150 python3 experiments/gemv_vs_dot.py
[[ " ${ONLY:-} " == *" adamw_probe "* ]] && TAIL=20 step adamw_probe 90 python3 experiments/adamw_probe.py
[[ " ${ONLY:-} " == *" quant_probe "* ]] && TAIL=60 step quant_probe 200 python3 experiments/quant_probe.py
[[ " ${ONLY:-} " == *" mma "* ]] && TAIL=60 step mma 300 python3 experiments/mma_probe.py
[[ " ${ONLY:-} " == *" overlap "* ]] && TAIL=30 step overlap 150 python3 experiments/linear4bit_overlap_probe.py
TAIL=12 step qlora_gpu 90 python3 -m peftlab train experiments/configs/qlora_gpu_smoke.yaml \
  output_dir=/tmp/qlora_gpu progress=false

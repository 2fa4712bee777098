#!/usr/bin/env bash
# Every GPU check of issues 8 (cuda_ext kernels) and 5 (QDEC) in ONE device call; results in $OUT.
#
#   bash bench/gpu_session.sh             # on the lent GPU machine (the `run` tool; see cuda_ext/README.md,
#                                         # "Running the GPU checks on a lent machine")
#   bash bench/gpu_session.sh --dry-run   # here, on CPU: the same steps under TRITON_INTERPRET=1 on tiny
#                                         # sizes (catches typos; measures nothing). Also FBSERVE_GPU_DRYRUN=1.
#
# Steps, each under `timeout`, clipped to what is left of GPU_SESSION_BUDGET_S (default 540 s wall);
# GPU_SESSION_SKIP="tests engine" skips steps by name prefix (a rerun of what failed):
#   env      bench/gpu_env.py: nvidia-smi, torch/triton/ptxas versions, missing packages
#   qdec     bench/qdec.py (zero-copy gather table; slowdown vs k_chunk graphed and eager; extra GPU memory)
#   tests    pytest, compiled (TRITON_INTERPRET=0): tests/test_gpu_kernels.py, test_gpu_qdec.py, test_gpu_engine.py and the
#            kernel tests that also run on CUDA (test_cuda_ext_kernels, test_qdec_kernel, test_quant_linear, test_fused_ops);
#            pytest-xdist spreads the Triton compiles over the CPUs when it is installed
#   kernels  bench/kernels.py, 21 variants at m = $KERNELS_M (default "1"; "1 4 16" for all), Llama-2-7B
#   engine   bench/gpu_engine.py (random-weights SmolLM2-shaped model through QuantLinear + Engine)
#   profile  bench/kernels.py --profile: device time per kernel, one Llama-2-7B layer per shape, r0 vs r64
#   kernels  then Llama-3-8B
#   summary  bench/gpu_summary.py -> summary.md (markdown for bench/RESULTS.md)
# (`python -m cuda_ext.autotune --decode-m 1 [--write]`: gemv tiles, half2 and the fused branch timed in a
# CUDA graph with rank-64 branches; run it by hand if budget remains.)
# $OUT holds at most 8 files: env.json tests.log errors.jsonl kernels.json qdec.json engine.json
# session.log summary.md.  Never `set -e`: a failed step is recorded and the next one runs.
set -u
cd "$(dirname "$0")/.." || exit 1

DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done
[[ "${FBSERVE_GPU_DRYRUN:-0}" == 1 ]] && DRY=1

if [[ -z "${PYTHON:-}" ]]; then
  if [[ $DRY == 1 && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${OUT:-}" ]]; then
  OUT=$([[ $DRY == 1 ]] && echo /tmp/fbserve-gpu-dryrun || echo /tmp/fbserve-gpu-out)
fi
mkdir -p "$OUT" || exit 1
# a dry run into the default folder starts clean (the tool empties $OUT on the device)
[[ $DRY == 1 && $OUT == /tmp/fbserve-gpu-dryrun ]] && rm -f "$OUT"/*
WORK=$(mktemp -d /tmp/fbserve-gpu.XXXXXX)
STEPS=$WORK/steps.tsv
: >"$STEPS"
BUDGET=${GPU_SESSION_BUDGET_S:-540}  # whole-script wall seconds (15 min of device time: start + this + 1 min)
RESERVE=25  # kept for the summary

export PYTHONUNBUFFERED=1
export FBSERVE_HOME=$WORK/home  # nothing reads ../shared or ~/.cache here
export FBSERVE_GPU_RECORD=$OUT/errors.jsonl
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
unset FBSERVE_KERNEL_PATH FBSERVE_KERNEL_FALLBACK
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1 FBSERVE_GPU_DRYRUN=1 CUDA_VISIBLE_DEVICES=""
else
  export TRITON_INTERPRET=0  # compiled kernels; conftest/test modules only default it to 1 without a GPU
  unset FBSERVE_GPU_DRYRUN
fi

step() {  # step NAME LIMIT_S CMD...: run CMD under timeout, clipped to the budget left; record rc and time
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS - RESERVE)) s
  for s in ${GPU_SESSION_SKIP:-}; do
    if [[ $name == "$s"* ]]; then
      echo "=== [$name] SKIPPED: GPU_SESSION_SKIP"
      printf '%s\tskipped\t0\t0\n' "$name" >>"$STEPS"
      return 0
    fi
  done
  if ((left < 15)); then
    echo "=== [$name] SKIPPED: session budget (${BUDGET}s) spent"
    printf '%s\tskipped\t0\t0\n' "$name" >>"$STEPS"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
  local t0=$SECONDS rc
  if command -v timeout >/dev/null; then timeout -k 10 "$limit" "$@"; else "$@"; fi
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$STEPS"
  echo "=== [$name] rc=$rc in $((SECONDS - t0))s"
  return 0
}

run_tests() {  # pytest into $OUT/tests.log (its tail also goes to the session log)
  local args=(-q -rfEs --tb=short -p no:cacheprovider)
  # pytest is on the device image (KINDS.md); if not, carried wheels in .whl/ (installed by main)
  "$PYTHON" -c "import pytest" 2>/dev/null || { echo "pytest missing and no .whl/ wheels: GPU tests NOT run" |
    tee "$OUT/tests.log"; return 3; }
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 150)
  local gpu=(tests/test_gpu_kernels.py tests/test_gpu_qdec.py tests/test_gpu_engine.py)
  local old=(tests/test_cuda_ext_kernels.py tests/test_qdec_kernel.py tests/test_quant_linear.py tests/test_fused_ops.py)
  local rc=0
  if [[ $DRY == 1 ]]; then
    "$PYTHON" -m pytest "${args[@]}" "${gpu[@]}" >"$OUT/tests.log" 2>&1 || rc=$?
  elif "$PYTHON" -c "import xdist" 2>/dev/null; then  # Triton compiles (~1 s each, hundreds) in parallel
    "$PYTHON" -m pytest "${args[@]}" -n "${GPU_TEST_WORKERS:-12}" "${gpu[@]}" "${old[@]}" >"$OUT/tests.log" 2>&1 || rc=$?
  else  # no pytest-xdist: 4 pytest processes over fixed shards, logs concatenated
    "$PYTHON" -m pytest "${args[@]}" "${gpu[0]}" -k "decode_grid and fp16" >"$WORK/t1.log" 2>&1 &
    "$PYTHON" -m pytest "${args[@]}" "${gpu[0]}" -k "decode_grid and bf16" >"$WORK/t2.log" 2>&1 &
    "$PYTHON" -m pytest "${args[@]}" "${gpu[0]}" -k "not decode_grid" "${gpu[1]}" "${gpu[2]}" >"$WORK/t3.log" 2>&1 &
    "$PYTHON" -m pytest "${args[@]}" "${old[@]}" >"$WORK/t4.log" 2>&1 &
    local j
    for j in 1 2 3 4; do wait -n || rc=1; done
    for j in 1 2 3 4; do echo "##### shard $j"; cat "$WORK/t$j.log"; done >"$OUT/tests.log"
  fi
  tail -n 40 "$OUT/tests.log"
  return $rc
}

kernels() {  # all rows of bench/kernels.py for one model (JSON per model, merged by the summary)
  if [[ $DRY == 1 ]]; then  # exits 0 without CUDA; checks the flags parse
    step "kernels-$1" 60 "$PYTHON" bench/kernels.py --model "$1" --m 1 --reps 2 --json "$WORK/kernels-$1.json"
  else
    step "kernels-$1" 200 "$PYTHON" bench/kernels.py --model "$1" --m ${KERNELS_M:-1} --reps 20 --json "$WORK/kernels-$1.json"
  fi
}

main() {
  echo "# fbserve GPU session $(date -u +%FT%TZ) dry_run=$DRY python=$PYTHON OUT=$OUT budget=${BUDGET}s"
  echo "# git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --short 2>/dev/null | wc -l) changed files"
  if [[ $DRY == 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "# WARNING: torch sees no CUDA device: the compiled-kernel steps will fail (use --dry-run on a CPU machine)"
  fi
  # packages the device image lacks (pydantic: engine.qdec_tuning, quant.qdec) travel as wheels in .whl/
  # (cuda_ext/README.md, "Running the GPU checks on a lent machine"; `carry: [".whl"]`)
  if [[ $DRY == 0 ]] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl &&
      export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" && echo "# installed from .whl/: $(ls .whl | tr '\n' ' ')"
  fi
  step env 60 "$PYTHON" bench/gpu_env.py --json "$OUT/env.json"
  export -f run_tests
  export PYTHON OUT WORK DRY
  # QDEC and the tests first, then the kernels' m = 1 rows (m = 4 and 16 run the tensor-core kernel,
  # unchanged since the first lease: KERNELS_M="1 4 16" adds them); Triton compiles of the benchmark's
  # kernel variants take most of its step. bench/qdec.py exits 2 without CUDA (expected in the dry run)
  local kjson=("$WORK/kernels-Llama-2-7B.json" "$WORK/kernels-Llama-3-8B.json")
  step qdec 150 "$PYTHON" bench/qdec.py --model llama2-7b --bits 3 --json "$OUT/qdec.json"
  step tests 180 bash -c run_tests
  kernels Llama-2-7B
  # the engine smoke under the CPU interpreter (dry run) needs ~140 s on 2 cores; on a GPU it has 120 s
  step engine "$([[ $DRY == 1 ]] && echo 240 || echo 120)" "$PYTHON" bench/gpu_engine.py --json "$OUT/engine.json"
  # device time per kernel of one layer per shape, rank 0 vs 64 (the table goes to session.log)
  step profile 60 "$PYTHON" bench/kernels.py --profile --model Llama-2-7B --json "$WORK/profile.json"
  kernels Llama-3-8B
  RESERVE=0 step summary 30 "$PYTHON" bench/gpu_summary.py --out "$OUT" --steps "$STEPS" --kernels "${kjson[@]}" \
    --title "GPU session $(date -u +%F) ($([[ $DRY == 1 ]] && echo 'DRY RUN, CPU interpreter' || echo device))"
  echo "# steps (name rc seconds limit):"
  cat "$STEPS"
  echo "# files in $OUT:"
  ls -la "$OUT"
  echo "# total ${SECONDS}s"
}

main 2>&1 | tee "$OUT/session.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"

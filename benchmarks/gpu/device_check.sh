#!/usr/bin/env bash
# One GPU check of lenserve, for a CUDA machine with no network (issue 22), in at most ~8 minutes:
#   build    the extension for this GPU's architecture only, against the torch already installed
#            (pip install --no-deps --no-build-isolation -e .)
#   smoke    every op once, a device sync after each (an illegal address is pinned to one op)
#   tests    the `gpu` tests (tests/csrc/test_cuda_kernels.py, tests/engine/test_cuda_engine.py)
#            (-rfE: failing names in the log; with pytest-xdist, -n 4: a crash kills one worker only)
#   check    end to end on random weights: SmolLM2 (9/3 heads, hd 64) and Llama-3-8B-like (32/8,
#            hd 128) shapes: CUDA bf16 vs CPU fp32 logits, kernels vs torch backend, CUDA graphs
#            vs eager, chunked prefill
#   kernels  varlen attention: ours vs FA2 varlen (aten._flash_attention_forward) vs padded SDPA vs
#            naive padded MHA on the Azure conversation mix and a uniform 1-2048 mix
#   e2e      offline decode at batch 1/32/256 (prompt 256, 128 new) beside HF `generate`
#   memcheck, racecheck   compute-sanitizer on the smoke stage, run beside tests and check
# then a one-screen summary. Every result is JSON under $OUT (device, date, torch and CUDA
# versions inside); each stage's log is $OUT/logs/STAGE.log; stage verdicts in $OUT/stages.tsv.
#
# usage: benchmarks/gpu/device_check.sh [--out DIR] [--budget-s S] [--only a,b] [--skip-build] [--dry-run]
#   --out DIR     results directory (default: $OUT, else ./device_check_out)
#   --budget-s S  total wall-clock budget (default 470); each stage's timeout is its cap or what
#                 remains, and a stage left with under 15 s is skipped (and says so)
#   --only LIST   run only these stages (comma-separated names from the list above)
#   --skip-build  use the extension already built
#   --dry-run     check the tools and print the plan; run nothing
# LENSERVE_WHEELS=DIR: a directory of wheels (pytest, pluggy, iniconfig, packaging) installed
# offline when pytest is missing.
set -uo pipefail
cd "$(dirname "$0")/../.."

STAGES=(build smoke tests check kernels e2e memcheck racecheck)
declare -A CAP=([build]=240 [smoke]=40 [tests]=150 [check]=60 [kernels]=60 [e2e]=90 [memcheck]=60 [racecheck]=60)
MIN_STAGE_S=15

out_dir=${OUT:-$PWD/device_check_out}
budget=470
only=""
skip_build=0
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out_dir=$2; shift 2 ;;
    --budget-s) budget=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --skip-build) skip_build=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "device_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$budget" in ''|*[!0-9]*) echo "device_check: --budget-s takes whole seconds, got '$budget'" >&2; exit 2 ;; esac
if [ -n "$only" ]; then
  for s in ${only//,/ }; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "device_check: unknown stage '$s' (stages: ${STAGES[*]})" >&2; exit 2; }
  done
fi

PY=${PYTHON:-$(command -v python || command -v python3)}
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}

wanted() {  # stage name -> 0 when it is to run
  [ "$1" = build ] && [ $skip_build = 1 ] && return 1
  [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]
}

xdist_args() {  # with pytest-xdist: 4 workers, so a test that crashes (segfault) takes down only its
  # worker (reported as failed) and the rest, tests/engine/test_cuda_engine.py among them, still run
  "$PY" -c 'import xdist' 2>/dev/null && echo "-n 4 "
}

stage_cmd() {  # the command of a stage
  case "$1" in
    build) echo "TORCH_CUDA_ARCH_LIST=\$ARCH LENSERVE_CUDA=1 MAX_JOBS=\$(nproc) $PY -m pip install --no-deps --no-build-isolation --no-index -e ." ;;
    smoke) echo "$PY -m benchmarks.gpu.smoke --out $out_dir" ;;
    tests) echo "$PY -m pytest -q -rfE $(xdist_args)-m gpu tests/csrc/test_cuda_kernels.py tests/engine/test_cuda_engine.py --junitxml=$out_dir/gpu_tests.xml -p no:cacheprovider" ;;
    check) echo "$PY -m benchmarks.gpu.e2e check --out $out_dir" ;;
    kernels) echo "$PY -m benchmarks.gpu.kernels --out $out_dir" ;;
    e2e) echo "$PY -m benchmarks.gpu.e2e throughput --out $out_dir" ;;
    memcheck) echo "$SAN --tool memcheck --error-exitcode 1 $PY -m benchmarks.gpu.smoke --out $out_dir --tag memcheck" ;;
    racecheck) echo "$SAN --tool racecheck --error-exitcode 1 $PY -m benchmarks.gpu.smoke --out $out_dir --tag racecheck" ;;
  esac
}

if [ $dry_run = 1 ]; then
  echo "device_check: dry run; results would go to $out_dir; budget ${budget}s"
  echo "  python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo missing))"
  echo "  torch:  $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo missing)"
  echo "  nvcc:   $(command -v nvcc || echo missing)   compute-sanitizer: $([ -x "$SAN" ] && echo "$SAN" || echo missing)"
  echo "  pytest: $("$PY" -c 'import pytest; print(pytest.__version__)' 2>/dev/null || echo "missing (set LENSERVE_WHEELS)")"
  for s in "${STAGES[@]}"; do
    if wanted "$s"; then echo "  stage $s (cap ${CAP[$s]}s): $(stage_cmd "$s")"; else echo "  stage $s: not selected"; fi
  done
  exit 0
fi

mkdir -p "$out_dir/logs"
: > "$out_dir/stages.tsv"
start=$(date +%s)
failed=0

record() {  # stage status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$out_dir/stages.tsv"
  echo "device_check: $1 $2 (${3}s) $4"
}

run_stage() {  # stage
  local s=$1 left cap t0 rc status note=""
  left=$(( budget - ($(date +%s) - start) ))
  cap=${CAP[$s]}
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt $MIN_STAGE_S ]; then
    record "$s" skipped 0 "budget spent (${left}s left)"
    return
  fi
  t0=$(date +%s)
  echo "device_check: == $s (timeout ${cap}s)"
  case "$s" in
    build)
      ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || { record build failed 0 "no CUDA device visible to torch"; failed=1; return; }
      export ARCH
      note="arch $ARCH"
      TORCH_CUDA_ARCH_LIST=$ARCH LENSERVE_CUDA=1 MAX_JOBS=$(nproc) timeout --kill-after=10 "$cap" \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . > "$out_dir/logs/build.log" 2>&1
      rc=$?
      [ $rc = 0 ] && ! "$PY" -c 'import torch, lenserve._C as c; assert c.with_cuda' >> "$out_dir/logs/build.log" 2>&1 && { rc=1; note="$note; built without CUDA"; }
      ;;
    tests)
      if ! "$PY" -c 'import pytest' 2>/dev/null && [ -n "${LENSERVE_WHEELS:-}" ]; then
        "$PY" -m pip install --no-index --find-links "$LENSERVE_WHEELS" pytest > "$out_dir/logs/pytest_install.log" 2>&1
      fi
      if ! "$PY" -c 'import pytest' 2>/dev/null; then
        record tests skipped 0 "pytest is not installed (set LENSERVE_WHEELS to a directory of its wheels)"
        failed=1
        return
      fi
      timeout --kill-after=10 "$cap" bash -c "exec $(stage_cmd tests)" > "$out_dir/logs/tests.log" 2>&1
      rc=$?
      note=$(tail -1 "$out_dir/logs/tests.log")
      ;;
    memcheck|racecheck)
      if [ ! -x "$SAN" ]; then record "$s" skipped 0 "compute-sanitizer not found"; return; fi
      timeout --kill-after=10 "$cap" bash -c "exec $(stage_cmd "$s")" > "$out_dir/logs/$s.log" 2>&1
      rc=$?
      note=$(grep -o -E 'ERROR SUMMARY: [0-9]* errors?|RACECHECK SUMMARY: .*' "$out_dir/logs/$s.log" | tail -1)
      ;;
    *)
      timeout --kill-after=10 "$cap" bash -c "exec $(stage_cmd "$s")" > "$out_dir/logs/$s.log" 2>&1
      rc=$?
      ;;
  esac
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  [ $rc = 0 ] || failed=1
  record "$s" "$status" $(( $(date +%s) - t0 )) "$note"
  if [ "$s" = build ] && [ $rc != 0 ]; then
    tail -30 "$out_dir/logs/build.log"
  fi
}

run_if() { wanted "$1" && run_stage "$1"; }
run_if build
run_if smoke
# The sanitizers time nothing: they run beside the correctness stages (tests, check) and are
# waited for before the timed stages (kernels, e2e) start, so no timing shares the GPU.
bg=()
for s in memcheck racecheck; do
  if wanted "$s"; then run_stage "$s" & bg+=($!); fi
done
run_if tests
run_if check
[ ${#bg[@]} -gt 0 ] && wait "${bg[@]}"
run_if kernels
run_if e2e
# background stages record into stages.tsv from subshells: the verdict is read from there
grep -qE $'\t(failed|timeout)\t' "$out_dir/stages.tsv" && failed=1

"$PY" -m benchmarks.gpu.summary "$out_dir" | tee "$out_dir/summary.txt"
echo "device_check: done in $(( $(date +%s) - start ))s; results in $out_dir"
exit $failed

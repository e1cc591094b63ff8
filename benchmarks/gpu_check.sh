#!/usr/bin/env bash
# The GPU check of issue 19, prepared to run once on a fresh GPU machine within GPU_CHECK_BUDGET_S (480 s):
#   1. setup: a Python with a CUDA torch and infinity's needs (below); fails fast, saying what is missing
#   2. tests/gpu: collect, then the manager/pinned-buffer tests, then training equality and the param cache
#   3. benchmarks/gpu_bench.py: a 1.14e9-parameter GPT resident on the GPU, then on NVMe, then compared
# Every phase runs under `timeout`, cut shorter when the budget runs low, so a hang costs only its phase.
# Without CUDA the CUDA phases are skipped (saying why) and the tiny GPT runs on the CPU instead: exit 0.
#
# Writes under $OUT (default bench-out/gpu), at most 8 files, each rewritten as the run goes:
#   check.json (every phase: status, rc, seconds, limit, reason), log.txt (all output), resident.json,
#   nvme.json, summary.json (benchmarks/gpu_bench.py's), or smoke-*.json on CPU.
# Environment: OUT; GPU_CHECK_BUDGET_S (480); NVME_DIR (swap folder, default $TMPDIR or /tmp, + /infinity-gpu-check);
#   GPU_BENCH_SIZE (1b); GPU_BENCH_STEPS (3); TORCH_SPEC (for scripts/setup when no CUDA torch is found).
# Which Python: .venv/bin/python when its torch sees CUDA; else python3 when its torch does (a GPU image:
# infinity is then used from the source tree, and wheels under .whl/ are installed to /tmp/infinity-site
# first, e.g. crc32c); else scripts/setup with TORCH_SPEC (needs a package index).  docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
LOG=$OUT/log.txt
STATE=${STATE:-$(mktemp -d)}  # the phases so far and the chosen Python, outside $OUT (whose files are counted)
export STATE
PHASES=$STATE/phases
BUDGET=${GPU_CHECK_BUDGET_S:-480}
NVME_DIR=${NVME_DIR:-${TMPDIR:-/tmp}/infinity-gpu-check}
SIZE=${GPU_BENCH_SIZE:-1b}
STEPS=${GPU_BENCH_STEPS:-3}
export PYTHONUNBUFFERED=1

esc() { printf '%s' "$1" | tr '\n\t' '  ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }
write_check() {  # check.json from the phases so far, plus the facts about the machine
    local disk; disk=$(df -hT "$NVME_DIR" 2>/dev/null | tail -n 1)
    { printf '{"budget_s": %s, "elapsed_s": %s, "nvme_dir": "%s", "nvme_dir_filesystem": "%s",\n' \
          "$BUDGET" "$(( $(date +%s) - START ))" "$(esc "$NVME_DIR")" "$(esc "$disk")"
      printf ' "gpu": "%s", "python": "%s", "cuda": %s,\n "phases": [\n' \
          "$(esc "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)")" \
          "$(esc "${PY:-}")" "${CUDA:-null}"
      sed '$!s/$/,/' "$PHASES"; printf ' ]}\n'; } >"$OUT/check.json.tmp" && mv "$OUT/check.json.tmp" "$OUT/check.json"
}
record() {  # name status rc seconds limit reason
    printf '  {"phase": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "reason": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$(esc "$6")" >>"$PHASES"
    echo "gpu_check: $1: $2${6:+ ($6)}" | tee -a "$LOG" >&2
    write_check
}
limit() {  # the seconds a phase may take: its own limit, less whatever the phases after it must keep
    local left=$(( START + BUDGET - $(date +%s) - $2 ))
    (( left < $1 )) && echo "$left" || echo "$1"
}
phase() {  # name own_limit reserve_after command...: runs it under timeout, records the outcome
    local name=$1 lim; lim=$(limit "$2" "$3"); shift 3
    if (( lim < 10 )); then record "$name" skipped null 0 "$lim" "the ${BUDGET} s budget is spent"; return 1; fi
    echo "=== $name (limit ${lim} s): $*" >>"$LOG"
    local t0; t0=$(date +%s)
    timeout -k 10 "$lim" "$@" >>"$LOG" 2>&1
    local rc=$? secs=$(( $(date +%s) - t0 ))
    case $rc in
        0) record "$name" passed 0 "$secs" "$lim" "" ;;
        124|137) record "$name" timeout "$rc" "$secs" "$lim" "killed after ${lim} s; see log.txt" ;;
        *) record "$name" failed "$rc" "$secs" "$lim" "exit $rc; see log.txt" ;;
    esac
    return $rc
}
has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
NEEDS='import torch, numpy, prometheus_client, safetensors, crc32c, infinity.zero'

choose_python() {  # sets PY; prints why on failure
    if [ -x .venv/bin/python ] && has_cuda .venv/bin/python; then PY=$ROOT/.venv/bin/python; remember; return 0; fi
    if command -v python3 >/dev/null && has_cuda python3; then
        PY=$(command -v python3)
        export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
        if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/infinity-site .whl/*.whl \
                && export PYTHONPATH=$PYTHONPATH:/tmp/infinity-site
        fi
        if [ -e /usr/include/libaio.h ] && "$PY" -c 'import cffi' 2>/dev/null; then  # the native engine, optional
            "$PY" setup.py -q build_ext --inplace || echo "gpu_check: native build failed; the POSIX backend runs"
        fi
        "$PY" -c "$NEEDS" && remember && return 0
        echo "gpu_check: $PY has a CUDA torch but not all of infinity's needs ($NEEDS failed above): carry them as" \
             "wheels in .whl/ (docs/benchmarks.md, 'GPU check (issue 19)')"
        return 1
    fi
    echo "gpu_check: no Python with a CUDA torch here; scripts/setup with TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}"
    scripts/setup || { echo "gpu_check: scripts/setup could not install (no package index reachable?)"; return 1; }
    PY=$ROOT/.venv/bin/python
    "$PY" -c "$NEEDS" && remember
}
remember() { printf 'PY=%q\nexport PYTHONPATH=%q\n' "$PY" "${PYTHONPATH:-}" >"$STATE/python"; }
if [ "${1:-}" = --setup ]; then choose_python; exit; fi  # the setup phase: this script again, under timeout

: >"$LOG"; : >"$PHASES"
START=$(date +%s)
mkdir -p "$NVME_DIR"
write_check
rm -f "$STATE/python"
if ! phase setup 240 200 bash "$0" --setup || [ ! -e "$STATE/python" ]; then
    record result failed 1 0 0 "setup failed (log.txt says why): nothing else ran"; exit 1
fi
. "$STATE/python"
if has_cuda "$PY"; then CUDA=true; else CUDA=false; fi
write_check
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -x)

if [ "$CUDA" = false ]; then
    why="torch $("$PY" -c 'import torch; print(torch.__version__)') in $PY sees no CUDA device"
    for name in gpu_collect gpu_basics gpu_training bench_resident bench_nvme compare; do
        record "$name" skipped null 0 0 "$why"
    done
    phase cpu_smoke 120 0 "$PY" -m benchmarks.gpu_bench smoke --device cpu --out "$OUT" --nvme_path "$NVME_DIR" \
        --timeout 100
    for f in resident nvme summary; do [ -e "$OUT/$f.json" ] && mv "$OUT/$f.json" "$OUT/smoke-$f.json"; done
    record result skipped 0 0 0 "no CUDA: the CUDA phases were skipped; the tiny GPT ran on the CPU as a smoke test"
    exit 0
fi

phase gpu_collect 30 330 "${PYTEST[@]}" --collect-only tests/gpu
phase gpu_basics 60 300 "${PYTEST[@]}" tests/gpu/test_pinned_buffer.py tests/gpu/test_manager_cuda.py \
    tests/gpu/test_h2d_ahead.py
phase gpu_training 120 280 "${PYTEST[@]}" tests/gpu/test_training_cuda.py tests/gpu/test_param_cache_cuda.py
BENCH=("$PY" -m benchmarks.gpu_bench run --device cuda --size "$SIZE" --steps "$STEPS" --nvme_path "$NVME_DIR")
phase bench_resident 90 200 "${BENCH[@]}" --mode resident --json "$OUT/resident.json"
phase bench_nvme 240 10 "${BENCH[@]}" --mode nvme --json "$OUT/nvme.json"
rm -rf "$NVME_DIR"/gpu-bench-*
if [ -e "$OUT/resident.json" ] && [ -e "$OUT/nvme.json" ]; then
    phase compare 10 0 "$PY" -m benchmarks.gpu_bench compare "$OUT/resident.json" "$OUT/nvme.json" \
        --json "$OUT/summary.json"
fi
failed=$(grep -c '"status": "\(failed\|timeout\)"' "$PHASES")
record result "$([ "$failed" = 0 ] && echo passed || echo failed)" "$failed" "$(( $(date +%s) - START ))" "$BUDGET" \
    "$failed phase(s) failed or timed out"
exit 0

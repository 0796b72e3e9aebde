#!/usr/bin/env bash
# Every benchmark of benchmarks/, on a baseline tree and on this checkout, back to back, on the same machine.
#
#   git worktree add /tmp/geolink_head <commit before the change>     # the baseline tree (once)
#   benchmarks/run_all.sh [OUT_DIR]                                    # RUNS=5 BASELINE=/tmp/geolink_head by default
#   QUICK=1 benchmarks/run_all.sh                                      # smallest settings: checks that all scripts run
#   ONLY="data graph" benchmarks/run_all.sh OUT_DIR                     # only these benchmarks
#
# Each script measures the geolink its interpreter imports: the baseline through PYTHONPATH=$BASELINE, this
# checkout through the editable install (the first line of every output names the tree and its commit). Each
# benchmark runs on the baseline, then at once on this checkout, each time the median (min–max) of RUNS runs.
# Outputs: OUT_DIR/<name>.<before|after>.txt, OUT_DIR/machine.txt and OUT_DIR/summary.md (all of them in order).
# Run it on a quiet machine (nothing else running: the load average is printed before each run).
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=${BASELINE:-/tmp/geolink_head}
runs=${RUNS:-5}
batch=12 samples=2000 graph_options=()
if [ "${QUICK:-0}" = 1 ]; then
  runs=1 batch=2 samples=50 graph_options=(--skip-cli)
fi
out=${1:-/tmp/geolink_bench_$(date +%Y%m%d_%H%M%S)}
if [ ! -f "$baseline/geolink/__init__.py" ]; then
  echo "no baseline tree at $baseline: git worktree add $baseline <commit>" >&2
  exit 2
fi
mkdir -p "$out"
{
  date -u
  uname -a
  echo "CPUs: $(nproc)"
  grep -m1 "model name" /proc/cpuinfo || true
  python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())"
} > "$out/machine.txt"

failed=0
names=()
measure() {  # measure <name> <before|after> <script> <script arguments...>
  local name=$1 label=$2 script=$3 log
  shift 3
  log="$out/$name.$label.txt"
  echo "== $name ($label) $(date -u +%T), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ "$label" = before ]; then
    PYTHONPATH="$baseline" python "benchmarks/$script.py" "$@" > "$log" 2>&1 || { echo "FAILED: $log"; failed=1; }
  else
    env -u PYTHONPATH python "benchmarks/$script.py" "$@" > "$log" 2>&1 || { echo "FAILED: $log"; failed=1; }
  fi
}
both() {  # both <name> <script> <script arguments...>: the baseline, then this checkout
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $1 "* ]]; then return; fi
  names+=("$1")
  measure "$1" before "${@:2}"
  measure "$1" after "${@:2}"
}

both forward bench_forward --batch-size "$batch" --repeats "$runs"
both train bench_train --batch-size "$batch" --repeats "$runs"
both data bench_data --runs "$runs" --samples "$samples" --workers 2
both graph bench_graph --runs "$runs" "${graph_options[@]}"
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  both gpu_pretrain gpu_pretrain
  both gpu_pretrain_compile gpu_pretrain --compile
else
  echo "no GPU: gpu_pretrain skipped"
fi

for name in "${names[@]}"; do
  for label in before after; do
    printf '\n## %s, %s\n\n' "$name" "$label"
    cat "$out/$name.$label.txt"
  done
done > "$out/summary.md"
echo "outputs in $out (summary.md has all of them)"
exit "$failed"

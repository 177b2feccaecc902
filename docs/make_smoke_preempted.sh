#!/usr/bin/env bash
# Makes docs/smoke_preempted.png from a real run: the smoke recipe on 1 process, stopped with SIGTERM
# at about step 75, resumed on 2 processes, stopped at about step 150, resumed on 1 process to the end.
# Run from a checkout with .venv set up (README's test command); takes a few minutes on 2 cores. The run
# and its logs go to a temporary folder, removed at the end.
set -u
cd "$(dirname "$0")/.." || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck source=/dev/null
. .venv/bin/activate
export TQDM_DISABLE=1
# The EMA on and a validation at every epoch end, so the figure shows both sets of curves across the stops.
A=(--config configs/smoke.yaml --ema.enabled=true --eval.max_share=0 --train.output_dir="$work/demo")
wait_step() {  # until metrics.jsonl has logged step >= $1, or the run $2 ended, or 10 minutes passed
  for _ in $(seq 600); do
    kill -0 "$2" 2>/dev/null || { echo "the run stopped before step $1: see $work" >&2; exit 1; }
    python - "$1" "$work/demo/metrics.jsonl" <<'PY' && return 0
import json, sys
try:
    steps = [json.loads(l)["step"] for l in open(sys.argv[2]) if l.strip()]
except FileNotFoundError:
    steps = []
sys.exit(0 if steps and max(steps) >= int(sys.argv[1]) else 1)
PY
    sleep 1
  done
  echo "no step $1 within 10 minutes" >&2
  exit 1
}
python -m tinydist.train "${A[@]}" > "$work/demo1.log" 2>&1 & P=$!
wait_step 75 $P; kill -TERM $P; wait $P; echo "part1 (1 process) rc=$?"
python -m tinydist.launch --multi_gpu --num_processes 2 tinydist/train.py "${A[@]}" > "$work/demo2.log" 2>&1 & P=$!
wait_step 150 $P; kill -TERM $P; wait $P; echo "part2 (2 processes) rc=$?"
python -m tinydist.train "${A[@]}" > "$work/demo3.log" 2>&1; echo "part3 (1 process) rc=$?"
python -m tinydist.report "$work/demo" --out docs/smoke_preempted.png

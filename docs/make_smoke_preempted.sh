#!/usr/bin/env bash
# Makes docs/smoke_preempted.png from a real run: the smoke recipe on 1 process, stopped with SIGTERM
# at step 75, resumed on 2 processes, stopped at step 151, resumed on 1 process to the end.
# Run from a checkout with .venv set up (README's test command); takes a few minutes on 2 cores.
set -u
cd "$(dirname "$0")/.." || exit 1
rm -rf runs/demo
# shellcheck source=/dev/null
. .venv/bin/activate
export TQDM_DISABLE=1
A=(--config configs/smoke.yaml --train.output_dir=runs/demo)
wait_step() {  # until metrics.jsonl has logged step >= $1
  until python - "$1" <<'PY'
import json, sys
try:
    steps = [json.loads(l)["step"] for l in open("runs/demo/metrics.jsonl") if l.strip()]
except FileNotFoundError:
    steps = []
sys.exit(0 if steps and max(steps) >= int(sys.argv[1]) else 1)
PY
  do sleep 1; done
}
python -m tinydist.train "${A[@]}" > /tmp/demo1.log 2>&1 & P=$!
wait_step 75; kill -TERM $P; wait $P; echo "part1 (1 process) rc=$?"
python -m tinydist.launch --multi_gpu --num_processes 2 tinydist/train.py "${A[@]}" > /tmp/demo2.log 2>&1 & P=$!
wait_step 150; kill -TERM $P; wait $P; echo "part2 (2 processes) rc=$?"
python -m tinydist.train "${A[@]}" > /tmp/demo3.log 2>&1; echo "part3 (1 process) rc=$?"
python -m tinydist.report runs/demo --out docs/smoke_preempted.png

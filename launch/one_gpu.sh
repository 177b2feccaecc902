#!/usr/bin/env bash
# Train on one GPU (one process) under accelerate (python -m tinydist.launch, see launch/common.sh).
#
# Usage:  launch/one_gpu.sh [--a.b=v ...]      extra arguments go to tinydist/train.py
#         CONFIG=configs/X.yaml OUTPUT_DIR=runs/a CHECKPOINT_DIR=s3://bucket/a launch/one_gpu.sh
# Environment: CONFIG, OUTPUT_DIR, CHECKPOINT_DIR, RUN_NAME, ACCELERATE_ARGS (see launch/common.sh).
# Exit codes (the training program's own, see launch/common.sh):
#   0 finished | 75 saved and stopped: relaunch to resume | 69 transient: relaunch with backoff
#   | 2 configuration error | other: crash
# Ctrl-C / SIGTERM / SIGUSR1 / SIGHUP, to this script's process (it becomes the launcher) or to all of its
# processes, reach the training process, which saves at the next step and exits 75.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tinydist_train_args
tinydist_launch --config_file configs/accelerate/one_gpu.yaml --num_processes 1 \
	-- "${TRAIN_ARGS[@]}" "$@"

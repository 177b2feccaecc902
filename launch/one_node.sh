#!/usr/bin/env bash
# Train on all GPUs of this machine (one process per GPU, DDP) under accelerate (python -m
# tinydist.launch, see launch/common.sh); also the per-machine step of a multi-machine run
# (launch/slurm.sbatch and launch/skypilot.yaml call it on every node).
#
# Usage:  launch/one_node.sh [--a.b=v ...]     extra arguments go to tinydist/train.py
#         NUM_GPUS=4 CHECKPOINT_DIR=s3://bucket/a launch/one_node.sh --log.report_to=[wandb]
# Environment:
#   NUM_GPUS          processes on this machine (default: CUDA_VISIBLE_DEVICES or nvidia-smi -L, else 1)
#   NUM_MACHINES      machines in the run (default 1); when > 1 also:
#     MACHINE_RANK      this machine's rank, 0..NUM_MACHINES-1
#     MAIN_PROCESS_IP   host of machine 0;  MAIN_PROCESS_PORT (default 29500)
#   CONFIG, OUTPUT_DIR, CHECKPOINT_DIR, RUN_NAME, ACCELERATE_ARGS: see launch/common.sh
# Exit codes (the training program's own, see launch/common.sh):
#   0 finished | 75 saved and stopped: relaunch to resume | 2 configuration error | other: crash
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NUM_GPUS=${NUM_GPUS:-$(tinydist_num_gpus)}
NUM_MACHINES=${NUM_MACHINES:-1}
[[ $NUM_GPUS =~ ^[1-9][0-9]*$ && $NUM_MACHINES =~ ^[1-9][0-9]*$ ]] ||
	tinydist_die "NUM_GPUS ($NUM_GPUS) and NUM_MACHINES ($NUM_MACHINES) must be positive integers"

if ((NUM_MACHINES > 1)); then
	[[ -n ${MAIN_PROCESS_IP:-} && ${MACHINE_RANK:-} =~ ^[0-9]+$ ]] ||
		tinydist_die "NUM_MACHINES=$NUM_MACHINES needs MACHINE_RANK and MAIN_PROCESS_IP"
	# accelerate's --num_processes is the total; it starts num_processes / num_machines here.
	accel=(--config_file configs/accelerate/multi_node.yaml
		--num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
		--main_process_ip "$MAIN_PROCESS_IP" --main_process_port "${MAIN_PROCESS_PORT:-29500}"
		--num_processes $((NUM_MACHINES * NUM_GPUS)))
else
	accel=(--config_file configs/accelerate/one_node.yaml --num_processes "$NUM_GPUS")
fi

tinydist_train_args
tinydist_launch "${accel[@]}" -- "${TRAIN_ARGS[@]}" "$@"

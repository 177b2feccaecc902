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
#   MIN_MACHINES      elastic: keep training while at least this many of the NUM_MACHINES are alive
#                     (torchrun --nnodes=MIN:MAX, c10d rendezvous on MAIN_PROCESS_IP:MAIN_PROCESS_PORT).
#                     When a machine dies, the survivors' workers are restarted on the smaller world
#                     and resume from the last commit (same global batch, more accumulation); a
#                     machine that comes back joins at the next restart. The machine at
#                     MAIN_PROCESS_IP hosts the rendezvous and must survive. Also:
#     MAX_RESTARTS      worker restarts before the job fails (default 3)
#     RDZV_ID           the job's rendezvous id (default: RUN_NAME, else tinydist)
#     RDZV_CONF         extra rendezvous settings, e.g. last_call_timeout=5 (torchrun --rdzv-conf)
#     ACCELERATE_ARGS cannot be used (torchrun takes no accelerate flags): set e.g.
#     ACCELERATE_MIXED_PRECISION=bf16 in the environment instead
#   CONFIG, OUTPUT_DIR, CHECKPOINT_DIR, RUN_NAME, ACCELERATE_ARGS: see launch/common.sh
# Exit codes (the training program's own, see launch/common.sh):
#   0 finished | 75 saved and stopped: relaunch to resume | 69 transient: relaunch with backoff
#   | 2 configuration error | other: crash
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NUM_GPUS=${NUM_GPUS:-$(tinydist_num_gpus)}
NUM_MACHINES=${NUM_MACHINES:-1}
[[ $NUM_GPUS =~ ^[1-9][0-9]*$ && $NUM_MACHINES =~ ^[1-9][0-9]*$ ]] ||
	tinydist_die "NUM_GPUS ($NUM_GPUS) and NUM_MACHINES ($NUM_MACHINES) must be positive integers"

if [[ -n ${MIN_MACHINES:-} ]]; then
	if ! [[ $MIN_MACHINES =~ ^[1-9][0-9]*$ ]] || ((MIN_MACHINES > NUM_MACHINES)); then
		tinydist_die "MIN_MACHINES ($MIN_MACHINES) must be a positive integer <= NUM_MACHINES ($NUM_MACHINES)"
	fi
	[[ -n ${MAIN_PROCESS_IP:-} ]] || tinydist_die "MIN_MACHINES needs MAIN_PROCESS_IP (the rendezvous host)"
	[[ -z ${ACCELERATE_ARGS:-} ]] ||
		tinydist_die "ACCELERATE_ARGS cannot go to torchrun (elastic); set ACCELERATE_MIXED_PRECISION etc. instead"
	accel=(--torchrun --nnodes "$MIN_MACHINES:$NUM_MACHINES" --nproc-per-node "$NUM_GPUS"
		--rdzv-backend c10d --rdzv-endpoint "$MAIN_PROCESS_IP:${MAIN_PROCESS_PORT:-29500}"
		--rdzv-id "${RDZV_ID:-${RUN_NAME:-tinydist}}" --max-restarts "${MAX_RESTARTS:-3}")
	[[ -z ${RDZV_CONF:-} ]] || accel+=(--rdzv-conf "$RDZV_CONF")
elif ((NUM_MACHINES > 1)); then
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

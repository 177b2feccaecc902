# shellcheck shell=bash
# Sourced by launch/one_gpu.sh and launch/one_node.sh; not run on its own.
#
# tinydist_launch ACCELERATE_FLAGS... -- TRAIN_ARGS...
#   replaces this shell (exec) with
#     $PYTHON -m tinydist.launch ACCELERATE_FLAGS $ACCELERATE_ARGS $TRAIN_SCRIPT TRAIN_ARGS
#   in the repository root, so the script's exit code is the training program's own:
#     0 finished | 75 saved and stopped (relaunch) | 69 transient (relaunch with backoff)
#     | 2 configuration error (never relaunch) | anything else: crash
#   tinydist.launch is `accelerate launch` (same flags) that keeps those codes (accelerate alone
#   turns every failure into 1), forwards TERM/INT/USR1/HUP to the training processes and outlives
#   them; see tinydist/runtime/launch.py. It never returns: call it last.
#
# Environment (all optional):
#   CONFIG          training config            (default configs/tiny_imagenet_resnet18.yaml)
#   OUTPUT_DIR      -> --train.output_dir=...
#   CHECKPOINT_DIR  -> --checkpoint.dir=...    (a path or a URL: s3://bucket/run)
#   RUN_NAME        -> --log.run_name=...
#   ACCELERATE_ARGS extra `accelerate launch` flags, split on spaces (e.g. "--mixed_precision bf16")
#   TRAIN_SCRIPT    default tinydist/train.py
#   PYTHON          interpreter that runs tinydist.launch (default python: the active environment)
#   TINYDIST_LAUNCH whole launcher command, split on spaces (default: $PYTHON -m tinydist.launch;
#                   tests stand in for it); it gets the accelerate flags, TRAIN_SCRIPT, its args
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun lets ranks save after SIGTERM before SIGKILL;
#                   tinydist.launch defaults it to 170 (torch's own 30 is short for a checkpoint)

TINYDIST_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$TINYDIST_ROOT" || exit 1  # relative paths (CONFIG, TRAIN_SCRIPT, OUTPUT_DIR) are from the repo root

TRAIN_SCRIPT=${TRAIN_SCRIPT:-tinydist/train.py}
CONFIG=${CONFIG:-configs/tiny_imagenet_resnet18.yaml}
if [[ -n ${TINYDIST_LAUNCH:-} ]]; then
	read -r -a TINYDIST_LAUNCHER <<<"$TINYDIST_LAUNCH"
else
	TINYDIST_LAUNCHER=("${PYTHON:-python}" -m tinydist.launch)
fi
read -r -a ACCELERATE_EXTRA <<<"${ACCELERATE_ARGS:-}"

# Usage errors are configuration errors: a relaunch cannot fix them.
tinydist_die() {
	echo "$(basename "$0"): $*" >&2
	exit 2
}

# The training arguments every launcher passes first; the caller's "$@" comes after and wins.
tinydist_train_args() {
	TRAIN_ARGS=(--config "$CONFIG")
	[[ -z ${OUTPUT_DIR:-} ]] || TRAIN_ARGS+=("--train.output_dir=$OUTPUT_DIR")
	[[ -z ${CHECKPOINT_DIR:-} ]] || TRAIN_ARGS+=("--checkpoint.dir=$CHECKPOINT_DIR")
	[[ -z ${RUN_NAME:-} ]] || TRAIN_ARGS+=("--log.run_name=$RUN_NAME")
}

# Number of GPUs this process may use: CUDA_VISIBLE_DEVICES if set (SLURM sets it; nvidia-smi
# ignores it), else nvidia-smi -L, else 1.
tinydist_num_gpus() {
	local n=0 ids
	if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
		IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
		n=${#ids[@]}
	elif command -v nvidia-smi >/dev/null 2>&1; then
		n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
	fi
	((n > 0)) || n=1
	echo "$n"
}

tinydist_launch() {
	local accel=()
	while (($#)) && [[ $1 != -- ]]; do
		accel+=("$1")
		shift
	done
	(($#)) && shift
	# exec, not a child: no shell is left between the launcher and its signals, and so none that
	# would have to ignore TERM/INT/USR1/HUP to outlive the training and report its code.
	# - SLURM (--signal without B:) sends USR1 to every process of the step: a shell here, with
	#   bash's default action for USR1, would die at once; srun would then take the step for ended
	#   and kill the ranks in the middle of their save. tinydist.launch handles USR1 (forwards it).
	# - Kubernetes sends TERM to PID 1 only, and a container's command is often this script: a
	#   shell there would have to forward TERM itself (ignoring it, as the old `trap '' TERM INT
	#   USR1` did, meant the ranks never heard of the shutdown and were SIGKILLed after the grace
	#   period). exec makes tinydist.launch PID 1 (or the pid spot_relaunch.sh/systemd signals).
	# No `trap ''` either: there is no shell left to protect, and a signal ignored here would stay
	# ignored in the launcher until it installs its handlers (after seconds of imports), i.e. be
	# lost. tinydist.launch installs them before it starts any training process (those start with
	# the default dispositions and install their own), and prints the code it exits with.
	exec "${TINYDIST_LAUNCHER[@]}" "${accel[@]}" "${ACCELERATE_EXTRA[@]}" "$TRAIN_SCRIPT" "$@"
}

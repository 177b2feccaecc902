# shellcheck shell=bash
# Sourced by launch/one_gpu.sh and launch/one_node.sh; not run on its own.
#
# tinydist_launch ACCELERATE_FLAGS... -- TRAIN_ARGS...
#   runs `accelerate launch ACCELERATE_FLAGS launch/exit_status.py $TRAIN_SCRIPT TRAIN_ARGS` in the
#   repository root and returns the training program's own exit code:
#     0 finished | 75 saved and stopped (relaunch) | 2 configuration error (never relaunch)
#     | anything else: crash
#   accelerate alone would turn every failure into 1 (see launch/exit_status.py).
#
# Environment (all optional):
#   CONFIG          training config            (default configs/tiny_imagenet_resnet18.yaml)
#   OUTPUT_DIR      -> --train.output_dir=...
#   CHECKPOINT_DIR  -> --checkpoint.dir=...    (a path or a URL: s3://bucket/run)
#   RUN_NAME        -> --log.run_name=...
#   ACCELERATE_ARGS extra `accelerate launch` flags, split on spaces (e.g. "--mixed_precision fp16")
#   TRAIN_SCRIPT    default tinydist/train.py;  ACCELERATE  default accelerate (tests stand in for both)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun lets ranks save after SIGTERM before SIGKILL
#                   (torch's own default, 30, is short for a checkpoint; default here 170)

TINYDIST_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$TINYDIST_ROOT" || exit 1  # relative paths (CONFIG, TRAIN_SCRIPT, OUTPUT_DIR) are from the repo root

ACCELERATE=${ACCELERATE:-accelerate}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-tinydist/train.py}
CONFIG=${CONFIG:-configs/tiny_imagenet_resnet18.yaml}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}
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

# tinydist_exit_code ACCELERATE_RC DIR: the code the ranks exited with.
# A config error on any rank wins (never relaunch), then a crash, then "saved and stopped".
tinydist_exit_code() {
	local rc=$1 f c crash="" stopped=""
	if ((rc == 0)); then
		echo 0
		return
	fi
	for f in "$2"/rank*.code; do
		[[ -e $f ]] || continue
		c=$(<"$f")
		case $c in
		0) ;;
		2) echo 2 && return ;;
		75) stopped=75 ;;
		*) crash=${crash:-$c} ;;
		esac
	done
	echo "${crash:-${stopped:-$rc}}"
}

tinydist_launch() {
	local accel=() dir rc=0
	while (($#)) && [[ $1 != -- ]]; do
		accel+=("$1")
		shift
	done
	(($#)) && shift
	dir=$(mktemp -d "${TMPDIR:-/tmp}/tinydist-exit.XXXXXX")
	# Only the training processes act on TERM/INT/USR1 (save at the next step, exit 75). This shell
	# and accelerate's launcher must outlive them to report the code, so they ignore these signals
	# (torchrun installs its own TERM/INT handler and forwards them to the ranks; exit_status.py
	# gives the ranks back the default handlers).
	trap '' TERM INT USR1
	TINYDIST_EXIT_DIR=$dir "$ACCELERATE" launch "${accel[@]}" "${ACCELERATE_EXTRA[@]}" \
		launch/exit_status.py "$TRAIN_SCRIPT" "$@" || rc=$?
	rc=$(tinydist_exit_code "$rc" "$dir")
	rm -rf "$dir"
	echo "$(basename "$0"): training exited with $rc" >&2
	return "$rc"
}

#!/usr/bin/env bash
# Relaunch loop for a plain spot VM: run the training until it finishes, relaunching it when it
# stopped after saving (75) or crashed (with backoff). Checkpoints live in a bucket, so a new VM
# started with the same CHECKPOINT_DIR resumes where the last one stopped.
#
# Usage:  CHECKPOINT_DIR=s3://bucket/run launch/spot_relaunch.sh [--a.b=v ...]
#   Start it at boot (cloud-init, or a systemd unit with KillMode=mixed so that only this loop gets
#   SIGTERM and forwards it once, and TimeoutStopSec longer than a checkpoint save).
# Environment:
#   CHECKPOINT_DIR   required; passed as --checkpoint.dir (local disks die with the VM: use a bucket)
#   TRAIN_CMD        command to run (default launch/one_node.sh; split on spaces); the arguments
#                    --checkpoint.dir=$CHECKPOINT_DIR and this script's own follow it
#   MAX_ATTEMPTS     launches at most (default 20)
#   BACKOFF_S        wait after the first crash (default 30), doubled after each further crash up
#                    to MAX_BACKOFF_S (default 600); an exit 75 resets it
#   PREEMPT_DELAY_S  wait after an exit 75 before relaunching (default 1)
# Exit codes of the training (tinydist/runtime/exitcodes.py) and what this loop does with them:
#   75 saved and stopped: relaunch after PREEMPT_DELAY_S; 69 transient (storage, network, hub, a lost
#   peer, a live lease on the checkpoint dir) and crashes: relaunch with backoff; 2: stop.
# Exit codes of this script:
#   0  training finished
#   2  configuration error: never relaunched (also: bad settings of this script)
#   otherwise the last launch's code: after MAX_ATTEMPTS launches, or when this loop itself got
#   SIGTERM/SIGINT (the VM is going down): it forwards the signal, waits for the training to save
#   and exit (75), and exits with that code without relaunching.
set -euo pipefail
set -m # each launch runs in its own process group: a forwarded signal reaches all of it

die() {
	echo "spot_relaunch: $*" >&2
	exit 2
}
log() { echo "spot_relaunch: $*" >&2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
read -r -a cmd <<<"${TRAIN_CMD:-$root/launch/one_node.sh}"
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
BACKOFF_S=${BACKOFF_S:-30}
MAX_BACKOFF_S=${MAX_BACKOFF_S:-600}
PREEMPT_DELAY_S=${PREEMPT_DELAY_S:-1}
SLEEP=${SLEEP:-sleep} # tests stand in for it
[[ -n ${CHECKPOINT_DIR:-} ]] || die "set CHECKPOINT_DIR (e.g. s3://bucket/run)"
((${#cmd[@]})) || die "TRAIN_CMD is empty"
for v in MAX_ATTEMPTS BACKOFF_S MAX_BACKOFF_S PREEMPT_DELAY_S; do
	[[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number of seconds/launches, not '${!v}'"
done
((MAX_ATTEMPTS > 0)) || die "MAX_ATTEMPTS must be at least 1"
# Passed once, as --checkpoint.dir; unset so that one_node.sh does not add it a second time.
ckpt=$CHECKPOINT_DIR
unset CHECKPOINT_DIR

child="" stopping=""
# shellcheck disable=SC2317,SC2329  # called from the traps below (0.9 says SC2317, 0.11 SC2329)
forward() {
	stopping=$1
	if [[ -n $child ]]; then kill -s "$1" -- "-$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP  # the terminal closed: the same stop (ignored, and left so, under nohup)

# A sleep that a signal cuts short (a foreground sleep would hold the trap until it ends).
pause() {
	local p
	"$SLEEP" "$1" &
	p=$!
	wait "$p" || kill "$p" 2>/dev/null || true
}

backoff=$((BACKOFF_S < MAX_BACKOFF_S ? BACKOFF_S : MAX_BACKOFF_S))
rc=0
for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
	log "launch $attempt/$MAX_ATTEMPTS: ${cmd[*]}"
	"${cmd[@]}" "--checkpoint.dir=$ckpt" "$@" </dev/null &
	child=$!
	rc=0
	wait "$child" || rc=$?
	# A trapped signal makes `wait` return early (>128) while the child saves: keep waiting.
	while ((rc > 128)) && kill -0 "$child" 2>/dev/null; do
		rc=0
		wait "$child" || rc=$?
	done
	if ((rc > 128)) && [[ -n $stopping ]]; then
		# The child may have exited between the interrupted wait and kill -0: fetch its own code
		# (127 means that status was already collected, and rc is it).
		r=0
		wait "$child" 2>/dev/null || r=$?
		((r == 127)) || rc=$r
	fi
	child=""

	if [[ -n $stopping ]]; then
		log "got SIG$stopping: not relaunching; exiting with the training's code $rc"
		exit "$rc"
	fi
	case $rc in
	0) exit 0 ;;
	2) log "configuration error (2): a relaunch cannot fix it" && exit 2 ;;
	75)
		delay=$PREEMPT_DELAY_S
		backoff=$((BACKOFF_S < MAX_BACKOFF_S ? BACKOFF_S : MAX_BACKOFF_S)) # it saved: progress
		;;
	69)
		log "transient failure (69): storage, network, hub or a peer unavailable"
		delay=$backoff
		backoff=$((backoff * 2 < MAX_BACKOFF_S ? backoff * 2 : MAX_BACKOFF_S))
		;;
	*)
		delay=$backoff
		backoff=$((backoff * 2 < MAX_BACKOFF_S ? backoff * 2 : MAX_BACKOFF_S))
		;;
	esac
	((attempt < MAX_ATTEMPTS)) || break
	log "exit $rc: relaunching in ${delay}s"
	((delay == 0)) || pause "$delay"
	if [[ -n $stopping ]]; then exit "$rc"; fi
done
log "giving up after $MAX_ATTEMPTS launches; last exit $rc"
exit "$rc"

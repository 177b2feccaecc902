"""Dead peers: a rank killed in the middle of a save makes the survivor exit with the transient code,
at once, not after torchrun's shutdown timeout (170 s) or a 30-minute commit wait."""

from __future__ import annotations

import pytest

from tinydist.runtime.exitcodes import EXIT_TRANSIENT
from tinydist.runtime.peers import PeerLostError, Peers, is_peer_failure
from helpers.train import describe, run, tiny_args, train_command, train_env

# Rank 0 asks for a stop at its first micro-batch, so every rank makes the blocking (final) save of
# step 1; rank 1 is SIGKILLed as it writes its first shard of that save.
DRIVER = r'''
import os, signal, sys
import tinydist.train as train
from tinydist.ckpt.storage import Storage

rank = int(os.environ.get("RANK", "0"))
original_transform, original_write = train.augment, Storage.write
sent = []

def transform(*args, **kwargs):
    if rank == 0 and not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return original_transform(*args, **kwargs)

def write(self, name, data):
    if rank == 1 and "/model-" in name:
        print(f"driver: rank 1 killed while writing {name}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return original_write(self, name, data)

train.augment = transform
Storage.write = write
sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_peer_killed_during_the_final_save_is_transient_at_once(tmp_path, cache_dir):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    args = tiny_args(cache_dir, str(out), train__max_steps=8, train__peer_timeout_s=120)
    result = run(train_command(args, nprocs=2, script=str(driver)), train_env(), timeout=300)
    assert "driver: rank 1 killed while writing" in result.stdout, describe(result)
    assert result.returncode == EXIT_TRANSIENT, describe(result)
    assert "2 process(es)" in result.stdout, describe(result)
    lost = [line for line in result.stderr.splitlines() if line.startswith("error:") and "lost" in line]
    assert lost and "step-00000001" in lost[0] and "rank(s) [1]" in lost[0], describe(result)
    assert "tinydist.launch: training exited with 69" in result.stderr
    assert not (out / "checkpoints" / "step-00000001" / "COMMITTED").exists()
    # Found dead by the barrier (gloo's closed connection), not by waiting out train.peer_timeout_s.
    assert "Connection closed by peer" in lost[0] and "timed out" not in lost[0].lower(), lost[0]


def test_peer_failure_messages_are_recognised():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:21931. This is typically caused by a remote worker crashing.")
    barrier = RuntimeError("Rank 1 failed to pass monitoredBarrier in 5000 ms")
    assert is_peer_failure(gloo) and is_peer_failure(barrier)
    assert not is_peer_failure(RuntimeError("CUDA out of memory")) and not is_peer_failure(ValueError("x"))
    lost = Peers(2, 0, 30).lost(barrier, "saving step-00000007")
    assert isinstance(lost, PeerLostError) and is_peer_failure(lost)
    assert "rank(s) [1]" in str(lost) and "step-00000007" in str(lost) and "peer_timeout_s=30" in str(lost)


def test_one_process_needs_no_peers():
    peers = Peers(1, 0, 1)
    assert peers.max([0, 3]) == [0, 3]
    peers.barrier("nothing")  # returns at once, no process group needed

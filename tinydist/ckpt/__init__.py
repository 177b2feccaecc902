"""Checkpoints: storage under a URL, the sharded safetensors layout (shared with exports), the record and
its TrainState, named tensor sets, the commit protocol, retention, restore, lease, backoff."""

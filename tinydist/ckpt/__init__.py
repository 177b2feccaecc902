"""Checkpoints: storage under a URL, the sharded safetensors layout, the commit protocol, restore, lease, backoff."""

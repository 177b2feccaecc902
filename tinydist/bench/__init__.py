"""Benchmarks: each figure against a baseline timed in the same run (`python -m tinydist.bench`).

Offline: set here, before any of them imports `datasets` or `huggingface_hub` (which read these on
import); the training subprocesses they start inherit them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

"""The training loop's parts: triggers and cadence, evaluation, console, trackers, the Accelerator, the divergence guard."""

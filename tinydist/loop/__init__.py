"""The training loop's parts: the step and the run state, triggers and cadence, evaluation, console, trackers, the Accelerator."""

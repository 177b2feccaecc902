"""Other engines that run tinydist's own `train` in their processes (Ray Train): launchers with a
scheduler of their own, after the `train` layer, using the same loop and the same checkpoints."""

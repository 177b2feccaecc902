"""Processes and faults: the exit-code contract and the one CLI wrapper, signals, cloud notices, peers, launch,
the divergence guard, and whose pid is whose (host)."""

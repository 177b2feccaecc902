"""Processes and faults: the exit-code contract and the one CLI wrapper, signals, cloud notices, peers, launch,
the divergence guard, whose pid is whose (host), and errors quoted in one line (error_text)."""

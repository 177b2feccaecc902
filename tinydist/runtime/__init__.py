"""Processes and faults: the exit-code contract and the one CLI wrapper, signals, cloud notices, peers, launch,
the divergence guard, whose pid is whose (host), and what one-line messages quote of others (quote)."""

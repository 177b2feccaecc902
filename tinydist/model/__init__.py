"""The model and what trains it: build (+ the BN rule, the softmax guard), optimizer and schedule, EMA, PreciseBN."""

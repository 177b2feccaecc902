"""From a run to a model people use: the exported folder and its card, predict, labels, the report."""

"""The simulated engine: a performance model of one GPU (issue 11, item 1); no model, no GPU."""

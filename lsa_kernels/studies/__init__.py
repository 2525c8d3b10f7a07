"""Studies that reproduce the paper's experiments outside the training stack: ``synthetic`` (§3, mean vs
length prediction with tiny regressors; docs/synthetic.md)."""

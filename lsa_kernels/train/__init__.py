"""Training utilities: data (corpus, tokenizer, long-short windows), loop, evaluate, checkpoint, demo, synthetic."""

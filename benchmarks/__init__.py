"""Benchmarks of lsa_kernels against torch, Cut Cross-Entropy, Liger and the bare GEMMs: see README.md."""

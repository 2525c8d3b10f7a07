"""Adapters from model libraries to the fused losses (see :mod:`lsa_kernels.integrations.hf`)."""

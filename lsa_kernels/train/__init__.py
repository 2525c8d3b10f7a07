"""Training utilities and studies."""

"""The training stack around the fused losses (docs/training.md): config, data, model, parallel (single /
DDP / FSDP / tensor parallel), checkpoint, loop (``lsa train``), evaluate (``lsa eval``), demo (``lsa demo``)."""

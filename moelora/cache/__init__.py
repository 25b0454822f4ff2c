"""Device memory pools: the paged KV cache (and, with multi-LoRA, the adapter slots)."""

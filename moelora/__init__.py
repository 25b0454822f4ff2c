"""moelora: serve Mixture-of-Experts LLMs with many LoRA adapters in one batch."""

"""LoRA adapters: reading, validating and normalising PEFT adapter folders."""

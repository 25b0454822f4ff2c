"""moelora: serve Mixture-of-Experts LLMs with many LoRA adapters in one batch."""

from moelora.llm import LLM

__all__ = ["LLM"]
__version__ = "0.1.0"

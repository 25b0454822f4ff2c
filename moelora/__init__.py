"""moelora: serve Mixture-of-Experts LLMs with many LoRA adapters in one batch."""

from moelora.llm import LLM
from moelora.outputs import CompletionOutput, RequestDelta, RequestOutput
from moelora.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestDelta", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

"""The Python API: `LLM(model, ...)` loads a model and its tokenizer and runs it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moelora.batch import ForwardBatch
from moelora.config import ModelArgs
from moelora.loader.model_loader import load_model
from moelora.loader.resolve import resolve_model

Prompt = str | Sequence[int]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: Path) -> Any:
    """The folder's Hugging Face tokenizer, or None if it has none (prompts must then be token ids)."""
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class LLM:
    """A loaded model. `LLM("demo")` needs no download; a folder or a cached Hugging Face id works too.

    Use as a context manager (or call `shutdown()`) to release the model's memory deterministically.
    """

    def __init__(
        self,
        model: str = "demo",
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.args = ModelArgs(model=str(model), dtype=str(dtype), device=device, seed=seed, progress=progress)
        self.model_path = resolve_model(model)
        torch.manual_seed(seed)
        self.model = load_model(self.model_path, dtype=dtype, device=device, progress=progress)
        self.device = next(self.model.parameters()).device
        self.tokenizer: Any = load_tokenizer(self.model_path)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Drop the model; further calls fail."""
        self.__dict__.pop("model", None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (a string is tokenised as is, no chat template); validated."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer: give prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("a prompt needs at least one token")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (`<id>` placeholders when the model folder has no tokenizer)."""
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return str(self.tokenizer.decode(list(ids)))

    @torch.inference_mode()
    def logits(self, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        """One forward pass over all prompts as one batch: fp32 logits [len(prompt), vocab] per prompt.

        Row i is the model's distribution for the token after position i.
        """
        seqs = [self.encode(p) for p in prompts]
        if not seqs:
            return []
        batch = ForwardBatch.prefill([len(s) for s in seqs], self.device)
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(self.model(ids, batch)).cpu()
        return list(logits.split(batch.seq_lens))

    def top_next_tokens(self, prompts: Sequence[Prompt], k: int = 5) -> list[list[tuple[str, float]]]:
        """For each prompt, the k likeliest next tokens and their probabilities."""
        result = []
        for logit in self.logits(prompts):
            probs = torch.softmax(logit[-1], dim=-1)
            values, ids = probs.topk(min(k, probs.numel()))
            result.append([(self.decode([i]), float(v)) for v, i in zip(values, ids.tolist(), strict=True)])
        return result

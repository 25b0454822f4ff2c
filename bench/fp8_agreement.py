"""Greedy agreement of FP8 weights (`--quantization fp8`) with the 16-bit model (issue #27).

The 16-bit model generates greedily from N fresh random prompts; both models then score those same
sequences (teacher forcing, so one early difference does not decide the rest): per generated position,
whether the FP8 model's top token is the one the 16-bit model chose, and how far its log-probability of
that token is from the 16-bit model's. Prints the share of equal tokens, the sequences equal throughout,
and the largest and mean log-prob differences. Dummy weights (a preset) have near-tied logits, so their
agreement is a lower bound of a trained model's.
    python bench/fp8_agreement.py preset:qwen3-30b-a3b [--prompts 64 --prompt-len 32 --tokens 32]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from moelora import LLM, SamplingParams


def scores(llm: LLM, seqs: list[list[int]], starts: list[int], chunk: int) -> list[tuple[Any, Any]]:
    """Per sequence, over its generated positions: (top token, log-prob of the sequence's token)."""
    out = []
    for i in range(0, len(seqs), chunk):
        part = seqs[i : i + chunk]
        for seq, start, logits in zip(part, starts[i : i + chunk], llm.logits(part), strict=True):
            rows = logits[start - 1 : len(seq) - 1].float().log_softmax(-1)
            chosen = torch.tensor(seq[start:])
            out.append((rows.argmax(-1), rows.gather(1, chosen[:, None]).squeeze(1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder or preset:NAME")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per prompt")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--chunk", type=int, default=16, help="sequences scored per forward pass")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    opts: dict[str, Any] = dict(dtype=args.dtype, device=args.device, progress=False)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    with LLM(args.model, quantization="none", **opts) as llm:
        vocab = llm.model.cfg.vocab_size
        prompts = [
            torch.randint(10, vocab - 10, (args.prompt_len,), generator=g).tolist()
            for _ in range(args.prompts)
        ]
        outs = llm.generate(prompts, params)
        seqs = [prompt + out.token_ids for prompt, out in zip(prompts, outs, strict=True)]
        starts = [len(prompt) for prompt in prompts]
        ref = scores(llm, seqs, starts, args.chunk)
    with LLM(args.model, quantization="fp8", **opts) as llm:
        got = scores(llm, seqs, starts, args.chunk)
    equal = [
        (top == torch.tensor(seq[start:])) for (top, _), seq, start in zip(got, seqs, starts, strict=True)
    ]
    diffs = torch.cat([(lp - ref_lp).abs() for (_, lp), (_, ref_lp) in zip(got, ref, strict=True)])
    result = {
        "model": args.model,
        "prompts": args.prompts,
        "tokens": args.tokens,
        "equal_tokens": float(torch.cat(equal).float().mean()),
        "equal_sequences": sum(bool(e.all()) for e in equal) / len(equal),
        "max_logprob_diff": float(diffs.max()),
        "mean_logprob_diff": float(diffs.mean()),
    }
    print(
        f"{args.model}, {args.dtype} vs FP8 weights, {args.prompts} prompts x {args.tokens} tokens "
        f"(teacher-forced on the {args.dtype} model's greedy tokens):\n"
        f"| equal tokens | equal sequences | max log-prob diff | mean log-prob diff |\n|---|---|---|---|\n"
        f"| {result['equal_tokens']:.1%} | {result['equal_sequences']:.1%} | "
        f"{result['max_logprob_diff']:.3f} | {result['mean_logprob_diff']:.4f} |"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""GPU smoke check: the engine on CUDA gives the CPU's greedy tokens (fp32), runs in bf16; prints timings."""

from __future__ import annotations

import time

import torch

from moelora import LLM, SamplingParams

PROMPTS = ["The weather today is", "Hello", "My computer keeps", "To make a simple soup,"] * 8


def run(device: str, dtype: str) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    with LLM("demo", device=device, dtype=dtype, progress=False, num_kv_blocks=512) as llm:
        llm.generate(PROMPTS[:2], params)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(PROMPTS, params)
        return [o.token_ids for o in outs], time.perf_counter() - start


def main() -> None:
    cpu, t_cpu = run("cpu", "float32")
    gpu, t_gpu = run("cuda", "float32")
    bf16, t_bf16 = run("cuda", "bfloat16")
    same = sum(a == b for a, b in zip(cpu, gpu, strict=True))
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 64)
        for a, b in zip(cpu, bf16, strict=True)
    ]
    tokens = len(PROMPTS) * 64
    print(f"{'run':<14}{'seconds':>9}{'tok/s':>9}")
    for name, t in (("cpu fp32", t_cpu), ("cuda fp32", t_gpu), ("cuda bf16", t_bf16)):
        print(f"{name:<14}{t:9.2f}{tokens / t:9.0f}")
    print(f"cuda fp32 sequences equal to cpu: {same}/{len(PROMPTS)}")
    print(f"cuda bf16 agrees with cpu fp32 for the first {min(first_diff)}..{max(first_diff)} tokens")


if __name__ == "__main__":
    main()

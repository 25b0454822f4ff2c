"""End-to-end generation on a model with Qwen3-30B-A3B's layer shapes (few layers, random weights).

Builds the checkpoint and per-expert PEFT adapters locally (nothing is downloaded), then times prefill
and decode through `LLM.generate` for the base model alone and for a batch mixing the base model with
several adapters, and profiles one decode step to show where the time goes. Prints a table last.

    python bench/e2e.py --layers 4 --batch 64 --prompt 128 --new 64 --adapters 4
    python bench/e2e.py --tiny        # a small CPU smoke of the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelora import LLM, SamplingParams

QWEN3_30B = dict(
    hidden=2048, heads=32, kv_heads=4, head_dim=128, inter=768, experts=128, top_k=8, vocab=151936
)
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=32, experts=8, top_k=2, vocab=512)


def build_checkpoint(folder: Path, shape: dict[str, int], layers: int, device: str) -> None:
    h, nh, nkv, d = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    inter, e, vocab = shape["inter"], shape["experts"], shape["vocab"]
    g = torch.Generator(device).manual_seed(0)

    def rand(*size: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * std).to(torch.bfloat16).cpu()

    state = {
        "model.embed_tokens.weight": rand(vocab, h),
        "lm_head.weight": rand(vocab, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(nh * d, h),
            p + "self_attn.k_proj.weight": rand(nkv * d, h),
            p + "self_attn.v_proj.weight": rand(nkv * d, h),
            p + "self_attn.o_proj.weight": rand(h, nh * d),
            p + "self_attn.q_norm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rand(e, h, std=0.5),
            p + "mlp.experts.gate_up_proj": rand(e, 2 * inter, h),
            p + "mlp.experts.down_proj": rand(e, h, inter),
        }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "head_dim": d,
        "intermediate_size": 6144,
        "moe_intermediate_size": inter,
        "num_experts": e,
        "num_experts_per_tok": shape["top_k"],
        "norm_topk_prob": True,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))


def build_adapter(folder: Path, shape: dict[str, int], layers: int, rank: int, seed: int) -> None:
    """A per-expert PEFT adapter on attention q/k/v/o and every routed expert of every layer."""
    h, nh, nkv, d, inter = (
        shape["hidden"],
        shape["heads"],
        shape["kv_heads"],
        shape["head_dim"],
        shape["inter"],
    )
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def pair(module: str, n_in: int, n_out: int) -> None:
        key = f"base_model.model.model.layers.{module}"
        tensors[key + ".lora_A.weight"] = (torch.randn(rank, n_in, generator=g) * 0.02).to(torch.bfloat16)
        tensors[key + ".lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.02).to(torch.bfloat16)

    for i in range(layers):
        pair(f"{i}.self_attn.q_proj", h, nh * d)
        pair(f"{i}.self_attn.k_proj", h, nkv * d)
        pair(f"{i}.self_attn.v_proj", h, nkv * d)
        pair(f"{i}.self_attn.o_proj", nh * d, h)
        for e in range(shape["experts"]):
            pair(f"{i}.mlp.experts.{e}.gate_proj", h, inter)
            pair(f"{i}.mlp.experts.{e}.up_proj", h, inter)
            pair(f"{i}.mlp.experts.{e}.down_proj", inter, h)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(
    llm: LLM, prompts: list[list[int]], new: int, lora: list[str | None], device: str
) -> tuple[float, float]:
    """(prefill seconds: 1 new token each, total seconds for `new` tokens each)."""
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    llm.generate(prompts, one, lora=lora)
    sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts, many, lora=lora)
    sync(device)
    return prefill, time.perf_counter() - start


def profile_decode(llm: LLM, prompts: list[list[int]], lora: list[str | None], out: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with profile(activities=activities) as prof:
        llm.generate(prompts, params, lora=lora)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    if out is not None:
        out.write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moelora-e2e"))
    ap.add_argument("--out", type=Path, default=None, help="folder for the profile tables")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (checks the script)")
    args = ap.parse_args()
    shape = TINY if args.tiny else QWEN3_30B
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    t0 = time.perf_counter()
    ckpt = args.dir / "model"
    build_checkpoint(ckpt, shape, args.layers, device)
    adapters = {f"a{i}": args.dir / f"a{i}" for i in range(args.adapters)}
    for i, folder in enumerate(adapters.values()):
        build_adapter(folder, shape, args.layers, args.rank, seed=i + 1)
    print(f"built checkpoint and {len(adapters)} adapters in {time.perf_counter() - t0:.1f} s", flush=True)

    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, shape["vocab"], (args.prompt,), generator=g).tolist() for _ in range(args.batch)
    ]
    names: list[str | None] = [None, *adapters]
    mixed = [names[i % len(names)] for i in range(args.batch)]
    rows = []
    with LLM(
        str(ckpt),
        device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
        progress=False,
        lora_modules={n: str(p) for n, p in adapters.items()},
        max_loras_per_batch=max(1, args.adapters),
        max_num_seqs=args.batch,
        kv_cache_memory=0.3 if device == "cuda" else None,
    ) as llm:
        runs = (("base only", [None] * args.batch), (f"base + {args.adapters} adapters", mixed))
        for _, lora in runs:  # warm-up: compiles every kernel variant the timed runs use
            timed_generate(llm, prompts, 4, lora, device)
        for label, lora in runs:
            prefill, total = timed_generate(llm, prompts, args.new, lora, device)
            decode = max(total - prefill, 1e-9)
            rows.append(
                (
                    label,
                    prefill,
                    args.batch * args.prompt / prefill,
                    decode / (args.new - 1) * 1e3,
                    args.batch * (args.new - 1) / decode,
                )
            )
        profile = profile_decode(llm, prompts, mixed, args.out / "profile_mixed.txt" if args.out else None)
    print(profile)
    print(
        f"# {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, {args.layers} layers of "
        f"Qwen3-30B-A3B shape, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
        f"rank {args.rank}"
    )
    print("| run | prefill s | prefill tok/s | decode ms/step | decode tok/s |")
    print("|---|---|---|---|---|")
    for label, prefill, ptok, step_ms, dtok in rows:
        print(f"| {label} | {prefill:.3f} | {ptok:.0f} | {step_ms:.1f} | {dtok:.0f} |")


if __name__ == "__main__":
    main()

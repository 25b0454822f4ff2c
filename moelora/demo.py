"""Built-in tiny demo model: a Qwen3-MoE checkpoint generated locally, so nothing needs downloading.

The server, its tests and its examples need a real Hugging Face-format MoE checkpoint to load, but a
published one is gigabytes and needs network access.  This module builds a ~1 MB stand-in with the same
architecture, file layout and key names as an official Qwen3-MoE checkpoint (mixed MoE and dense layers,
per-expert weights, ChatML template), deterministically, and caches it.

The weights are random but scaled on purpose: the final logits have clear top-1 margins so that greedy
decoding gives the same tokens across implementations (a tiny random model otherwise has near-tied
logits, and rounding differences flip the argmax), and router logits are spread so expert choice is
stable too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEMO_NAME = "demo"

_LOG = logging.getLogger(__name__)

_BUILD_DIR = "demo-v1"
_CACHE_ENV = "MOELORA_CACHE"
_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
_SEED = 20250611

_PAD_TOKEN = "<|endoftext|>"
_IM_START = "<|im_start|>"
_EOS_TOKEN = "<|im_end|>"
_SPECIAL_TOKENS = (_PAD_TOKEN, _IM_START, _EOS_TOKEN)
_VOCAB_SIZE = 512

_HIDDEN = 64
_LAYERS = 3
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = 16
_MOE_INTERMEDIATE = 32
_DENSE_INTERMEDIATE = 128
_EXPERTS = 8
_TOP_K = 2
_DENSE_LAYERS = (1,)

_NORM_NOISE = 0.05
_ROUTER_LOGIT_STD = 3.0
_FINAL_LOGIT_STD = 5.0

_CHAT_TEMPLATE = r"""{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_CORPUS = """\
The kettle clicked off just as the rain began to tap against the kitchen window.
To make a simple soup, soften an onion in butter, add diced carrots, and cover them with stock.
Let the pot simmer gently for twenty minutes, then season it with salt, pepper, and a little thyme.
Fresh bread tastes best when the crust is crisp and the inside is still slightly warm.
She measured the flour twice, because the recipe said that baking rewards patience and care.
A sharp knife is safer than a dull one, since it slides through food instead of slipping.
On Sunday mornings we cook eggs, fry tomatoes, and argue about whether toast should be buttered hot.
The weather forecast promised sunshine, but by noon a thick grey fog had rolled in from the sea.
Autumn winds scatter yellow leaves across the road and make the old oak trees creak at night.
When the temperature drops below freezing, the puddles turn into thin sheets of cracked glass.
Thunder rumbled in the distance while the children counted the seconds after each flash of light.
A warm front usually brings light rain, while a cold front can bring sudden storms and strong gusts.
In the desert the days are hot and bright, yet the nights can be surprisingly cold.
The snow fell quietly all evening, and by morning the whole village looked soft and new.
My laptop fan starts to hum whenever I open too many tabs in the browser.
A computer stores numbers as patterns of bits, and every program is a long list of small steps.
He restarted the server, checked the logs, and found that a single missing comma broke the build.
Good software is tested often, because small mistakes are cheaper to fix before anyone relies on them.
The keyboard was old and loud, but she typed faster on it than on any new machine.
Memory is fast but forgets everything when the power goes out, while a disk remembers slowly.
Our team writes short functions with clear names, so that the next reader can follow the idea.
The network was slow today, so the video kept pausing to buffer every few seconds.
We caught the early train to the coast and watched the fields turn from green to gold.
Travelling light means packing one bag, a good pair of shoes, and a book for the long wait.
The old harbour town has narrow streets, blue doors, and a market that opens at dawn.
At the airport, the queue for security moved slowly, but the staff were calm and kind.
They rented bicycles and followed the river path until the city disappeared behind the hills.
A paper map never runs out of battery, which is why my grandfather still carries one.
The hotel room was small, yet the balcony looked out over a square full of music and lamps.
Before a long journey, it helps to learn a few polite words in the local language.
The garden needs water every evening in July, or the beans begin to wilt and curl.
Tomatoes grow best in a sunny corner, tied loosely to a stake so the stems do not snap.
He planted tulip bulbs in October and waited all winter to see which colours would appear.
A bird built its nest in the hedge, and now we walk past it very quietly.
The library was warm and silent, apart from the soft turning of pages and a ticking clock.
Reading before bed helps me rest, as long as the story is not too exciting.
The museum has a room full of ancient clocks, each one ticking at a slightly different pace.
Learning to play the piano takes years, but even simple songs can bring a lot of joy.
The orchestra tuned their instruments while the audience whispered and found their seats.
She practised the same three chords every day until her fingers stopped hurting.
Our neighbour repairs old radios in his shed and can name every part by its sound.
The bus was late again, so we walked to the next stop and talked about nothing in particular.
A good cup of coffee needs fresh beans, clean water, and a grinder that is not too fine.
Tea should steep for three to five minutes, depending on how strong you like it.
The market sells apples, pears, cheese, honey, and warm pastries that vanish before ten.
If you forget to add yeast, the dough will stay flat no matter how long it rests.
The chef tasted the sauce, frowned, and added a squeeze of lemon to brighten it.
Rice cooks evenly when the lid stays on and nobody lifts it to peek.
A clear sky at sunset often means a cold night and a bright, frosty morning.
The river rose after a week of heavy rain, and the ducks seemed delighted about it.
Spring arrives slowly here, first with birdsong, then with blossom, and finally with warmth.
Clouds gathered over the mountains, so the hikers turned back before the path grew slippery.
The phone reminded her about the meeting, but she had already forgotten the password.
A spreadsheet can add thousands of numbers in a moment, yet one wrong cell changes everything.
The printer jammed twice, then printed forty pages of a document nobody had asked for.
Backing up your files feels boring until the day a drive fails without warning.
The robot in the demo picked up a cup, paused, and placed it gently on the table.
Every question deserves a clear answer, and a short answer is often the clearest.
Thank you for your help yesterday; the directions you gave were simple and exactly right.
Please close the window when you leave, because the wind tends to knock over the plants.
What time does the shop open on Saturday, and do they still sell the brown bread?
I would like a table for two near the window, if one is free this evening.
The numbers 1, 2, 3, 10, 42, and 100 appear in many small examples and puzzles.
"""


@dataclass(frozen=True)
class _Param:
    """One tensor to generate: value = offset + std * N(0, 1), so norms and linears share one recipe."""

    name: str
    shape: tuple[int, ...]
    std: float
    offset: float = 0.0


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """Folder of the built-in demo model, built on first use and cached."""
    root = _cache_root(cache_dir)
    final = root / _BUILD_DIR
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    _LOG.info("building demo model in %s", final)
    staging = Path(tempfile.mkdtemp(prefix=f".{_BUILD_DIR}.tmp-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the published model may sit in a shared cache
    try:
        _build_into(staging)
        _publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _cache_root(cache_dir: Path | None) -> Path:
    """Resolve the cache root: explicit argument, then the environment, then the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(_CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "moelora"


def _is_complete(folder: Path) -> bool:
    """A folder counts as built only if every file is present; partial folders never get published."""
    return all((folder / name).is_file() for name in _FILES)


def _publish(staging: Path, final: Path) -> None:
    """Atomically move the finished build into place; if another process won the race, keep theirs."""
    _discard_incomplete(final)
    try:
        os.replace(staging, final)
    except OSError:
        if not _is_complete(final):
            raise


def _discard_incomplete(final: Path) -> None:
    """Move a damaged folder aside first, because a rename cannot replace a non-empty directory."""
    if not final.exists() or _is_complete(final):
        return
    trash = final.with_name(f".{final.name}.stale-{os.getpid()}")
    try:
        os.replace(final, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _build_into(folder: Path) -> None:
    """Write every checkpoint file; the config ids come from the trained tokenizer so they cannot drift."""
    tokenizer = _train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {token: _token_id(tokenizer, token) for token in _SPECIAL_TOKENS}
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "config.json", _model_config(tokenizer.get_vocab_size(), ids))
    _write_json(folder / "generation_config.json", _generation_config(ids))
    save_file(_make_weights(), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _train_tokenizer() -> Tokenizer:
    """Train a byte-level BPE like Qwen's, so every byte string is encodable and decoding is exact."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if tokenizer.get_vocab_size() != _VOCAB_SIZE:
        raise RuntimeError(f"demo tokenizer has {tokenizer.get_vocab_size()} tokens, want {_VOCAB_SIZE}")
    return tokenizer


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    """Look up a special token id, failing loudly because a silent None would corrupt the config."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"demo tokenizer lacks {token}")
    return token_id


def _tokenizer_config() -> dict[str, Any]:
    """Qwen-style tokenizer settings: no BOS, ChatML turns ending in <|im_end|>."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": _EOS_TOKEN,
        "pad_token": _PAD_TOKEN,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": _CHAT_TEMPLATE,
    }


def _model_config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """The config.json an official Qwen3-MoE checkpoint would carry, shrunk to demo size."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "head_dim": _HEAD_DIM,
        "moe_intermediate_size": _MOE_INTERMEDIATE,
        "intermediate_size": _DENSE_INTERMEDIATE,
        "num_experts": _EXPERTS,
        "num_experts_per_tok": _TOP_K,
        "norm_topk_prob": True,
        "mlp_only_layers": list(_DENSE_LAYERS),
        "decoder_sparse_step": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": ids[_PAD_TOKEN],
        "pad_token_id": ids[_PAD_TOKEN],
        "eos_token_id": ids[_EOS_TOKEN],
    }


def _generation_config(ids: dict[str, int]) -> dict[str, Any]:
    """Greedy by default, so demo runs are reproducible; stops on either end marker, as Qwen does."""
    return {
        "bos_token_id": ids[_PAD_TOKEN],
        "pad_token_id": ids[_PAD_TOKEN],
        "eos_token_id": [ids[_EOS_TOKEN], ids[_PAD_TOKEN]],
        "do_sample": False,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write stable, human-readable JSON so that rebuilds are byte-identical."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _make_weights() -> dict[str, torch.Tensor]:
    """Draw every tensor from one seeded generator in a fixed order, so builds are reproducible."""
    generator = torch.Generator().manual_seed(_SEED)
    weights: dict[str, torch.Tensor] = {}
    for param in _param_specs():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        weights[param.name] = (param.offset + param.std * noise).contiguous()
    return weights


def _param_specs() -> list[_Param]:
    """Every checkpoint tensor in generation order, under the names transformers writes for Qwen3-MoE."""
    specs = [_Param("model.embed_tokens.weight", (_VOCAB_SIZE, _HIDDEN), 1.0)]
    for layer in range(_LAYERS):
        prefix = f"model.layers.{layer}"
        specs += _attention_specs(prefix)
        specs += _dense_specs(prefix) if layer in _DENSE_LAYERS else _moe_specs(prefix)
    specs.append(_norm("model.norm.weight", _HIDDEN))
    specs.append(_linear("lm_head.weight", _VOCAB_SIZE, _HIDDEN, gain=_FINAL_LOGIT_STD))
    return specs


def _attention_specs(prefix: str) -> list[_Param]:
    """Layer norms plus attention; q/k norms keep attention scores O(1) whatever the projections do."""
    q_width, kv_width = _HEADS * _HEAD_DIM, _KV_HEADS * _HEAD_DIM
    return [
        _norm(f"{prefix}.input_layernorm.weight", _HIDDEN),
        _norm(f"{prefix}.post_attention_layernorm.weight", _HIDDEN),
        _linear(f"{prefix}.self_attn.q_proj.weight", q_width, _HIDDEN),
        _linear(f"{prefix}.self_attn.k_proj.weight", kv_width, _HIDDEN),
        _linear(f"{prefix}.self_attn.v_proj.weight", kv_width, _HIDDEN),
        _linear(f"{prefix}.self_attn.o_proj.weight", _HIDDEN, q_width),
        _norm(f"{prefix}.self_attn.q_norm.weight", _HEAD_DIM),
        _norm(f"{prefix}.self_attn.k_norm.weight", _HEAD_DIM),
    ]


def _dense_specs(prefix: str) -> list[_Param]:
    """The plain SwiGLU MLP used by layers listed in mlp_only_layers."""
    return _swiglu_specs(f"{prefix}.mlp", _DENSE_INTERMEDIATE)


def _moe_specs(prefix: str) -> list[_Param]:
    """Router plus per-expert SwiGLU weights, stored unfused as in published Qwen3-MoE checkpoints."""
    specs = [_linear(f"{prefix}.mlp.gate.weight", _EXPERTS, _HIDDEN, gain=_ROUTER_LOGIT_STD)]
    for expert in range(_EXPERTS):
        specs += _swiglu_specs(f"{prefix}.mlp.experts.{expert}", _MOE_INTERMEDIATE)
    return specs


def _swiglu_specs(prefix: str, intermediate: int) -> list[_Param]:
    """gate/up/down projections scaled by 1/sqrt(fan_in) so the residual stream stays O(1)."""
    return [
        _linear(f"{prefix}.gate_proj.weight", intermediate, _HIDDEN),
        _linear(f"{prefix}.up_proj.weight", intermediate, _HIDDEN),
        _linear(f"{prefix}.down_proj.weight", _HIDDEN, intermediate),
    ]


def _linear(name: str, out_features: int, in_features: int, gain: float = 1.0) -> _Param:
    """A weight whose outputs have std `gain` for unit-RMS inputs (RMSNorm guarantees that input scale)."""
    return _Param(name, (out_features, in_features), gain / math.sqrt(in_features))


def _norm(name: str, width: int) -> _Param:
    """An RMSNorm weight near 1, jittered so a bug that ignores norm weights shows up in outputs."""
    return _Param(name, (width,), _NORM_NOISE, offset=1.0)


# ---------------------------------------------------------------------------------------------- adapters

_ADAPTER_DIR = "demo-adapters-v2"  # v2: the fused adapter records the PEFT version of its layout
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_LORA_STD = 0.35


@dataclass(frozen=True)
class _AdapterSpec:
    """A demo adapter: its rank, on-disk form and what it covers."""

    name: str
    rank: int
    alpha: float
    form: str  # "per_expert" or "fused" (PEFT target_parameters)
    attention: tuple[str, ...]
    experts: tuple[int, ...]
    layers: tuple[int, ...]
    dense_mlp: bool
    use_rslora: bool = False


DEMO_ADAPTERS = (
    _AdapterSpec(
        "expert-r8", 8, 16.0, "per_expert", ("q_proj", "v_proj"), tuple(range(_EXPERTS)), (0, 1, 2), True
    ),
    _AdapterSpec(
        "fused-r16",
        16,
        16.0,
        "fused",
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        tuple(range(_EXPERTS)),
        (0, 2),
        False,
    ),
    _AdapterSpec("partial-r4", 4, 8.0, "per_expert", ("o_proj",), (0, 1, 2, 3), (0,), False, use_rslora=True),
)


def demo_adapter_paths(cache_dir: Path | None = None) -> dict[str, Path]:
    """Folders of the demo model's PEFT adapters (built on first use and cached), by adapter name.

    expert-r8: per-expert keys, rank 8, every expert, q/v and the dense layer's MLP.
    fused-r16: PEFT's fused `target_parameters` form, rank 16, q/k/v/o, MoE layers 0 and 2.
    partial-r4: per-expert keys, rank 4, rsLoRA, only experts 0-3 of layer 0, plus o_proj there.
    """
    root = _cache_root(cache_dir)
    final = root / _ADAPTER_DIR
    if not all(_adapter_complete(final / spec.name) for spec in DEMO_ADAPTERS):
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{_ADAPTER_DIR}.tmp-", dir=root))
        staging.chmod(0o755)
        try:
            for spec in DEMO_ADAPTERS:
                _write_demo_adapter(staging / spec.name, spec)
            if final.exists() and not all(_adapter_complete(final / s.name) for s in DEMO_ADAPTERS):
                trash = final.with_name(f".{final.name}.stale-{os.getpid()}")
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(staging, final)
            except OSError:
                if not all(_adapter_complete(final / s.name) for s in DEMO_ADAPTERS):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {spec.name: final / spec.name for spec in DEMO_ADAPTERS}


def _adapter_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _ADAPTER_FILES)


def _write_demo_adapter(folder: Path, spec: _AdapterSpec) -> None:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(_SEED + spec.rank)
    r = spec.rank

    def pair(
        key: str, out_features: int, in_features: int, rows: int | None = None
    ) -> dict[str, torch.Tensor]:
        a = torch.randn(rows or r, in_features, generator=generator) * _LORA_STD / math.sqrt(in_features)
        b = torch.randn(out_features, rows or r, generator=generator) * _LORA_STD / math.sqrt(r)
        return {f"{key}.lora_A.weight": a.contiguous(), f"{key}.lora_B.weight": b.contiguous()}

    widths = {"q_proj": (_HEADS * _HEAD_DIM, _HIDDEN), "k_proj": (_KV_HEADS * _HEAD_DIM, _HIDDEN)}
    widths |= {"v_proj": widths["k_proj"], "o_proj": (_HIDDEN, _HEADS * _HEAD_DIM)}
    tensors: dict[str, torch.Tensor] = {}
    for layer in spec.layers:
        base = f"base_model.model.model.layers.{layer}"
        for target in spec.attention:
            tensors |= pair(f"{base}.self_attn.{target}", *widths[target])
        if layer in _DENSE_LAYERS:
            if spec.dense_mlp:
                tensors |= pair(f"{base}.mlp.gate_proj", _DENSE_INTERMEDIATE, _HIDDEN)
                tensors |= pair(f"{base}.mlp.up_proj", _DENSE_INTERMEDIATE, _HIDDEN)
                tensors |= pair(f"{base}.mlp.down_proj", _HIDDEN, _DENSE_INTERMEDIATE)
            continue
        if spec.form == "fused":
            rows = r * _EXPERTS  # expert-major A rows, rank-major B columns (PEFT's layout)
            gate_up = pair(f"{base}.mlp.experts.base_layer", 2 * _MOE_INTERMEDIATE, _HIDDEN, rows)
            tensors |= gate_up | pair(f"{base}.mlp.experts", _HIDDEN, _MOE_INTERMEDIATE, rows)
            continue
        for e in spec.experts:
            key = f"{base}.mlp.experts.{e}"
            tensors |= pair(f"{key}.gate_proj", _MOE_INTERMEDIATE, _HIDDEN)
            tensors |= pair(f"{key}.up_proj", _MOE_INTERMEDIATE, _HIDDEN)
            tensors |= pair(f"{key}.down_proj", _HIDDEN, _MOE_INTERMEDIATE)
    targets = list(spec.attention) + (
        ["gate_proj", "up_proj", "down_proj"] if spec.form == "per_expert" else []
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": DEMO_NAME,
        "r": r,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "target_modules": sorted(targets),
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        if spec.form == "fused"
        else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "peft_version": "0.21.2",  # the layout PEFT >= 0.19.1 writes (earlier ones read [E, out, in] swapped)
    }
    _write_json(folder / "adapter_config.json", config)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

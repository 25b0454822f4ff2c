"""Writers of PEFT adapter folders in each on-disk layout, and a manual-merge reference; no moelora code.

Layouts (reference/peft_moe_format.md): "per_expert" (one A/B pair per expert and projection; Mixtral's
w1/w3/w2 under block_sparse_moe), "fused" (PEFT `target_parameters`: gate and up share A, A rows expert-major,
B columns rank-major `j * E + e`, gate_up nested as `base_layer` when down is targeted too) and "converted"
(what PEFT makes of a per-expert adapter: gate_up of rank 2r with a block-diagonal B, and `.*\\.gate_up_proj`
entries of 2r / 2*alpha in rank_pattern / alpha_pattern). Weights are random and non-zero (B too), large
enough to change the logits of the tiny models in tests/hf_models.py visibly.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

FORMS = ("per_expert", "fused", "converted")
# Other trainers' expert layouts (PEFT cannot load these; the attention LoRA stays in PEFT's form):
# "megatron_3d": Megatron-Bridge's per-expert stacks under the packed HF names, as its adapter stream
#   emits them (NVIDIA-NeMo/Megatron-Bridge, tests/unit_tests/models/test_model_bridge_lora.py,
#   test_stream_adapter_weights_megatron_to_hf_packed_expert_stacks): experts.gate_up_proj.lora_A
#   [E, r, H], lora_B [E, 2I, r] (gate rows first, one A for gate and up), experts.down_proj.lora_A
#   [E, r, I], lora_B [E, H, r].
# "shared_outer": Megatron-Bridge's SharedOuterGroupedExpertAdapter export (src/megatron/bridge/peft/
#   utils.py, _stream_shared_outer_adapter_weights): gate's and up's A shared by all experts, written once
#   as experts.<gate|up>.lora_A [1, r, H], their B per expert; down's B shared, experts.<down>.lora_B
#   [1, H, r], its A per expert.
# "automodel": NeMo Automodel's GroupedExpertsLoRA parameters as saved without a conversion to HF
#   (NVIDIA-NeMo/Automodel, nemo_automodel/components/_peft/lora_experts.py): experts.lora_gate_and_up_A
#   [E, H, r], lora_gate_and_up_B [E, r, 2I] (gate columns first), lora_down_A [E, I, r], lora_down_B
#   [E, r, H]; the delta of x is (x @ A[e] @ B[e]) * alpha / r.
# "tinker": Tinker's raw download (thinking-machines-lab/tinker-cookbook, tests/weights/conftest.py
#   save_expert_adapter, tinker_cookbook/weights/_merge.py expand_expert_lora_tensors): experts.w1 (gate) /
#   w3 (up) with lora_A [1, r, H] shared by every expert and lora_B [E, I, r]; experts.w2 (down) with
#   lora_A [E, r, I] and lora_B [1, H, r] shared; attention under `attn` (as it names GPT-OSS's,
#   tests/weights/test_adapter_gpt_oss.py).
OTHER_FORMS = ("megatron_3d", "shared_outer", "automodel", "tinker")
# "fused_pre_0191": PEFT 0.17.0-0.19.0's target_parameters on out-major experts, which it read as
#   [E, in, out] (peft src/peft/tuners/lora/layer.py, ParamWrapper._get_in_out_features before commit
#   e84dd8f40, PR #3165): lora_A [r*E, out] (expert-major rows), lora_B [in, r*E] (rank-major columns),
#   delta W[e] = (s * B_e @ A_e).T; the config records that PEFT version.
OLD_PEFT_FORM = "fused_pre_0191"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# DeepSeek's latent attention (with q_a/q_b; o_proj as above)
MLA_ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
# What a request for q/k/v/o targets writes for a model with latent attention
MLA_FOR = {"q_proj": ("q_a_proj", "q_b_proj"), "k_proj": ("kv_a_proj_with_mqa",), "v_proj": ("kv_b_proj",)}
STD = 0.3
Weights = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r] unscaled, scale)


@dataclass
class ExpectedLora:
    """What a correct reader must produce, kept independently for the reference merge."""

    dense: dict[tuple[int, str], Weights]  # (layer, target) -> (A, B, scale)
    experts: dict[tuple[int, str, int], Weights]  # (layer, "gate"|"up"|"down", expert) -> (A, B, scale)


@dataclass(frozen=True)
class _Arch:
    """The sizes and names an adapter must fit, read from the HF config by rules of its own."""

    layers: int
    hidden: int
    q_out: int
    kv_out: int
    dense_inter: int
    shared_inter: int
    moe_inter: int
    num_experts: int
    moe_layers: tuple[bool, ...]
    expert_block: str  # where per-expert keys live
    expert_names: dict[str, str]  # gate/up/down -> checkpoint name
    shared_name: str = "shared_expert"  # the shared expert's module (GLM-4.5: shared_experts)
    # (in, out) of the attention projections, when they are not q/k/v/o over q_out / kv_out (DeepSeek)
    attention: dict[str, tuple[int, int]] | None = None

    def module_of(self, target: str) -> str:
        """A dense target's module under its layer (`shared_expert.` under the model's own name)."""
        if target in ATTENTION + MLA_ATTENTION:
            return f"self_attn.{target}"
        return "mlp." + target.replace("shared_expert.", f"{self.shared_name}.", 1)


def _arch(family: str, hf: Any) -> _Arch:
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    n = hf.num_hidden_layers
    mixtral = family == "mixtral"
    shared_inter = getattr(hf, "shared_expert_intermediate_size", 0) or 0
    if family in ("qwen3_moe", "qwen2_moe"):
        step, dense = hf.decoder_sparse_step or 1, set(hf.mlp_only_layers or [])
        moe = tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
        moe_inter, dense_inter = hf.moe_intermediate_size, hf.intermediate_size
    elif family in ("glm4_moe", "deepseek_v3", "deepseek_v2"):  # dense below first_k_dense_replace
        moe = tuple(i >= hf.first_k_dense_replace for i in range(n))
        moe_inter, dense_inter = hf.moe_intermediate_size, hf.intermediate_size
        shared_inter = hf.moe_intermediate_size * hf.n_shared_experts
    else:
        moe, moe_inter, dense_inter = (True,) * n, hf.intermediate_size, 0
    return _Arch(
        layers=n,
        hidden=hf.hidden_size,
        q_out=hf.num_attention_heads * head_dim,
        kv_out=hf.num_key_value_heads * head_dim,
        dense_inter=dense_inter,
        shared_inter=shared_inter,
        moe_inter=moe_inter,
        num_experts=getattr(hf, "num_local_experts", None) or hf.num_experts,
        moe_layers=moe,
        expert_block="block_sparse_moe" if mixtral else "mlp",
        expert_names=dict(
            zip(
                ("gate", "up", "down"),
                ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj"),
                strict=True,
            )
        ),
        shared_name="shared_experts"
        if family in ("glm4_moe", "deepseek_v3", "deepseek_v2")
        else "shared_expert",
        attention=_mla_shapes(hf) if family in ("deepseek_v3", "deepseek_v2") else None,
    )


def _mla_shapes(hf: Any) -> dict[str, tuple[int, int]]:
    """transformers' DeepseekV3Attention: (in, out) of each projection."""
    heads, h = hf.num_attention_heads, hf.hidden_size
    qk = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    q = {"q_proj": (h, heads * qk)}
    if hf.q_lora_rank is not None:
        q = {"q_a_proj": (h, hf.q_lora_rank), "q_b_proj": (hf.q_lora_rank, heads * qk)}
    return {
        **q,
        "kv_a_proj_with_mqa": (h, hf.kv_lora_rank + hf.qk_rope_head_dim),
        "kv_b_proj": (hf.kv_lora_rank, heads * (hf.qk_nope_head_dim + hf.v_head_dim)),
        "o_proj": (heads * hf.v_head_dim, h),
    }


class _Writer:
    def __init__(
        self, arch: _Arch, rank: int, alpha: float, seed: int, rslora: bool, ranks: dict, alphas: dict
    ):
        self.arch, self.rank, self.alpha, self.rslora = arch, rank, alpha, rslora
        self.ranks, self.alphas = ranks, alphas
        self.gen = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.expected = ExpectedLora({}, {})

    def r_of(self, module: str) -> int:
        key = get_pattern_key(list(self.ranks), module)
        return self.ranks.get(key, self.rank)

    def scale(self, module: str, r: int) -> float:
        key = get_pattern_key(list(self.alphas), module)
        alpha = self.alphas.get(key, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * STD

    def pair(self, module: str, A: torch.Tensor, B: torch.Tensor) -> None:
        self.tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        self.tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()

    def dense(self, layer: int, target: str) -> None:
        a = self.arch
        inter = a.shared_inter if target.startswith("shared_expert.") else a.dense_inter
        sizes = {
            "q_proj": (a.hidden, a.q_out),
            "k_proj": (a.hidden, a.kv_out),
            "v_proj": (a.hidden, a.kv_out),
            "o_proj": (a.q_out, a.hidden),
        }
        sizes |= a.attention or {}
        proj = target.rpartition(".")[2]
        in_f, out_f = sizes.get(proj) or ((inter, a.hidden) if proj == "down_proj" else (a.hidden, inter))
        module = f"model.layers.{layer}.{a.module_of(target)}"
        r = self.r_of(module)
        A, B = self.randn(r, in_f), self.randn(out_f, r)
        self.pair(module, A, B)
        self.expected.dense[(layer, target)] = (A, B, self.scale(module, r))

    def expert_shape(self, proj: str) -> tuple[int, int]:
        a = self.arch
        return (a.moe_inter, a.hidden) if proj == "down" else (a.hidden, a.moe_inter)

    def per_expert(
        self, layer: int, experts: Sequence[int], projs: Sequence[str], fixed: dict[str, int] | None = None
    ) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """Independent (A, B) per expert and projection, in one drawing order for both forms that use it;
        written as per-expert keys unless the ranks are `fixed` (by the converted form)."""
        out, block, names = {}, f"model.layers.{layer}.{self.arch.expert_block}", self.arch.expert_names
        for e in experts:
            for proj in projs:
                module = f"{block}.experts.{e}.{names[proj]}"
                r = fixed[proj] if fixed else self.r_of(module)
                in_f, out_f = self.expert_shape(proj)
                out[proj, e] = (self.randn(r, in_f), self.randn(out_f, r))
                if not fixed:
                    self.pair(module, *out[proj, e])
                    self.expected.experts[(layer, proj, e)] = (*out[proj, e], self.scale(module, r))
        return out

    def fused_pair(self, module: str, a3: torch.Tensor, b3: torch.Tensor) -> None:
        """a3 [E, r, in] -> A [E * r, in] expert-major; b3 [E, out, r] -> B [out, r * E], column j * E + e."""
        self.pair(module, a3.reshape(-1, a3.shape[-1]), b3.permute(1, 2, 0).reshape(b3.shape[1], -1))

    def fused(self, layer: int, projs: Sequence[str]) -> None:
        a, experts = self.arch, f"model.layers.{layer}.mlp.experts"
        gate_up = "gate" in projs
        if gate_up:
            r = self.r_of(f"{experts}.gate_up_proj")
            s = self.scale(f"{experts}.gate_up_proj", r)
            a3 = self.randn(a.num_experts, r, a.hidden)
            b3 = self.randn(a.num_experts, 2 * a.moe_inter, r)
            self.fused_pair(experts + (".base_layer" if "down" in projs else ""), a3, b3)
            for e in range(a.num_experts):
                self.expected.experts[(layer, "gate", e)] = (a3[e], b3[e, : a.moe_inter], s)
                self.expected.experts[(layer, "up", e)] = (a3[e], b3[e, a.moe_inter :], s)
        if "down" in projs:
            r = self.r_of(f"{experts}.down_proj")
            s = self.scale(f"{experts}.down_proj", r)
            a3, b3 = self.randn(a.num_experts, r, a.moe_inter), self.randn(a.num_experts, a.hidden, r)
            self.fused_pair(experts, a3, b3)
            for e in range(a.num_experts):
                self.expected.experts[(layer, "down", e)] = (a3[e], b3[e], s)

    def megatron_3d(self, layer: int, projs: Sequence[str]) -> None:
        self._stacks(layer, projs, "megatron_3d")

    def automodel(self, layer: int, projs: Sequence[str]) -> None:
        self._stacks(layer, projs, "automodel")

    def _stacks(self, layer: int, projs: Sequence[str], form: str) -> None:
        a, experts = self.arch, f"base_model.model.model.layers.{layer}.mlp.experts"
        sizes = {"gate_up": (a.hidden, 2 * a.moe_inter), "down": (a.moe_inter, a.hidden)}
        for proj in [p for p in ("gate_up", "down") if p in projs or (p == "gate_up" and "gate" in projs)]:
            module = f"model.layers.{layer}.mlp.experts.{proj}_proj"
            r, (in_f, out_f) = self.r_of(module), sizes[proj]
            s = self.scale(module, r)
            a3, b3 = self.randn(a.num_experts, r, in_f), self.randn(a.num_experts, out_f, r)
            if form == "megatron_3d":
                self.tensors[f"{experts}.{proj}_proj.lora_A.weight"] = a3.contiguous()
                self.tensors[f"{experts}.{proj}_proj.lora_B.weight"] = b3.contiguous()
            else:  # x @ A[e] @ B[e]: A [E, in, r], B [E, r, out]
                name = "gate_and_up" if proj == "gate_up" else "down"
                self.tensors[f"{experts}.lora_{name}_A"] = a3.transpose(1, 2).contiguous()
                self.tensors[f"{experts}.lora_{name}_B"] = b3.transpose(1, 2).contiguous()
            for e in range(a.num_experts):
                if proj == "down":
                    self.expected.experts[(layer, "down", e)] = (a3[e], b3[e], s)
                else:
                    self.expected.experts[(layer, "gate", e)] = (a3[e], b3[e, : a.moe_inter], s)
                    self.expected.experts[(layer, "up", e)] = (a3[e], b3[e, a.moe_inter :], s)

    def tinker(self, layer: int, projs: Sequence[str]) -> None:
        a, experts = self.arch, f"base_model.model.model.layers.{layer}.mlp.experts"
        w = {"gate": "w1", "up": "w3", "down": "w2"}
        for proj in projs:
            module = f"model.layers.{layer}.mlp.experts.{w[proj]}"
            r = self.r_of(module)
            s, (in_f, out_f) = self.scale(module, r), self.expert_shape(proj)
            if proj == "down":
                a3, b3 = self.randn(a.num_experts, r, in_f), self.randn(1, out_f, r)
            else:
                a3, b3 = self.randn(1, r, in_f), self.randn(a.num_experts, out_f, r)
            self.tensors[f"{experts}.{w[proj]}.lora_A.weight"] = a3
            self.tensors[f"{experts}.{w[proj]}.lora_B.weight"] = b3
            for e in range(a.num_experts):
                pick_a, pick_b = min(e, a3.shape[0] - 1), min(e, b3.shape[0] - 1)
                self.expected.experts[(layer, proj, e)] = (a3[pick_a], b3[pick_b], s)

    def shared_outer(self, layer: int, projs: Sequence[str]) -> None:
        """gate's and up's A shared by every expert (each its own), down's B shared; the other halves per
        expert. The rank pattern is read at the shared name."""
        a, block, names = self.arch, f"model.layers.{layer}.{self.arch.expert_block}", self.arch.expert_names
        for proj in projs:
            r = self.r_of(f"{block}.experts.0.{names[proj]}")
            in_f, out_f = self.expert_shape(proj)
            shared = self.randn(1, r, in_f) if proj != "down" else self.randn(1, out_f, r)
            half = "lora_A" if proj != "down" else "lora_B"
            self.tensors[f"base_model.model.{block}.experts.{names[proj]}.{half}.weight"] = shared
            for e in range(a.num_experts):
                module = f"{block}.experts.{e}.{names[proj]}"
                if proj != "down":
                    A, B = shared[0], self.randn(out_f, r)
                    self.tensors[f"base_model.model.{module}.lora_B.weight"] = B
                else:
                    A, B = self.randn(r, in_f), shared[0]
                    self.tensors[f"base_model.model.{module}.lora_A.weight"] = A
                self.expected.experts[(layer, proj, e)] = (A, B, self.scale(module, r))

    def fused_pre_0191(self, layer: int, projs: Sequence[str]) -> None:
        a, experts = self.arch, f"model.layers.{layer}.mlp.experts"
        sizes = {"gate_up": (a.hidden, 2 * a.moe_inter), "down": (a.moe_inter, a.hidden)}
        both = "gate" in projs and "down" in projs
        for proj in [p for p in ("gate_up", "down") if p in projs or (p == "gate_up" and "gate" in projs)]:
            r = self.r_of(f"{experts}.{proj}_proj")
            s = self.scale(f"{experts}.{proj}_proj", r)
            in_f, out_f = sizes[proj]
            a3, b3 = (
                self.randn(a.num_experts, r, out_f),
                self.randn(a.num_experts, in_f, r),
            )  # read [E, in, out]
            self.fused_pair(experts + (".base_layer" if both and proj == "gate_up" else ""), a3, b3)
            for e in range(
                a.num_experts
            ):  # delta (b3[e] @ a3[e]).T: A = b3[e].T [r, in], B = a3[e].T [out, r]
                lin_a, lin_b = b3[e].T, a3[e].T
                if proj == "down":
                    self.expected.experts[(layer, "down", e)] = (lin_a, lin_b, s)
                else:
                    self.expected.experts[(layer, "gate", e)] = (lin_a, lin_b[: a.moe_inter], s)
                    self.expected.experts[(layer, "up", e)] = (lin_a, lin_b[a.moe_inter :], s)

    def converted(self, layer: int, projs: Sequence[str]) -> None:
        """The per-expert draws, packed as PEFT's conversion packs them."""
        a, experts = self.arch, f"model.layers.{layer}.mlp.experts"
        big_r, r_down = self.r_of(f"{experts}.gate_up_proj"), self.r_of(f"{experts}.down_proj")
        assert big_r % 2 == 0, "the converted gate_up rank is twice the per-projection rank"
        fixed = {"gate": big_r // 2, "up": big_r // 2, "down": r_down}
        draws = self.per_expert(layer, range(a.num_experts), projs, fixed)
        if "gate" in projs:
            s = self.scale(f"{experts}.gate_up_proj", big_r)
            a3 = torch.stack(
                [torch.cat([draws["gate", e][0], draws["up", e][0]]) for e in range(a.num_experts)]
            )
            b3 = torch.stack(
                [torch.block_diag(draws["gate", e][1], draws["up", e][1]) for e in range(a.num_experts)]
            )
            self.fused_pair(experts + (".base_layer" if "down" in projs else ""), a3, b3)
            for e in range(a.num_experts):
                self.expected.experts[(layer, "gate", e)] = (*draws["gate", e], s)
                self.expected.experts[(layer, "up", e)] = (*draws["up", e], s)
        if "down" in projs:
            s = self.scale(f"{experts}.down_proj", r_down)
            a3 = torch.stack([draws["down", e][0] for e in range(a.num_experts)])
            b3 = torch.stack([draws["down", e][1] for e in range(a.num_experts)])
            self.fused_pair(experts, a3, b3)
            for e in range(a.num_experts):
                self.expected.experts[(layer, "down", e)] = (*draws["down", e], s)


def write_adapter(
    folder: Path,
    family: str,
    hf_config: Any,
    *,
    rank: int,
    alpha: float,
    form: str,
    seed: int,
    experts: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    dense_targets: Sequence[str] = ATTENTION,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    expert_projs: Sequence[str] = ("gate", "up", "down"),
) -> ExpectedLora:
    """Write adapter_config.json and adapter_model.safetensors to `folder`; return what they mean.

    experts / layers None = all; dense MLP targets are written in dense layers only, shared-expert targets in
    MoE layers only. The fused and converted forms cover every expert, and need gate and up together."""
    assert form in (*FORMS, *OTHER_FORMS, OLD_PEFT_FORM), form
    arch = _arch(family, hf_config)
    projs = [p for p in ("gate", "up", "down") if p in expert_projs]
    if form != "per_expert":
        assert experts is None, "the fused forms cover every expert"
        assert ("gate" in projs) == ("up" in projs), "the fused forms hold gate and up together"
    ranks, alphas = dict(rank_pattern or {}), dict(alpha_pattern or {})
    if form == "converted" and "gate" in projs:  # appended after the adapter's own patterns, as PEFT does
        ranks[r".*\.gate_up_proj"] = 2 * rank
        alphas[r".*\.gate_up_proj"] = 2 * alpha
    # PEFT saves the config with sorted keys, and matches patterns in the order they are read back.
    ranks, alphas = dict(sorted(ranks.items())), dict(sorted(alphas.items()))
    if arch.attention:  # latent attention: its own projections in place of q/k/v/o
        mla_for = MLA_FOR | ({"q_proj": ("q_proj",)} if "q_proj" in arch.attention else {})
        dense_targets = list(dict.fromkeys(m for t in dense_targets for m in mla_for.get(t, (t,))))
        dense_targets = [t for t in dense_targets if t not in MLA_ATTENTION or t in arch.attention]
    else:  # and none of them for the other models
        dense_targets = [t for t in dense_targets if t in ATTENTION or t not in MLA_ATTENTION]
    attention = tuple(arch.attention or ATTENTION)
    w = _Writer(arch, rank, alpha, seed, use_rslora, ranks, alphas)
    for layer in range(arch.layers) if layers is None else layers:
        moe = arch.moe_layers[layer]
        for target in dense_targets:
            shared = target.startswith("shared_expert.")
            if target in attention or (shared and moe and arch.shared_inter) or (not shared and not moe):
                w.dense(layer, target)
        if not moe or not projs:
            continue
        if form == "per_expert":
            w.per_expert(layer, range(arch.num_experts) if experts is None else experts, projs)
        else:
            getattr(w, form)(layer, projs)
    if form == "tinker":
        w.tensors = {k.replace(".self_attn.", ".attn."): v for k, v in w.tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w.tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = _peft_config(family, arch, rank, alpha, form, dense_targets, projs, use_rslora, ranks, alphas)
    if form == OLD_PEFT_FORM:
        config["peft_version"] = "0.18.1"
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return w.expected


def _peft_config(
    family: str,
    arch: _Arch,
    rank: int,
    alpha: float,
    form: str,
    dense_targets: Sequence[str],
    projs: Sequence[str],
    use_rslora: bool,
    ranks: dict,
    alphas: dict,
) -> dict[str, Any]:
    modules = [t if t in ATTENTION + MLA_ATTENTION else arch.module_of(t) for t in dense_targets]
    params = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}
    if form in ("per_expert", "shared_outer"):
        modules += [arch.expert_names[p] for p in projs]
        targets = None
    elif form == "tinker":
        modules += sorted({"gate": "w1", "up": "w3", "down": "w2"}[p] for p in projs)
        targets = None
    elif form == OLD_PEFT_FORM:
        targets = sorted({"mlp.experts." + params[p] for p in projs}) or None
    elif form in OTHER_FORMS:  # the trainers name the packed parameters as modules
        modules += sorted({params[p] for p in projs})
        targets = None
    else:  # PEFT writes the fused form's names as given, the converted form's as bare parameter names
        prefix = "mlp.experts." if form == "fused" else ""
        targets = sorted({prefix + params[p] for p in projs}) or None
    return {
        "alpha_pattern": alphas,
        "base_model_name_or_path": f"tiny-random-{family}",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "r": rank,
        "rank_pattern": ranks,
        "target_modules": sorted(modules),
        "target_parameters": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }


@torch.no_grad()
def merged_hf_model(hf_model: Any, expected: ExpectedLora) -> Any:
    """A deep copy of `hf_model` in float64 with W += scale * B @ A folded into every targeted weight."""
    model = copy.deepcopy(hf_model).to(torch.float64)
    layers = model.model.layers
    for (layer, target), (A, B, s) in expected.dense.items():
        owner = layers[layer].self_attn if target in ATTENTION + MLA_ATTENTION else layers[layer].mlp
        if hasattr(owner, "shared_experts"):  # GLM-4.5's name for the shared expert
            target = target.replace("shared_expert.", "shared_experts.", 1)
        for part in target.split("."):
            owner = getattr(owner, part)
        owner.weight += s * B.double() @ A.double()
    for (layer, proj, e), (A, B, s) in expected.experts.items():
        experts = layers[layer].mlp.experts
        inter = experts.down_proj.shape[-1]
        if proj == "down":
            experts.down_proj[e] += s * B.double() @ A.double()
        else:
            rows = slice(0, inter) if proj == "gate" else slice(inter, 2 * inter)
            experts.gate_up_proj[e, rows] += s * B.double() @ A.double()
    return model


MLP = ("gate_proj", "up_proj", "down_proj")
SHARED = tuple(f"shared_expert.{p}" for p in MLP)


def adapter_specs(num_experts: int) -> dict[str, dict[str, Any]]:
    """Three adapters of different ranks and forms; the rank-16 one covers half the experts (rsLoRA).

    Alphas keep each s * B @ A about half the size of the base weights: large enough to move the log-probs
    far beyond the tolerance, small enough that the merged model stays well conditioned (with deltas
    several times the base weights, fp32 rounding alone moves the reference's log-probs by ~3e-4)."""
    return {
        "r4-per-expert": dict(
            form="per_expert", rank=4, alpha=2.0, seed=1, dense_targets=ATTENTION + MLP + SHARED
        ),
        "r8-fused": dict(form="fused", rank=8, alpha=4.0, seed=2),
        "r16-half": dict(
            form="per_expert",
            rank=16,
            alpha=1.0,
            seed=3,
            experts=list(range(0, num_experts, 2)),
            dense_targets=("o_proj", "down_proj", "shared_expert.up_proj"),
            use_rslora=True,
            alpha_pattern={"o_proj": 2.0},
        ),
    }

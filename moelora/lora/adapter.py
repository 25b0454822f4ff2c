"""Read a LoRA adapter folder, check it against the base model and normalise it (design invariant 4).

Whatever the layout on disk (`FORMATS`; docs: reference/peft_moe_format.md and the README's table): PEFT's
per-expert keys, fused `target_parameters` form (both orientations PEFT versions wrote) or rank-2r
converted form, Megatron-Bridge's expert stacks and shared-outer export, NeMo Automodel's grouped experts,
Tinker's raw tensors, an adapter becomes A [r, in] and B [out, r] in fp32 per (layer, dense target), and
per (layer, gate|up|down, global expert id), with the scale (alpha / r, or alpha / sqrt(r) with rsLoRA,
after rank_pattern / alpha_pattern) folded into B. Every tensor is placed or refused, never skipped.
Reading is pure: an error leaves nothing changed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch
from safetensors import SafetensorError, safe_open

from moelora.loader.checkpoint import CheckpointError, _check_complete
from moelora.models.config import ModelConfig
from moelora.models.family import Family

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Latent attention's projections (DeepSeek-V2/V3), besides q_proj (when it has no q_a/q_b pair) and o_proj.
MLA_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
# Linear attention's projections (Gated DeltaNet layers, `linear_attn`): Qwen3-Next's, then Qwen3.5-MoE's.
FUSED_LINEAR_TARGETS = ("in_proj_qkvz", "in_proj_ba", "out_proj")
SPLIT_LINEAR_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
LINEAR_TARGETS = (*FUSED_LINEAR_TARGETS, *SPLIT_LINEAR_TARGETS[:-1])
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", *MLA_TARGETS)
DENSE_TARGETS = (
    *ATTENTION_TARGETS,
    "gate_proj",
    "up_proj",
    "down_proj",
    "shared_expert.gate_proj",
    "shared_expert.up_proj",
    "shared_expert.down_proj",
)
EXPERT_PROJS = ("gate", "up", "down")
# The on-disk layouts read, by the name `moelora adapter inspect` prints (docs: reference/peft_moe_format.md).
FORMATS = {
    "peft-linear": "PEFT LoRA on a linear layer (target_modules): lora_A [r, in], lora_B [out, r]",
    "peft-per-expert": "PEFT per-expert keys: experts.{e}.<gate|up|down>.lora_A [r, in] / lora_B [out, r]",
    "peft-fused": "PEFT target_parameters on the fused experts: lora_A [r*E, in] (expert-major rows), "
    "lora_B [out, r*E] (rank-major columns); gate and up share A",
    "peft-fused-pre-0.19.1": "PEFT 0.17-0.19.0 target_parameters on out-major experts (Qwen-style): the "
    "3-D parameter read as [E, in, out], so lora_A [r*E, out], lora_B [in, r*E], delta (B_e @ A_e).T",
    "peft-fused-2r": "PEFT's conversion of a per-expert adapter to target_parameters: gate_up at rank 2r "
    "with a block-diagonal B (split back to rank r per projection)",
    "megatron-3d": "Megatron-Bridge per-expert stacks under the packed names: experts.gate_up_proj / "
    "down_proj lora_A [E, r, in], lora_B [E, out, r] (gate_up: gate rows first; gate and up share A)",
    "tinker": "Tinker's raw expert LoRA: experts.w1 (gate) / w3 (up) lora_A [1, r, H] shared, "
    "lora_B [E, I, r]; experts.w2 (down) lora_A [E, r, I], lora_B [1, H, r] shared",
    "megatron-shared-outer": "Megatron-Bridge shared-outer: experts.<gate|up>_proj.lora_A [1, r, H] shared, "
    "per-expert lora_B; experts.down_proj.lora_B [1, H, r] shared, per-expert lora_A",
    "nemo-automodel": "NeMo Automodel grouped experts: experts.lora_gate_and_up_A [E, H, r] / _B [E, r, 2I] "
    "(gate columns first), experts.lora_down_A [E, I, r] / _B [E, r, H]; delta x @ A @ B",
    "unsloth-gpt-oss": "Unsloth's GPT-OSS experts as one linear layer each: experts.gate_up_projs.{e} "
    "lora_A [r, H] / lora_B [2I, r] (rows: gate and up interleaved), experts.down_projs.{e} lora_A [r, I] / "
    "lora_B [H, r]",
}
SERVED = (
    "q/k/v/o_proj, the dense MLP's and the shared expert's gate/up/down_proj, "
    "and the routed experts' gate/up/down"
)

# adapter_config.json fields (peft 0.21 LoraConfig) whose non-default values change what the adapter computes.
_REFUSED = {
    "use_dora": "DoRA (a learned magnitude per output row)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D base weights)",
    "lora_bias": "lora_bias (a bias on LoRA B)",
    "modules_to_save": "modules_to_save (fully trained module copies)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "layer_replication": "layer_replication (a model with repeated layers)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (pooled LoRA inputs)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "arrow_config": "Arrow routing between LoRA experts",
    "kasa_config": "KaSA (a singular-value diagonal and a truncated base weight)",
    "monteclora_config": "MonteCLoRA (sampled LoRA weights)",
}
# Fields that do not change what a trained adapter computes at inference (checked ones are parsed below).
_HARMLESS_WORDS = (
    "task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode r "
    "lora_alpha use_rslora rank_pattern alpha_pattern target_modules target_parameters exclude_modules "
    "lora_dropout bias init_lora_weights layers_to_transform layers_pattern megatron_config megatron_core "
    "loftq_config eva_config corda_config lora_ga_config velora_config qalora_group_size runtime_config "
    "ensure_weight_tying"
)
_HARMLESS = frozenset(_HARMLESS_WORDS.split())
# init_lora_weights values that leave the base weights untouched (PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA
# rewrite them, so their adapters only fit the rewritten model).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")

_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight")
# NeMo Automodel's grouped-expert parameters, as its adapters name them (no .weight suffix)
_GROUPED_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<experts>.+\.experts)\.lora_(?P<proj>gate_and_up|down)_(?P<ab>[AB])(?:\.weight)?"
)
_VELORA_BUFFER = re.compile(r".+\.lora_velora_embed(?:\.[^.]+)?")  # VeLoRA's training-only buffer
_LAYER = re.compile(r"model\.(?:language_model\.)?layers\.(\d+)\.(.+)")  # (a multimodal model's text model)
# Tinker and ART name GPT-OSS's attention `attn`; Qwen3-Next's linear layers are `linear_attn`
_ATTN = re.compile(rf"(?:self_attn|attn|linear_attn)\.({'|'.join((*ATTENTION_TARGETS, *LINEAR_TARGETS))})")


@dataclass(frozen=True)
class LoraWeights:
    """One projection's LoRA: delta W = B @ A, the scale already folded into B."""

    A: torch.Tensor  # [r, in] float32
    B: torch.Tensor  # [out, r] float32

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def num_bytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()


@dataclass
class LoraAdapter:
    """An adapter in canonical form; a projection without an entry has no LoRA."""

    name: str
    source: Any  # the folder (Path) or the DummyLora it was made from (see lora/source.py)
    dense: dict[tuple[int, str], LoraWeights]  # (layer, target in DENSE_TARGETS or LINEAR_TARGETS)
    experts: dict[tuple[int, str], dict[int, LoraWeights]]  # (layer, proj in EXPERT_PROJS) -> {global id: w}
    # (size, mtime_ns) of the config and weights files as read: a later re-read (after a CPU-cache
    # eviction, or on another rank) must find the same files, or it would serve different weights.
    fingerprint: tuple[int, ...] = ()
    formats: dict[str, int] = field(default_factory=dict)  # on-disk layout (FORMATS) -> A/B pairs read

    @property
    def rank(self) -> int:
        """The largest per-projection rank (0 for an adapter without tensors)."""
        return max((w.rank for w in self.weights()), default=0)

    @property
    def num_bytes(self) -> int:
        """Bytes of the normalised tensors (gate and up count their shared A twice, as a slot stores it)."""
        return sum(w.num_bytes for w in self.weights())

    def weights(self) -> Iterator[LoraWeights]:
        """Every projection's weights, dense then per expert."""
        yield from self.dense.values()
        for per_expert in self.experts.values():
            yield from per_expert.values()


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the adapter, the tensor or field, and the fix."""


def check_rank(name: str, rank: int, max_rank: int | None, where: str = "") -> None:
    """AdapterError unless an adapter of `rank` fits slots of `max_rank` (None: any does). The one rank
    rule, wherever an adapter enters: read, drawn, registered, written into a slot."""
    if max_rank is not None and rank > max_rank:
        raise AdapterError(
            f"adapter '{name}': rank {rank}{where} is above max_lora_rank {max_rank}: raise max_lora_rank "
            f"to at least {rank} (or retrain the adapter at a lower rank)"
        )


@dataclass(frozen=True)
class _Options:
    """The adapter_config.json fields that decide ranks and scales."""

    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_parameters: tuple[str, ...]
    peft_version: tuple[int, ...] | None  # from adapter_config.json, None where it is not recorded


@dataclass(frozen=True)
class _Site:
    """Where one A/B pair applies: kind dense (target), expert (proj, expert) or fused (gate_up|down)."""

    kind: str
    layer: int
    target: str
    module: str  # the module name rank_pattern / alpha_pattern keys are matched against
    expert: int = -1


_Dest = tuple[int, str, int]  # (layer, dense target or expert proj, global expert id or -1)


def read_adapter(
    name: str,
    path: str | Path,
    cfg: ModelConfig,
    family: Family,
    max_rank: int | None = None,
    owns_expert: Callable[[int], bool] | None = None,
) -> LoraAdapter:
    """The adapter in folder `path` for the base model `cfg`, normalised; AdapterError if not servable.

    `owns_expert`: read per-expert tensors only for the experts it accepts (an EP rank's own); the others
    are not even read from disk. Fused 3-D tensors are read whole. The whole adapter must have been
    validated elsewhere (rank 0 reads it all) since skipped tensors are not checked here.
    """
    return _Reader(name, Path(path), cfg, family, owns_expert).read(max_rank)


def file_fingerprint(folder: Path) -> tuple[int, ...]:
    """(size, mtime_ns) of the adapter's two files; () if one cannot be read (reading then reports why)."""
    try:
        stats = [(folder / f).stat() for f in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return ()
    return tuple(v for st in stats for v in (st.st_size, st.st_mtime_ns))


def reread_adapter(
    name: str,
    path: Path,
    fingerprint: tuple[int, ...],
    cfg: ModelConfig,
    family: Family,
    max_rank: int,
    owns_expert: Callable[[int], bool] | None = None,
) -> LoraAdapter:
    """Read an adapter again and check that its files are the ones first read (AdapterError if not)."""
    adapter = read_adapter(name, path, cfg, family, max_rank, owns_expert)
    if adapter.fingerprint != fingerprint:
        raise AdapterError(
            f"adapter '{name}': the files in '{path}' changed since it was loaded, so it can no longer be "
            f"served consistently; load the new version under a new name (or unload and load it again)"
        )
    return adapter


_PATTERN_TIMEOUT_S = 0.05  # per match: a config's regex must not stall loading (catastrophic backtracking)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key p such that `(.*\\.)?(p)$` matches.
    ValueError if a key takes too long to match (the matcher is bounded in time)."""
    for key, value in patterns.items():
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=_PATTERN_TIMEOUT_S):
                return value
        except TimeoutError:
            raise ValueError(
                f"pattern {key[:64]!r} takes too long to match (catastrophic backtracking): simplify it"
            ) from None
    return default


def read_adapter_config(folder: Path, fail: Callable[[str], AdapterError]) -> dict[str, Any]:
    """The JSON object in `folder`'s adapter_config.json, or `fail`'s error saying what is wrong."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise fail(f"no {CONFIG_FILE} in {folder}: is it a PEFT adapter folder?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(f"{path} is not valid JSON ({e}): save the adapter again") from e
    if not isinstance(raw, dict):
        raise fail(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return raw


class _Reader:
    def __init__(
        self,
        name: str,
        folder: Path,
        cfg: ModelConfig,
        family: Family,
        owns_expert: Callable[[int], bool] | None = None,
    ) -> None:
        self.name, self.folder, self.cfg, self.owns_expert = name, folder, cfg, owns_expert
        self.skipped = 0  # per-expert tensors of experts `owns_expert` rejects, left unread
        self.in_major = family.experts_in_major  # GPT-OSS: [E, in, out] experts, gate/up interleaved
        self.unsloth_re = re.compile(r"mlp\.experts\.(gate_up_projs|down_projs)\.(\d+)")
        prefixes = "|".join(re.escape(p) for p in family.moe_prefixes)
        names = family.expert_names
        self.proj_of = {names.gate: "gate", names.up: "up", names.down: "down"}
        projs = "|".join(re.escape(n) for n in self.proj_of)
        self.expert_re = re.compile(rf"({prefixes})\.experts\.(\d+)\.({projs})")
        self.fused_re = re.compile(rf"({prefixes})\.experts(\.base_layer)?")
        # One 3-D pair of all experts per parameter (Megatron-Bridge: the packed names; Tinker: w1 gate,
        # w3 up, w2 down; or the checkpoint's own names)
        self.stacked_proj = {"gate_up_proj": "gate_up", "down_proj": "down"}
        self.stacked_proj |= {"w1": "gate", "w3": "up", "w2": "down"} | self.proj_of
        names_3d = "|".join(re.escape(n) for n in self.stacked_proj)
        self.stacked_re = re.compile(rf"({prefixes})\.experts\.({names_3d})")
        self.grouped_re = re.compile(rf"({prefixes})\.experts\.lora_(gate_and_up|down)")
        self.outer_re = re.compile(rf"({prefixes})\.experts\.({projs})")
        self.shared: set[str] = set()  # modules whose A or B is a shared-outer tensor of all experts
        # A dense MLP's or the shared expert's projections (the shared expert under the family's name,
        # "shared_expert." in the targets whatever the family calls it)
        shared_name = re.escape(family.shared_expert_name)
        self.mlp_re = re.compile(rf"mlp\.(?:({shared_name})\.)?((?:gate|up|down)_proj)")

    def fail(self, message: str) -> AdapterError:
        return AdapterError(f"adapter '{self.name}': {message}")

    def read(self, max_rank: int | None) -> LoraAdapter:
        if not self.folder.is_dir():
            what = "is not a directory" if self.folder.exists() else "does not exist"
            raise self.fail(
                f"'{self.folder}' {what}: an adapter is a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        fingerprint = file_fingerprint(self.folder)
        self.opts = _parse_options(read_adapter_config(self.folder, self.fail), self.fail)
        self.tensors = self._tensors()
        adapter = LoraAdapter(self.name, self.folder, {}, {}, fingerprint)
        origin: dict[_Dest, str] = {}
        for module, (a_key, b_key) in self._pairs().items():
            fmt, placed = self._normalise(self._site(module, a_key), a_key, b_key)
            for dest, weights in placed:
                self._place(adapter, dest, weights, a_key, origin)
            adapter.formats[fmt] = adapter.formats.get(fmt, 0) + 1
        if not origin and not self.skipped:
            raise self.fail(f"{self.folder / WEIGHTS_FILE} holds no LoRA tensors")
        if max_rank is not None and adapter.rank > max_rank:
            key = next(origin[d] for d in origin if _lookup(adapter, d).rank == adapter.rank)
            check_rank(self.name, adapter.rank, max_rank, f" in '{key}'")
        return adapter

    def _tensors(self) -> dict[str, torch.Tensor]:
        path = self.folder / WEIGHTS_FILE
        if not path.is_file():
            found = (
                " (there is an adapter_model.bin" if (self.folder / "adapter_model.bin").exists() else " ("
            )
            raise self.fail(
                f"no {WEIGHTS_FILE} in {self.folder}{found}; adapter_model.bin is not read: save the adapter "
                f"with safetensors, e.g. save_pretrained(..., safe_serialization=True))"
            )
        try:
            _check_complete(path)
            with safe_open(str(path), framework="pt") as f:
                keys = [k for k in f.keys() if self._wanted(k)]  # noqa: SIM118 (safe_open has no __iter__)
                return {k: f.get_tensor(k) for k in keys}
        except CheckpointError as e:
            raise self.fail(str(e).replace("checkpoint file", "file")) from e
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise self.fail(f"'{path}' cannot be read as safetensors ({e}): copy or save it again") from e

    def _wanted(self, key: str) -> bool:
        if self.owns_expert is None:
            return True
        m = self.expert_re.search(key)
        expert = None if m is None else int(m.group(2))
        if m is None and self.in_major and (u := self.unsloth_re.search(key)):
            expert = int(u.group(2))
        if expert is None or self.owns_expert(expert):
            return True
        self.skipped += 1
        return False

    def _pairs(self) -> dict[str, tuple[str, str]]:
        """module -> (lora_A key, lora_B key); every other tensor is an error. A shared-outer half (one A or
        B under `experts.<proj>`, no expert index) pairs with the other half of every expert's module."""
        found: dict[str, dict[str, str]] = {}
        for key in sorted(self.tensors):
            if _VELORA_BUFFER.fullmatch(key):
                continue
            if g := _GROUPED_KEY.fullmatch(key):
                module, ab_name = f"{g['experts']}.lora_{g['proj']}", f"lora_{g['ab']}"
            elif m := _KEY.fullmatch(key):
                module, ab_name = m["module"], m["ab"]
            else:
                raise self._unserved(
                    key, "it is not a LoRA A/B weight (an embedding LoRA, a bias, a DoRA vector?)"
                )
            ab = found.setdefault(module, {})
            if ab_name in ab:
                raise self.fail(
                    f"'{ab[ab_name]}' and '{key}' are both {ab_name} of '{module}' (two adapters in one "
                    f"file?): keep one"
                )
            ab[ab_name] = key
        self._pair_shared_outer(found)
        for module, ab in found.items():
            if len(ab) == 1:
                (have, key), want = next(iter(ab.items())), "lora_B" if "lora_A" in ab else "lora_A"
                raise self.fail(f"'{key}' ({have}) has no {want} for '{module}': the file is incomplete")
        return {module: (ab["lora_A"], ab["lora_B"]) for module, ab in found.items()}

    def _expert_of(self, module: str, experts: str, proj: str) -> bool:
        """Whether `module` is one expert's `proj` under the `experts` module path."""
        m = _LAYER.fullmatch(module)
        return (
            m is not None
            and module.startswith(f"{experts}.")
            and (t := self.expert_re.fullmatch(m[2])) is not None
            and t[3] == proj
        )

    def _pair_shared_outer(self, found: dict[str, dict[str, str]]) -> None:
        """Give every expert module holding one half the shared other half of `experts.<proj>` (Megatron-
        Bridge's shared-outer export: a leading dimension of 1), in place; the shared entry goes."""
        for module, ab in list(found.items()):
            m = _LAYER.fullmatch(module)
            if len(ab) != 1 or m is None or not (t := self.outer_re.fullmatch(m[2])):
                continue
            (have, key), want = next(iter(ab.items())), "lora_B" if "lora_A" in ab else "lora_A"
            experts = module.rsplit(".", 1)[0]
            partners = [
                p for p, pab in found.items() if set(pab) == {want} and self._expert_of(p, experts, t[2])
            ]
            if not partners and not self.skipped:
                continue  # reported as incomplete
            tensor = self.tensors[key]
            if tensor.dim() != 3 or tensor.shape[0] != 1:
                raise self.fail(
                    f"'{key}' has shape {list(tensor.shape)}: a LoRA {have} shared by every expert "
                    f"(Megatron-Bridge shared-outer) has a leading dimension of 1"
                )
            self.tensors[key] = tensor[0]
            for p in partners:
                found[p][have] = key
                self.shared.add(p)
            del found[module]

    def _unserved(self, key: str, why: str) -> AdapterError:
        if self.in_major and ".experts." in key:  # (Unsloth's gate_up_projs.{i}, per-expert expansions)
            return self.fail(
                f"tensor '{key}' cannot be served: {why}. The routed experts of {self.cfg.architecture} are "
                f"read in PEFT's target_parameters form (lora_A/lora_B under mlp.experts and "
                f"mlp.experts.base_layer): save the adapter with PEFT's target_parameters"
            )
        return self.fail(
            f"tensor '{key}' cannot be served: {why}. moelora serves LoRA on {SERVED}: retrain the adapter "
            f"on those targets only"
        )

    def _site(self, module: str, key: str) -> _Site:
        m = _LAYER.fullmatch(module)
        if m is None:
            raise self._unserved(key, f"'{module}' is not a target moelora serves")
        layer, rest, cfg = int(m[1]), m[2], self.cfg
        if layer >= cfg.num_layers:
            raise self.fail(
                f"'{key}' is for layer {layer}, but the base model has {cfg.num_layers} layers: "
                f"an adapter for another model?"
            )
        if t := _ATTN.fullmatch(rest):
            if t[1] not in attention_targets(cfg, layer):
                raise self.fail(
                    f"'{key}' targets {t[1]}, which layer {layer}'s attention does not have (it has "
                    f"{', '.join(attention_targets(cfg, layer))})"
                )
            return _Site("dense", layer, t[1], module)
        if t := self.mlp_re.fullmatch(rest):
            target = f"shared_expert.{t[2]}" if t[1] else t[2]
            return _Site("dense", layer, self._mlp_target(layer, target, key), module)
        if t := self.expert_re.fullmatch(rest):
            expert = self._expert_id(layer, int(t[2]), key)
            return _Site("expert", layer, self.proj_of[t[3]], module, expert)
        if self.in_major and (t := self.unsloth_re.fullmatch(rest)):
            expert = self._expert_id(layer, int(t[2]), key)
            return _Site("unsloth", layer, "gate_up" if t[1] == "gate_up_projs" else "down", module, expert)
        if t := self.stacked_re.fullmatch(rest):
            self._expert_id(layer, 0, key)
            return _Site("stacked", layer, self.stacked_proj[t[2]], module)
        if t := self.grouped_re.fullmatch(rest):
            self._expert_id(layer, 0, key)
            proj = "gate_up" if t[2] == "gate_and_up" else "down"
            return _Site("grouped", layer, proj, f"{module.rsplit('.', 1)[0]}.{proj}_proj")
        if t := self.fused_re.fullmatch(rest):
            self._expert_id(layer, 0, key)
            experts = module.removesuffix(".base_layer")
            proj = self._fused_proj(experts, t[2] is not None, key)
            return _Site("fused", layer, proj, f"{experts}.{proj}_proj")
        raise self._unserved(key, f"'{rest}' is not a target moelora serves")

    def _mlp_target(self, layer: int, target: str, key: str) -> str:
        moe = self.cfg.moe_layers[layer]
        if target.startswith("shared_expert."):
            if not self.cfg.shared_expert_intermediate_size:
                raise self.fail(f"'{key}' targets a shared expert, which the base model does not have")
            if not moe:
                raise self.fail(f"'{key}' targets a shared expert, but layer {layer} is a dense-MLP layer")
        elif moe:
            raise self.fail(f"'{key}' targets a dense MLP, but layer {layer} is a MoE layer (routed experts)")
        return target

    def _expert_id(self, layer: int, expert: int, key: str) -> int:
        if not self.cfg.moe_layers[layer]:
            raise self.fail(f"'{key}' targets routed experts, but layer {layer} is a dense-MLP layer")
        if expert >= self.cfg.num_experts:
            raise self.fail(
                f"'{key}' is for expert {expert}, but the base model has {self.cfg.num_experts} experts "
                f"per layer: an adapter for another model?"
            )
        return expert

    def _fused_proj(self, experts: str, nested: bool, key: str) -> str:
        """Which 3-D parameter a fused pair adapts, from target_parameters (`experts.lora_*` is ambiguous).

        With both targeted, PEFT nests the first-registered parameter, gate_up_proj, as `base_layer`."""
        targets = self.opts.target_parameters
        hit = [p for p in ("gate_up", "down") if _targets(targets, f"{experts}.{p}_proj")]
        if len(hit) == 2:
            return "gate_up" if nested else "down"
        if len(hit) == 1 and not nested:
            return hit[0]
        raise self.fail(
            f"'{key}' is a fused expert LoRA, but target_parameters {list(targets)} in {CONFIG_FILE} "
            f"does not tell whether it adapts '{experts}.gate_up_proj' or '{experts}.down_proj': "
            f"list the targeted expert parameters there"
        )

    def _normalise(self, site: _Site, a_key: str, b_key: str) -> tuple[str, list[tuple[_Dest, LoraWeights]]]:
        """(the FORMATS name of the pair, its weights by destination)."""
        cfg = self.cfg
        if site.kind == "dense":
            in_f, out_f = dense_shape(cfg, site.target)
            A, B = self._checked(a_key, b_key, in_f, out_f, 1, f"{site.target} of layer {site.layer}")
            s = self._scale(site.module, A.shape[0], a_key)
            return "peft-linear", [((site.layer, site.target, -1), LoraWeights(A, B * s))]
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        if site.kind == "expert":
            in_f, out_f = (inter, hidden) if site.target == "down" else (hidden, inter)
            what = f"expert {site.expert}'s {site.target} in layer {site.layer}"
            A, B = self._checked(a_key, b_key, in_f, out_f, 1, what)
            s = self._scale(site.module, A.shape[0], a_key)
            fmt = "megatron-shared-outer" if site.module in self.shared else "peft-per-expert"
            return fmt, [((site.layer, site.target, site.expert), LoraWeights(A, B * s))]
        n_exp = cfg.num_experts
        in_f, out_f = (inter, hidden) if site.target == "down" else (hidden, 2 * inter)
        if site.target in ("gate", "up"):
            out_f = inter
        if site.kind == "unsloth":  # one linear layer per expert, gate_up's rows interleaved
            what = f"expert {site.expert}'s {site.target} in layer {site.layer}"
            A, B = self._checked(a_key, b_key, in_f, out_f, 1, what)
            B = B * self._scale(site.module, A.shape[0], a_key)
            if site.target == "down":
                return "unsloth-gpt-oss", [((site.layer, "down", site.expert), LoraWeights(A, B))]
            gate, up = LoraWeights(A, B[0::2].contiguous()), LoraWeights(A, B[1::2].contiguous())
            dests = [((site.layer, "gate", site.expert), gate), ((site.layer, "up", site.expert), up)]
            return "unsloth-gpt-oss", dests
        if self.in_major and site.kind != "fused":
            raise self.fail(
                f"'{a_key}': this model's experts ({cfg.architecture}) are read in PEFT's target_parameters "
                f"form only ({FORMATS['peft-fused']}); per-expert and stacked expert layouts are not read "
                f"for it yet: save the adapter with PEFT's target_parameters"
            )
        if site.kind in ("stacked", "grouped"):
            a3, b3 = self._stacked(site, a_key, b_key, in_f, out_f)
            s = self._scale(site.module, a3.shape[1], a_key)
            fmt = "nemo-automodel" if site.kind == "grouped" else "megatron-3d"
            if site.module.rsplit(".", 1)[1] in ("w1", "w2", "w3"):
                fmt = "tinker"
            if site.target != "gate_up":
                return fmt, [
                    ((site.layer, site.target, e), LoraWeights(a3[e], b3[e] * s)) for e in range(n_exp)
                ]
            return fmt, _split_gate_up(site.layer, a3, b3 * s, inter)[1]
        # PEFT has always read an in-major [E, in, out] parameter (GPT-OSS) the right way round.
        old = False if self.in_major else self._before_0191(a_key, b_key, in_f, out_f)
        rows_f, cols_f = (out_f, in_f) if old else (in_f, out_f)  # lora_A's columns, lora_B's rows
        A, B = self._checked(
            a_key, b_key, rows_f, cols_f, n_exp, f"the experts' {site.target} in layer {site.layer}"
        )
        rank = A.shape[0] // n_exp
        self._check_expert_count(site.module, A.shape[0], n_exp, a_key)
        s = self._scale(site.module, rank, a_key)
        a3 = A.view(n_exp, rank, rows_f)  # expert-major rows
        b3 = B.view(cols_f, rank, n_exp).permute(2, 0, 1)  # rank-major columns j * E + e -> [E, cols_f, r]
        if old:  # delta W[e] = (b3[e] @ a3[e]).T: the LoRA A [r, in] is b3[e].T, its B [out, r] a3[e].T
            a3, b3 = b3.transpose(1, 2).contiguous(), a3.transpose(1, 2)
        b3 = b3 * s
        fmt = "peft-fused-pre-0.19.1" if old else "peft-fused"
        if site.target == "down":
            down = [((site.layer, "down", e), LoraWeights(a3[e], b3[e].contiguous())) for e in range(n_exp)]
            return fmt, down
        if self.in_major:  # B's rows follow the interleaved columns (gate even, up odd): gate rows first
            b3 = torch.cat((b3[:, 0::2], b3[:, 1::2]), dim=1)
        split, placed = _split_gate_up(site.layer, a3, b3, inter)
        return "peft-fused-2r" if split else fmt, placed

    def _before_0191(self, a_key: str, b_key: str, in_f: int, out_f: int) -> bool:
        """Whether a fused pair is in the orientation of PEFT 0.17-0.19.0, which read an out-major 3-D
        parameter [E, out, in] as [E, in, out] (lora_A [r*E, out], lora_B [in, r*E]). Decided by the
        shapes; where both fit (in == out) by the peft_version the config records, refused without one."""
        A, B = self.tensors[a_key], self.tensors[b_key]
        if A.dim() != 2 or B.dim() != 2:
            return False
        new = A.shape[1] == in_f and B.shape[0] == out_f
        old = A.shape[1] == out_f and B.shape[0] == in_f
        if not (new and old):
            return old
        version = self.opts.peft_version
        if version is None:
            raise self.fail(
                f"'{a_key}' {list(A.shape)} and '{b_key}' {list(B.shape)} fit both orientations PEFT has "
                f"written fused experts in (before 0.19.1: lora_A [r*E, out]; since: lora_A [r*E, in]; "
                f"here in = out = {in_f}), and {CONFIG_FILE} records no peft_version: add the PEFT "
                f'version that saved it as "peft_version"'
            )
        return version < (0, 19, 1)

    def _stacked(
        self, site: _Site, a_key: str, b_key: str, in_f: int, out_f: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A [E, r, in] and B [E, out, r] (fp32, contiguous) of a 3-D per-expert pair: Megatron-Bridge's
        stacks as they are, NeMo Automodel's [E, in, r] / [E, r, out] transposed; or an error naming both
        shapes and the layout they were read as."""
        A, B = self.tensors[a_key], self.tensors[b_key]
        n_exp = self.cfg.num_experts
        if site.kind == "grouped" and A.dim() == 3 and B.dim() == 3:
            A, B = A.transpose(1, 2), B.transpose(1, 2)
        rank = A.shape[1] if A.dim() == 3 else 0
        if site.kind == "stacked" and A.dim() == 3 and B.dim() == 3:  # a leading 1: shared by every expert
            A = A.expand(n_exp, *A.shape[1:]) if A.shape[0] == 1 else A
            B = B.expand(n_exp, *B.shape[1:]) if B.shape[0] == 1 else B
        if A.dim() != 3 or B.dim() != 3 or A.shape != (n_exp, rank, in_f) or B.shape != (n_exp, out_f, rank):
            layout = (
                f"[E, {in_f}, r] and [E, r, {out_f}]" if site.kind == "grouped"
                else f"[E or 1, r, {in_f}] and [E or 1, {out_f}, r]"
            )  # fmt: skip
            raise self.fail(
                f"'{a_key}' has shape {list(self.tensors[a_key].shape)} and '{b_key}' "
                f"{list(self.tensors[b_key].shape)}, but the experts' {site.target} in layer {site.layer} "
                f"({FORMATS['megatron-3d' if site.kind == 'stacked' else 'nemo-automodel']}) needs {layout} "
                f"with E = {n_exp}: an adapter for another model, or another layout?"
            )
        self._check_values((a_key, A), (b_key, B))
        return A.float().contiguous(), B.float().contiguous()

    def _check_values(self, *tensors: tuple[str, torch.Tensor]) -> None:
        """Floating point and finite, or an error naming the tensor."""
        for key, t in tensors:
            if not t.is_floating_point():
                raise self.fail(f"'{key}' has dtype {t.dtype}, not a floating-point type: save it again")
            if not torch.isfinite(t).all():
                raise self.fail(
                    f"'{key}' contains NaN or Inf values: the adapter is corrupt, retrain or re-export it"
                )

    def _check_expert_count(self, module: str, rows: int, n_exp: int, key: str) -> None:
        """A fused tensor of r * E rows with another E than this model's: name the shape mismatch (a rank
        error would blame the config)."""
        try:
            r = pattern_value(self.opts.rank_pattern, module, self.opts.r)
        except ValueError:
            return  # reported by _scale
        if rows != r * n_exp and rows % r == 0:
            raise self.fail(
                f"'{key}' holds the LoRA of {rows // r} experts (rank {r}), but this model has {n_exp} "
                f"routed experts per layer: the adapter belongs to another model"
            )

    def _checked(
        self, a_key: str, b_key: str, in_f: int, out_f: int, n_exp: int, what: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r * n_exp, in_f] and B [out_f, r * n_exp] as fp32, or an error naming both shapes."""
        A, B = self.tensors[a_key], self.tensors[b_key]
        rows = A.shape[0] if A.dim() == 2 else 0
        if (
            A.dim() != 2
            or B.dim() != 2
            or rows == 0
            or rows % n_exp
            or (A.shape[1], B.shape)
            != (
                in_f,
                (out_f, rows),
            )
        ):
            r = "r" if n_exp == 1 else f"r*{n_exp}"
            raise self.fail(
                f"'{a_key}' has shape {list(A.shape)} and '{b_key}' {list(B.shape)}, but {what} of the base "
                f"model needs lora_A [{r}, {in_f}] and lora_B [{out_f}, {r}]: an adapter for another model?"
            )
        self._check_values((a_key, A), (b_key, B))
        return A.float().contiguous(), B.float()

    def _scale(self, module: str, rank: int, key: str) -> float:
        opts = self.opts
        try:
            r = pattern_value(opts.rank_pattern, module, opts.r)
            alpha = pattern_value(opts.alpha_pattern, module, opts.alpha)
        except ValueError as e:
            raise self.fail(f"{CONFIG_FILE}: rank_pattern / alpha_pattern: {e}") from e
        if rank != r:
            raise self.fail(
                f"'{key}' has rank {rank}, but {CONFIG_FILE} gives '{module}' r = {r} (r / rank_pattern): "
                f"the config does not belong to these weights"
            )
        return alpha / math.sqrt(r) if opts.rslora else alpha / r

    def _place(
        self, adapter: LoraAdapter, dest: _Dest, weights: LoraWeights, key: str, origin: dict[_Dest, str]
    ) -> None:
        layer, target, expert = dest
        if dest in origin:
            where = f"expert {expert}'s {target}" if expert >= 0 else target
            raise self.fail(f"'{origin[dest]}' and '{key}' both adapt {where} in layer {layer}: keep one")
        origin[dest] = key
        if expert < 0:
            adapter.dense[(layer, target)] = weights
        else:
            adapter.experts.setdefault((layer, target), {})[expert] = weights


def _split_gate_up(
    layer: int, a3: torch.Tensor, b3: torch.Tensor, inter: int
) -> tuple[bool, list[tuple[_Dest, LoraWeights]]]:
    """Fused gate_up (a3 [E, R, H], b3 [E, 2I, R], scaled) -> (whether split back to rank R/2, gate and up
    per expert).

    PEFT's conversion of a per-expert adapter stacks gate's and up's A (rank R = 2r) under a block-diagonal B;
    when the off-diagonal blocks are exactly zero for every expert it splits back to rank r per projection.
    Otherwise gate and up share the rank-R A (exact too)."""
    rank = a3.shape[1]
    half = rank // 2
    split = rank % 2 == 0 and not b3[:, :inter, half:].any() and not b3[:, inter:, :half].any()
    gate_rows, up_rows = (slice(0, half), slice(half, rank)) if split else (slice(None), slice(None))
    out: list[tuple[_Dest, LoraWeights]] = []
    for e in range(a3.shape[0]):
        gate = LoraWeights(a3[e, gate_rows].contiguous(), b3[e, :inter, gate_rows].contiguous())
        up = LoraWeights(a3[e, up_rows].contiguous(), b3[e, inter:, up_rows].contiguous())
        out += [((layer, "gate", e), gate), ((layer, "up", e), up)]
    return split, out


def attention_targets(cfg: ModelConfig, layer: int = 0) -> tuple[str, ...]:
    """The attention projections of layer `layer` of this model that an adapter may target."""
    if cfg.linear is not None and cfg.linear.layers[layer]:
        return FUSED_LINEAR_TARGETS if cfg.linear.fused_projections else SPLIT_LINEAR_TARGETS
    m = cfg.mla
    if m is None:
        return ("q_proj", "k_proj", "v_proj", "o_proj")
    q = ("q_proj",) if m.q_lora_rank is None else ("q_a_proj", "q_b_proj")
    return (*q, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def dense_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) features of a dense target."""
    hidden, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = {
        "q_proj": (hidden, 2 * q_out if cfg.attn_output_gate else q_out),  # (Qwen3-Next: and its gate)
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
    }
    if (m := cfg.mla) is not None:
        heads = cfg.num_heads
        attn["o_proj"] = (heads * m.v_head_dim, hidden)
        attn["q_a_proj"] = (hidden, m.q_lora_rank or 0)
        attn["q_b_proj"] = (m.q_lora_rank or 0, heads * m.qk_head_dim)
        attn["kv_a_proj_with_mqa"] = (hidden, m.kv_lora_rank + m.qk_rope_head_dim)
        attn["kv_b_proj"] = (m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim))
    if (la := cfg.linear) is not None:
        attn["in_proj_qkvz"] = (hidden, 2 * la.key_dim + 2 * la.value_dim)
        attn["in_proj_ba"] = (hidden, 2 * la.num_v_heads)
        attn["in_proj_qkv"] = (hidden, la.conv_dim)
        attn["in_proj_z"] = (hidden, la.value_dim)
        attn["in_proj_b"] = attn["in_proj_a"] = (hidden, la.num_v_heads)
        attn["out_proj"] = (la.value_dim, hidden)
    if target in attn:
        return attn[target]
    shared = target.startswith("shared_expert.")
    inter = cfg.shared_expert_intermediate_size if shared else cfg.dense_intermediate_size
    return (inter, hidden) if target.endswith("down_proj") else (hidden, inter)


def _targets(target_parameters: tuple[str, ...], name: str) -> bool:
    """PEFT's target_parameters match: the full name or a dotted suffix of it."""
    return any(name == t or name.endswith(f".{t}") for t in target_parameters)


def _lookup(adapter: LoraAdapter, dest: _Dest) -> LoraWeights:
    layer, target, expert = dest
    return adapter.dense[(layer, target)] if expert < 0 else adapter.experts[(layer, target)][expert]


def _parse_options(raw: dict[str, Any], fail: Callable[[str], AdapterError]) -> _Options:
    """The rank and scale settings of adapter_config.json; an error for every option that changes the math."""
    _refuse_options(raw, fail)
    r, alpha, rslora = raw.get("r", 8), raw.get("lora_alpha", 8), raw.get("use_rslora", False)
    if not _is_rank(r):
        raise fail(f"{CONFIG_FILE} field 'r' must be a positive integer, found {r!r}: fix the config")
    if not _is_number(alpha):
        raise fail(f"{CONFIG_FILE} field 'lora_alpha' must be a number, found {alpha!r}: fix the config")
    if not isinstance(rslora, bool):
        raise fail(
            f"{CONFIG_FILE} field 'use_rslora' must be true or false, found {rslora!r}: fix the config"
        )
    targets = raw.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise fail(f"{CONFIG_FILE} field 'target_parameters' must be a list of names, found {targets!r}")
    return _Options(
        r,
        float(alpha),
        rslora,
        _pattern(raw, "rank_pattern", _is_rank, fail),
        _pattern(raw, "alpha_pattern", _is_number, fail),
        tuple(targets),
        _version(raw.get("peft_version")),
    )


def _refuse_options(raw: dict[str, Any], fail: Callable[[str], AdapterError]) -> None:
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise fail(
            f"{CONFIG_FILE} says peft_type '{peft_type}': moelora serves LoRA adapters (peft_type LORA) only"
        )
    for option, what in _REFUSED.items():
        if not _is_default(raw.get(option)):
            raise fail(
                f"{CONFIG_FILE} sets {option} = {raw[option]!r}: {what} is not supported; "
                f"train a plain LoRA adapter instead"
            )
    if raw.get("bias", "none") != "none":
        raise fail(
            f"{CONFIG_FILE} sets bias = {raw['bias']!r}: trained base-model biases are not served; "
            f"retrain with bias='none'"
        )
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _PLAIN_INITS:
        raise fail(
            f"{CONFIG_FILE} sets init_lora_weights = {init!r}, which rewrites the base weights: "
            f"convert the adapter to a plain LoRA (PEFT's save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...)) first"
        )
    unknown = sorted(k for k in raw if k not in _HARMLESS and k not in _REFUSED and not _is_default(raw[k]))
    if unknown:
        raise fail(
            f"{CONFIG_FILE} sets {', '.join(unknown)}, unknown to moelora (a newer PEFT option?) so it "
            f"cannot tell whether the adapter is plain LoRA: remove the field if it does not change the math"
        )


def _pattern(
    raw: dict[str, Any], field: str, valid: Callable[[Any], bool], fail: Callable[[str], AdapterError]
) -> dict[str, Any]:
    patterns = raw.get(field) or {}
    if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
        raise fail(f"{CONFIG_FILE} field '{field}' must map module patterns to numbers, found {patterns!r}")
    for key in patterns:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise fail(
                f"{CONFIG_FILE} field '{field}' has key {key!r}, not a valid regular expression ({e})"
            ) from e
    return dict(patterns)


def _version(text: Any) -> tuple[int, ...] | None:
    """(0, 19, 1) from '0.19.1' or '0.19.1.dev0'; None if absent or unreadable."""
    if not isinstance(text, str):
        return None
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _is_default(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

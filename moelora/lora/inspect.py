"""`moelora adapter inspect` and `convert`: what an adapter folder holds, whether it fits a model, and the
adapter rewritten in PEFT's canonical per-expert form (every layout moelora reads becomes one that
moelora, PEFT and the peers read the same way)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelora.lora.adapter import (
    ATTENTION_TARGETS,
    CONFIG_FILE,
    FORMATS,
    LINEAR_TARGETS,
    WEIGHTS_FILE,
    AdapterError,
    LoraWeights,
    read_adapter,
    read_adapter_config,
)
from moelora.models.config import ModelConfig
from moelora.models.family import Family

_UNSLOTH = re.compile(r"\.experts\.(gate_up_projs|down_projs)\.\d+\.lora_A")
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")
_FUSED = re.compile(r"\.experts(\.base_layer)?\.lora_[AB]")
_PER_PROJECTION = re.compile(r"\.experts\.(w1|w2|w3|[a-z_]+_proj)\.lora_[AB]")
_GROUPED = re.compile(r"\.experts\.lora_(gate_and_up|down)_A")
_GROUPED_ANY = re.compile(r"\.experts\.lora_(gate_and_up|down)_[AB]")


@dataclass
class AdapterReport:
    """What `inspect` prints: the config's LoRA settings, the layouts found, and (given a model) the
    normalised targets or the reason the adapter does not fit."""

    path: Path
    config: dict[str, Any]
    formats: dict[str, int]  # FORMATS name (or a guess from the names, without a model) -> A/B pairs
    tensors: int
    model: str | None = None
    fits: bool | None = None  # None: no model to check against
    error: str = ""
    dense: dict[str, list[int]] = field(default_factory=dict)  # target -> layers
    experts: dict[str, dict[int, int]] = field(default_factory=dict)  # proj -> {layer: experts covered}
    ranks: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    num_experts: int = 0  # the model's routed experts a layer


def inspect_adapter(path: str | Path, model: tuple[str, ModelConfig, Family] | None = None) -> AdapterReport:
    """The report of the adapter folder `path`; `model` = (its name, config, family) to check the fit."""
    folder = Path(path).expanduser()
    config = read_adapter_config(folder, AdapterError)
    names = _tensor_names(folder / WEIGHTS_FILE)
    report = AdapterReport(folder, config, _guess_formats(names), len(names))
    if model is None:
        return report
    report.model, cfg, family = model
    try:
        adapter = read_adapter(folder.name, folder, cfg, family)
    except AdapterError as e:
        report.fits, report.error = False, str(e)
        return report
    report.fits, report.formats, report.num_experts = True, dict(adapter.formats), cfg.num_experts
    for layer, target in sorted(adapter.dense):
        report.dense.setdefault(target, []).append(layer)
    for (layer, proj), per_expert in sorted(adapter.experts.items()):
        report.experts.setdefault(proj, {})[layer] = len(per_expert)
    report.ranks = sorted({w.rank for w in adapter.weights()})
    report.scales = _scales(config)
    return report


def format_report(report: AdapterReport) -> str:
    c = report.config
    lines = [f"adapter: {report.path}"]
    base = c.get("base_model_name_or_path")
    lines.append(f"  trained on: {base or '(not recorded)'}; peft_type {c.get('peft_type', 'LORA')}")
    lines.append(
        f"  config: r {c.get('r', 8)}, lora_alpha {c.get('lora_alpha', 8)}, use_rslora "
        f"{c.get('use_rslora', False)}, target_modules {c.get('target_modules')}, target_parameters "
        f"{c.get('target_parameters')}"
    )
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        lines.append(f"  rank_pattern {c.get('rank_pattern')}, alpha_pattern {c.get('alpha_pattern')}")
    how = "read" if report.fits else "guessed from the names"
    lines.append(f"  tensors: {report.tensors}; layouts ({how}):")
    lines += [
        f"    {name}: {n} A/B pairs - {FORMATS.get(name, '')}".rstrip(" -")
        for name, n in report.formats.items()
    ]
    if report.fits is None:
        lines.append("  fit: not checked (give --model to check it against a model)")
        return "\n".join(lines)
    if not report.fits:
        lines.append(f"  fits {report.model}: NO - {report.error}")
        return "\n".join(lines)
    lines.append(f"  fits {report.model}: yes")
    for target, layers in report.dense.items():
        lines.append(f"    {target}: layers {_ranges(layers)}")
    for proj, per_layer in report.experts.items():
        counts = sorted(set(per_layer.values()))
        lines.append(
            f"    experts' {proj}: layers {_ranges(list(per_layer))} "
            f"({' or '.join(map(str, counts))} of {report.num_experts} experts each)"
        )
    lines.append(f"  ranks: {report.ranks}; scales (alpha / r or / sqrt(r)): {report.scales}")
    return "\n".join(lines)


def convert_adapter(path: str | Path, out: str | Path, model: tuple[str, ModelConfig, Family]) -> Path:
    """Write the adapter at `path` to the folder `out` in PEFT's per-expert form for `model`: one A/B pair
    per linear layer and per (expert, gate|up|down), fp32, the scale folded into B (lora_alpha = r for
    every module, so each scale is 1). AdapterError if it does not fit or `out` holds an adapter already."""
    name, cfg, family = model
    if family.experts_in_major:
        raise AdapterError(
            f"{cfg.architecture} has no per-expert modules: its adapters are served (and kept) in PEFT's "
            f"target_parameters form, which moelora reads as it is; nothing to convert"
        )
    src, dst = Path(path).expanduser(), Path(out).expanduser()
    if (dst / CONFIG_FILE).exists() or (dst / WEIGHTS_FILE).exists():
        raise AdapterError(f"'{dst}' already holds an adapter: give an empty or new folder")
    adapter = read_adapter(src.name, src, cfg, family)
    prefix, names = family.moe_prefixes[0], family.expert_names
    proj_name = {"gate": names.gate, "up": names.up, "down": names.down}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for (layer, target), w in sorted(adapter.dense.items()):
        block = (
            "linear_attn"
            if target in LINEAR_TARGETS
            else "self_attn"
            if target in ATTENTION_TARGETS
            else "mlp"
        )
        name = target.replace("shared_expert.", f"{family.shared_expert_name}.", 1)
        module = f"model.layers.{layer}.{block}.{name}"
        _put(tensors, ranks, module, w)
    for (layer, proj), per_expert in sorted(adapter.experts.items()):
        for e, w in sorted(per_expert.items()):
            _put(tensors, ranks, f"model.layers.{layer}.{prefix}.experts.{e}.{proj_name[proj]}", w)
    rank = max(ranks.values())
    odd = {re.escape(m): r for m, r in ranks.items() if r != rank}
    targets = sorted({m.rsplit(".", 1)[1] for m in ranks})
    source = read_adapter_config(src, AdapterError)
    config = {
        "peft_type": "LORA",
        "task_type": source.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": source.get("base_model_name_or_path") or name,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": odd,
        "alpha_pattern": dict(odd),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return dst


def _put(tensors: dict[str, torch.Tensor], ranks: dict[str, int], module: str, w: LoraWeights) -> None:
    key = f"base_model.model.{module}"
    tensors[f"{key}.lora_A.weight"] = w.A.float().clone()  # own storage: gate and up may share an A
    tensors[f"{key}.lora_B.weight"] = w.B.float().clone()
    ranks[module] = w.rank


def _scales(config: dict[str, Any]) -> list[float]:
    """The scale of the config's default rank and of each rank_pattern entry (before any folding)."""
    r, alpha, rs = config.get("r", 8), config.get("lora_alpha", 8), config.get("use_rslora", False)
    pairs = [(r, alpha)]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    pairs += [(ranks.get(k, r), alphas.get(k, alpha)) for k in {*ranks, *alphas}]
    return sorted({round(a / (q**0.5 if rs else q), 6) for q, a in pairs if q})


def _guess_formats(names: list[str]) -> dict[str, int]:
    """Layouts by name alone (no model to check shapes against): pairs of lora_A keys per layout."""
    found: Counter[str] = Counter()
    for key in names:
        if _GROUPED.search(key):
            found["nemo-automodel"] += 1
            continue
        if ".lora_A" not in key:
            continue
        if _PER_EXPERT.search(key):
            found["peft-per-expert"] += 1
        elif _UNSLOTH.search(key):
            found["unsloth-gpt-oss"] += 1
        elif _FUSED.search(key):
            found["peft-fused"] += 1
        elif _PER_PROJECTION.search(key):
            found["megatron-3d, tinker or megatron-shared-outer (3-D)"] += 1
        else:
            found["peft-linear"] += 1
    unknown = [k for k in names if ".lora_A" not in k and ".lora_B" not in k and not _GROUPED_ANY.search(k)]
    if unknown:
        found[f"unknown ({len(unknown)} tensors, e.g. {unknown[0]})"] = len(unknown)
    return dict(found)


def _tensor_names(path: Path) -> list[str]:
    if not path.is_file():
        raise AdapterError(f"no {path.name} in {path.parent}: is it a PEFT adapter folder?")
    try:
        with safe_open(str(path), framework="pt") as f:
            return sorted(f.keys())
    except Exception as e:  # any unreadable file: say so, as the loader would
        raise AdapterError(f"'{path}' cannot be read as safetensors ({e})") from e


def _ranges(values: list[int]) -> str:
    """'0-3, 5' for [0, 1, 2, 3, 5]."""
    out: list[str] = []
    for v in sorted(values):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)

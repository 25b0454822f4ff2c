"""Build a model from a checkpoint folder: read config.json, pick the family, allocate, fill the weights."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelora.config import DTYPE_CHOICES, LOAD_FORMATS, QUANTIZATIONS
from moelora.layers.linear import RowLinear
from moelora.layers.moe import FusedMoE
from moelora.loader.checkpoint import Checkpoint, CheckpointError
from moelora.loader.dummy import DummyCheckpoint
from moelora.loader.fp8 import Fp8Checkpoint, fp8_block_size
from moelora.loader.load import TensorSource, load_weights
from moelora.loader.mxfp4 import Mxfp4Checkpoint
from moelora.loader.presets import is_preset
from moelora.models.config import ModelConfig
from moelora.models.decoder import MoeForCausalLM
from moelora.models.family import Family
from moelora.models.registry import family_for
from moelora.ops.fp8 import Fp8Weights
from moelora.parallel.state import ParallelState

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,  # for exact reference checks on CPU; no kernel is built for it
}


logger = logging.getLogger(__name__)


def read_model_config(folder: Path, hf_overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, Family]:
    """The family and the ModelConfig of the checkpoint in `folder`, with `hf_overrides` replacing
    config.json fields (e.g. {"num_hidden_layers": 4}); clear errors for a bad config.json."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}: is it a Hugging Face model folder?")
    try:
        raw: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    overrides = dict(hf_overrides or {})
    raw.update(overrides)
    family = family_for(raw.get("architectures"), str(path))
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(folder), **overrides)
        return family.read_config(hf, raw), family
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path} cannot be read as a {family.name} config: {e}") from e


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """'auto' is the checkpoint's own dtype; otherwise one of float32, bfloat16, float16 (or float64, for
    numerical reference checks)."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype == "auto":
        chosen = checkpoint_dtype
    elif dtype in _DTYPES:
        chosen = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPE_CHOICES)}")
    if chosen not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"dtype {chosen} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
    return chosen


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' is the first CUDA device if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but torch sees no CUDA device")
    return chosen


def resolve_load_format(load_format: str, folder: Path) -> str:
    """'auto' is 'dummy' for a preset (it has no weights) and 'safetensors' for any other folder."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format '{load_format}' is not one of {', '.join(LOAD_FORMATS)}")
    if load_format == "auto":
        return "dummy" if is_preset(folder) else "safetensors"
    if load_format == "safetensors" and is_preset(folder):
        raise ValueError(
            f"preset '{folder.name}' has no weights, only its config: use load_format 'dummy' (random "
            f"weights) or give the folder of the real checkpoint"
        )
    return load_format


def check_layout(
    folder: Path, tp_size: int, ep_size: int, hf_overrides: dict[str, Any] | None = None
) -> None:
    """Fail now, before any process starts, if the model cannot be split over tp_size x ep_size.

    Builds rank 0's share on the meta device (no memory), so every layer's own check runs: ep_size
    dividing tp_size, tp_size dividing the attention heads (and the vocabulary, the MLP sizes), key/value
    heads that shard or replicate evenly, no more EP ranks than experts.
    """
    cfg, family = read_model_config(folder, hf_overrides)
    try:
        ps = ParallelState(0, tp_size, ep_size)
        with torch.device("meta"):
            MoeForCausalLM(cfg, family, ps, torch.float32)
    except ValueError as e:
        raise ValueError(f"tp_size={tp_size}, ep_size={ep_size} does not fit {folder.name}: {e}") from e


def load_model(
    folder: Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    ps: ParallelState | None = None,
    progress: bool = True,
    load_format: str = "auto",
    hf_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    quantization: str = "auto",
) -> MoeForCausalLM:
    """This rank's share of the model in `folder`, weights read lazily straight into place, or drawn at
    random on the device with `load_format="dummy"` (nothing read but config.json; `seed` seeds them).
    `quantization` (`ModelConfig.fp8`, `_fp8_plan`): "auto" serves a block-FP8 checkpoint's FP8 weights
    in FP8, with the checkpoint's own values and block scales, bit for bit; "fp8" does so too, and
    quantises a 16-bit checkpoint's (or dummy) routed experts and linear layers as they load; "none"
    reads every weight into `dtype` (FP8 ones dequantised, `loader/fp8.py`). Routers, gates, norms and
    the embeddings stay in `dtype`."""
    fmt = resolve_load_format(load_format, folder)
    cfg, family = read_model_config(folder, hf_overrides)
    raw = _raw_config(folder, hf_overrides)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: one of {', '.join(QUANTIZATIONS)}")
    if quantization == "fp8" and fmt != "dummy" and _quant_method(raw) == "mxfp4":
        raise ValueError(
            f"quantization='fp8' on {folder.name}, whose experts are MXFP4: they would be quantised a second "
            f"time, which loses precision. Serve it with quantization 'none' (read dequantised into --dtype)"
        )
    chosen_dtype = resolve_dtype(dtype, cfg.dtype)
    chosen_device = resolve_device(device)
    with ExitStack() as stack:
        # A real checkpoint is opened (its headers checked) before anything is allocated.
        ckpt = None if fmt == "dummy" else stack.enter_context(Checkpoint(folder))
        # FP8 / MXFP4 weights read dequantised into `dtype`, or kept in FP8 as `_fp8_plan` says
        read = None if ckpt is None else _quantized(ckpt, raw, folder)
        cfg = replace(cfg, fp8=_fp8_plan(quantization, read))
        with torch.device(chosen_device):
            model = MoeForCausalLM(cfg, family, ps or ParallelState(), chosen_dtype)
        layers = (m for m in model.modules() if isinstance(m, (FusedMoE, RowLinear)))
        for why in sorted({m.fp8_skipped for m in layers if m.fp8_skipped}):  # once a model, not a layer
            served = str(chosen_dtype).removeprefix("torch.")
            logger.warning("%s: weights served in %s, not FP8: %s", folder.name, served, why)
        specs = model.weight_specs()
        source: TensorSource = read or DummyCheckpoint(folder, specs, chosen_device, seed)
        desc = f"Drawing {folder.name} (dummy weights)" if ckpt is None else f"Loading {folder.name}"
        load_weights(
            model,
            specs,
            source,
            ignored=model.ignored_keys(),
            progress=progress,
            desc=desc,
            ignored_prefixes=model.ignored_prefixes(),
        )
    return model.eval()


def _fp8_plan(quantization: str, source: TensorSource | None) -> Fp8Weights | None:
    """Which weights are served in FP8 (None: none). A block-FP8 checkpoint ("auto" or "fp8"): its routed
    experts if they are FP8 there, and the linear layers whose checkpoint name is FP8 in every layer
    (names the config leaves unquantised stay in --dtype), with its own block scales. "fp8" on any other
    checkpoint (or dummy weights, `source` None): the routed experts and every linear layer adapters may
    target, with scales of their own."""
    if quantization == "none":
        return None
    strict = quantization == "fp8"
    if isinstance(source, Fp8Checkpoint):
        experts, dense = _fp8_names(source.keys(), source.fp8_keys())
        if not experts and not dense:
            return None
        return Fp8Weights(source.block[1], strict, experts, dense)
    return Fp8Weights(None, strict) if strict else None


def _fp8_names(keys: set[str], fp8_keys: set[str]) -> tuple[bool, frozenset[str]]:
    """(whether any routed expert weight is FP8 (per-expert or fused keys), the names `<name>` of the other
    `....<name>.weight` keys that are FP8 wherever they occur) of a checkpoint's weight keys and those of
    them stored in FP8."""
    fp8: set[str] = set()
    plain: set[str] = set()
    experts = False
    for key in keys:
        if ".experts." in key:
            experts |= key in fp8_keys
        elif key.endswith(".weight"):
            name = key.removesuffix(".weight").rsplit(".", 1)[-1]
            (fp8 if key in fp8_keys else plain).add(name)
    return experts, frozenset(fp8 - plain)


def _raw_config(folder: Path, hf_overrides: dict[str, Any] | None) -> dict[str, Any]:
    """config.json as read, `hf_overrides` applied."""
    raw: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return raw | dict(hf_overrides or {})


def _quant_method(raw: dict[str, Any]) -> str | None:
    q = raw.get("quantization_config")
    return q.get("quant_method") if isinstance(q, dict) else None


def _quantized(ckpt: Checkpoint, raw: dict[str, Any], folder: Path) -> TensorSource:
    """The checkpoint as the loader reads it: dequantising its block-FP8 or MXFP4 weights if its
    quantization_config (`raw`: config.json, overrides applied) says so."""
    if _quant_method(raw) == "mxfp4":
        return Mxfp4Checkpoint(ckpt)
    block = fp8_block_size(raw, folder / "config.json")
    return ckpt if block is None else Fp8Checkpoint(ckpt, block)

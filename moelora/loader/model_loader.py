"""Build a model from a checkpoint folder: read config.json, pick the family, allocate, fill the weights."""

from __future__ import annotations

import json
import logging
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from moelora.config import DTYPE_CHOICES, LOAD_FORMATS, QUANTIZATIONS
from moelora.layers.moe import FusedMoE
from moelora.layers.spec import WeightSpec
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
    A block-FP8 checkpoint's weights are read dequantised (`loader/fp8.py`). `quantization`: "fp8" holds
    the routed experts' weights in FP8 then (`FusedMoE.quantize_fp8`): a block-FP8 checkpoint's experts
    get their own block scales back, so their FP8 values are the checkpoint's, bit for bit; "auto" does
    so for a block-FP8 checkpoint only; "none" never."""
    fmt = resolve_load_format(load_format, folder)
    cfg, family = read_model_config(folder, hf_overrides)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: one of {', '.join(QUANTIZATIONS)}")
    if quantization == "fp8" and fmt != "dummy" and _quant_method(folder, hf_overrides) == "mxfp4":
        raise ValueError(
            f"quantization='fp8' on {folder.name}, whose experts are MXFP4: they would be quantised a second "
            f"time, which loses precision. Serve it with quantization 'none' (read dequantised into --dtype)"
        )
    chosen_dtype = resolve_dtype(dtype, cfg.dtype)
    chosen_device = resolve_device(device)
    with ExitStack() as stack:
        # A real checkpoint is opened (its headers checked) before anything is allocated.
        ckpt = None if fmt == "dummy" else stack.enter_context(Checkpoint(folder))
        with torch.device(chosen_device):
            model = MoeForCausalLM(cfg, family, ps or ParallelState(), chosen_dtype)
        specs = model.weight_specs()
        source: TensorSource = ckpt or DummyCheckpoint(folder, specs, chosen_device, seed)
        if ckpt is not None:
            source = _quantized(ckpt, folder, hf_overrides)  # FP8 / MXFP4 read dequantised into `dtype`
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
        if quantization != "none":
            _experts_to_fp8(model, specs, source, folder.name, quantization)
    return model.eval()


def _experts_to_fp8(
    model: MoeForCausalLM, specs: list[WeightSpec], source: TensorSource, name: str, quantization: str
) -> None:
    """The routed experts in FP8 (see load_model): with a block-FP8 checkpoint's scales where its experts
    are FP8 and the layout keeps whole scale groups, else (quantization "fp8" only) quantised anew."""
    by_param = {id(spec.param): spec for spec in specs}
    for module in model.modules():
        if not isinstance(module, FusedMoE):
            continue
        given = None
        if isinstance(source, Fp8Checkpoint):
            try:
                given = checkpoint_scales(module, by_param, source)
            except CheckpointError as e:
                if quantization == "fp8":
                    raise ValueError(f"quantization='fp8' on {name}: {e}") from e
                logger.warning("%s: the routed experts are served in 16 bits: %s", name, e)
                return  # the same for every layer: the cut follows from the layout
        if given is None and quantization == "fp8":
            module.quantize_fp8()
        elif given is not None:
            module.quantize_fp8(given[2], given[:2])


def checkpoint_scales(
    module: FusedMoE, by_param: dict[int, WeightSpec], source: Fp8Checkpoint
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(gate_up scales, down scales, group) of `module`'s experts from a block-FP8 checkpoint, per row and
    group of the largest power-of-two number of columns that divides the block width and where each
    rank's share of the intermediate starts; None where the checkpoint's experts are not FP8.
    CheckpointError where that group is under 16 columns (the kernels' smallest step)."""
    bi, share = source.block[1], module.cols.stop - module.cols.start
    common = math.gcd(bi, share, module.cols.start)  # the same on every rank (equal shares)
    group = common & -common  # its largest power-of-two factor
    if group < 16:
        raise CheckpointError(
            f"each rank's share of the experts' intermediate is {share} columns, which cuts the "
            f"checkpoint's {bi}-column scale blocks into groups of {group} (the FP8 kernels need 16)"
        )
    tables = []
    for param in (module.w_gate_up, module.w_down):
        spec = by_param[id(param)]
        present = source.keys()
        form = next(f for f in spec.forms if all(p.key in present for p in f.pieces))
        rows, cols = param.shape[1], param.shape[2]
        table = torch.empty(param.shape[0], rows, -(-cols // group), dtype=torch.float32, device=param.device)
        for piece in form.pieces:
            if len(piece.shape) != 2 or piece.transform or source.scale_key(piece.key) is None:
                return None  # fused or unquantised expert keys: read dequantised
            src = (*piece.src, slice(None), slice(None))[:2]
            full = tuple(slice(*s.indices(n)[:2]) for s, n in zip(src, piece.shape, strict=True))
            table[piece.dst] = source.row_scales(piece.key, full[0], full[1], group).to(table.device)
        tables.append(table)
    return tables[0], tables[1], group


def _quant_method(folder: Path, hf_overrides: dict[str, Any] | None) -> str | None:
    raw = json.loads((folder / "config.json").read_text()) | dict(hf_overrides or {})
    q = raw.get("quantization_config")
    return q.get("quant_method") if isinstance(q, dict) else None


def _quantized(ckpt: Checkpoint, folder: Path, hf_overrides: dict[str, Any] | None) -> TensorSource:
    """The checkpoint as the loader reads it: dequantising its block-FP8 or MXFP4 weights if its
    quantization_config (overrides applied) says so."""
    raw = json.loads((folder / "config.json").read_text()) | dict(hf_overrides or {})
    q = raw.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "mxfp4":
        return Mxfp4Checkpoint(ckpt)
    block = fp8_block_size(raw, folder / "config.json")
    return ckpt if block is None else Fp8Checkpoint(ckpt, block)

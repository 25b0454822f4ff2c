"""Default sampling parameters from a model's `generation_config.json` (vLLM's `--generation-config`).

`auto` reads the model folder's file, a folder path reads that folder's, `vllm` uses none (SamplingParams'
own defaults). Only the fields that mean the same thing for moelora are taken: temperature, top_p, top_k,
min_p, repetition_penalty and max_new_tokens (-> max_tokens); `do_sample: false` means greedy
(temperature 0), as in transformers. A request's own values always win.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "generation_config.json"
_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(source: str, model_folder: Path) -> dict[str, Any]:
    """SamplingParams field -> default value, from `source` ('auto', 'vllm' or a folder)."""
    if source == "vllm":
        return {}
    folder = model_folder if source == "auto" else Path(source).expanduser()
    if source != "auto" and not (folder / FILE).is_file():
        raise ValueError(f"--generation-config '{source}': no {FILE} in that folder (or use auto / vllm)")
    path = folder / FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    defaults = {ours: raw[theirs] for theirs, ours in _FIELDS.items() if raw.get(theirs) is not None}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults

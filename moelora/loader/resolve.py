"""Turn what a user typed (a folder, a Hugging Face model id, or "demo") into a local checkpoint folder."""

from __future__ import annotations

import os
from pathlib import Path

from moelora.loader.presets import PRESET_PREFIX, preset_path


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a folder, the demo, nor already in the local Hugging Face cache."""


def resolve_model(model: str | os.PathLike[str], hf_cache_dir: str | None = None) -> Path:
    """A local folder holding config.json and the weights. Never downloads anything.

    `model` is a folder, the name "demo" (built locally on first use), "preset:NAME" (a published model's
    config shipped with moelora, for dummy weights), or a Hugging Face id such as "Qwen/Qwen3-30B-A3B"
    whose files are already in the local Hugging Face cache.
    """
    from moelora.demo import DEMO_NAME, demo_model_path

    text = os.fspath(model)
    if text == DEMO_NAME:
        return demo_model_path()
    if text.startswith(PRESET_PREFIX):
        try:
            return preset_path(text.removeprefix(PRESET_PREFIX))
        except FileNotFoundError as e:
            raise ModelNotFoundError(str(e)) from None
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model path '{text}' is a file; give the folder that holds config.json")
    looks_like_id = text.count("/") <= 1 and not text.startswith((".", "/", "~"))
    if looks_like_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, cache_dir=hf_cache_dir, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
            pass
        raise ModelNotFoundError(
            f"model '{text}' is not a local folder, not '{DEMO_NAME}', and not in the local Hugging Face "
            f"cache; moelora never downloads: fetch it first (`hf download {text}`) or pass its folder"
        )
    raise ModelNotFoundError(f"model folder '{text}' does not exist")

"""Published models' `config.json` files shipped with moelora, usable by name: `preset:qwen3-30b-a3b`.

A preset is a folder holding only the configuration (and the generation config where published), no
weights and no tokenizer: it is built with random weights (`load_format="dummy"`) to measure a full-size
model with nothing downloaded or written to disk. Prompts to a preset are token ids.
"""

from __future__ import annotations

from pathlib import Path

PRESET_PREFIX = "preset:"
_ROOT = Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.name for p in _ROOT.iterdir() if (p / "config.json").is_file())


def preset_path(name: str) -> Path:
    """The folder of preset `name`; an error listing the presets if there is none of that name."""
    folder = _ROOT / name
    if "/" in name or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no preset '{name}'; presets: {', '.join(preset_names())}")
    return folder


def is_preset(folder: Path) -> bool:
    return folder.resolve().parent == _ROOT

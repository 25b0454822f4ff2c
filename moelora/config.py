"""User-facing settings as frozen dataclasses; the CLI's flags are generated from their fields.

Each field's metadata carries its help text and optional short aliases (`--tp` for `tp_size`), so the
Python API, the CLI and the docs cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moelora.loader.model_loader import DTYPE_CHOICES


def option(
    default: Any, help: str, *, aliases: tuple[str, ...] = (), choices: tuple[str, ...] | None = None
) -> Any:
    """A dataclass field with the metadata the CLI builds its flag from."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices})


@dataclass(frozen=True)
class ModelArgs:
    """Which model to load and how."""

    model: str = option("demo", "model folder, a Hugging Face id already in the local cache, or 'demo'")
    dtype: str = option("auto", "weight and activation dtype; auto = the checkpoint's", choices=DTYPE_CHOICES)
    device: str = option("auto", "torch device; auto = cuda if available, else cpu")
    seed: int = option(0, "random seed for everything the model does")
    progress: bool = option(True, "show a progress bar while loading")

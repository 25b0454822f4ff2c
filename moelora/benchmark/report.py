"""What every benchmark run reports beside its rows: the machine, the versions, the settings, the memory;
percentiles; the table printer and the JSON file."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        if package == "moelora":  # run from a checkout (PYTHONPATH), not installed
            import moelora

            return f"{moelora.__version__} (not installed)"
        return "absent"


def environment(device: torch.device) -> dict[str, Any]:
    """The card (or CPU), the versions, the date of a run and the kernel plan's overrides (`MOELORA_PLAN`,
    empty for the shipped plan)."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        **{p: _version(p) for p in ("moelora", "torch", "triton", "transformers")},
        "kernel_plan": os.environ.get("MOELORA_PLAN", ""),  # what `ops.plan.TUNED` took at import
    }
    if device.type == "cuda":
        env["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = (
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    return env


def memory(device: torch.device) -> dict[str, float]:
    """GiB in use on the device now (allocated by torch, and by anything on the card), and torch's peak."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    gib = 2**30
    return {
        "torch_allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "torch_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
        "device_used_gib": (total - free) / gib,
        "device_total_gib": total / gib,
    }


def table_text(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A title line, then a Markdown table."""
    lines = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("\n" + table_text(title, header, rows), end="")


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or nan
        return "-"
    return f"{value:,.{digits}f}"


def _plain(value: Any) -> Any:
    """JSON for what json does not know: dataclasses as dicts, anything else as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    print(f"results written to {target}")

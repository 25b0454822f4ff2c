"""`--plot out.png`: the rows of a latency or throughput run drawn with matplotlib (a `bench` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install 'moelora[bench]'") from e
    return plt


def plot_latency(path: str, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Decode tokens/s against batch size (one line per mix, and plan with `--plan-variants`), and ms per
    step against the byte floor."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

    def label(r: dict[str, Any]) -> str:
        return f"{r['mix']} [{r['plan']}]" if r.get("plan") else r["mix"]

    for mix in dict.fromkeys(label(r) for r in rows):
        mine = sorted((r for r in rows if label(r) == mix), key=lambda r: r["batch"])
        batches = [r["batch"] for r in mine]
        (line,) = left.plot(batches, [r["decode_tok_s"] for r in mine], marker="o", label=mix)
        color = line.get_color()
        right.plot(batches, [r["decode_ms_p50"] for r in mine], marker="o", color=color, label=f"{mix} (p50)")
        right.plot(batches, [r["floor_ms"] for r in mine], linestyle=":", color=color, label=f"{mix} floor")
    for ax, ylabel in ((left, "decode tokens / s"), (right, "ms per decode step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def plot_throughput(path: str, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Output tokens/s per mix."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["mix"] for r in rows], [r["output_tok_s"] for r in rows])
    ax.set_ylabel("output tokens / s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")

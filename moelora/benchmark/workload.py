"""What the benchmarks send: fresh random prompts (no prefix-cache hit unless asked for) and adapter mixes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moelora.benchmark.args import WorkloadArgs

BASE = "base"


@dataclass(frozen=True)
class Mix:
    """Shares of requests per adapter (None = the base model), named for the tables."""

    name: str
    shares: tuple[tuple[str | None, float], ...]

    @property
    def adapters(self) -> list[str]:
        return [a for a, _ in self.shares if a is not None]

    def assign(self, n: int) -> list[str | None]:
        """The adapters of n requests: counts by largest remainder, each adapter's requests spread evenly
        over the batch (so a batch of 8 over 8 adapters runs each exactly once)."""
        total = sum(s for _, s in self.shares)
        exact = [n * s / total for _, s in self.shares]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda j: (counts[j] - exact[j], j))
        for j in by_remainder[: n - sum(counts)]:
            counts[j] += 1
        slots = [((k + 0.5) / c, j) for j, c in enumerate(counts) for k in range(c)]
        return [self.shares[j][0] for _, j in sorted(slots)]


def build_mixes(args: WorkloadArgs, loaded: Sequence[str]) -> list[Mix]:
    """The base row (unless --no-base-row), --loras-per-batch's mix and every --lora-mix; with adapters
    loaded and no mix asked for, one mix spreading requests over all of them."""
    mixes = [Mix(BASE, ((None, 1.0),))] if args.base_row else []
    if args.loras_per_batch:
        n = args.loras_per_batch
        if n > len(loaded):
            raise ValueError(f"--loras-per-batch {n} but {len(loaded)} adapters are loaded (--dummy-loras N)")
        shares: list[tuple[str | None, float]] = [(a, (1 - args.base_share) / n) for a in loaded[:n]]
        if args.base_share:
            shares.append((None, args.base_share))
        label = _adapters(n) + (f" + {args.base_share:.0%} base" if args.base_share else "")
        mixes.append(Mix(label, tuple(shares)))
    mixes += [parse_mix(text, loaded) for text in args.lora_mix]
    if loaded and not args.loras_per_batch and not args.lora_mix:
        mixes.append(Mix(_adapters(len(loaded)), tuple((a, 1.0) for a in loaded)))
    if not mixes:
        raise ValueError("nothing to run: with --no-base-row give --lora-mix or --loras-per-batch")
    return mixes


def _adapters(n: int) -> str:
    return f"{n} adapter{'s' if n != 1 else ''}"


def parse_mix(text: str, loaded: Sequence[str]) -> Mix:
    """`base:0.2,dummy-0:0.8` -> a Mix; every name must be loaded (or `base`), every share > 0."""
    shares: list[tuple[str | None, float]] = []
    for part in text.split(","):
        name, sep, value = part.strip().rpartition(":")
        try:
            share = float(value) if sep else -1.0
        except ValueError:
            share = -1.0
        if not name or not share > 0:
            raise ValueError(f"--lora-mix takes NAME:SHARE,... with shares > 0, got '{text}'")
        if name != BASE and name not in loaded:
            raise ValueError(
                f"--lora-mix names adapter '{name}', which is not loaded "
                f"(loaded: {', '.join(loaded) or 'none'}; '{BASE}' is the base model)"
            )
        shares.append((None if name == BASE else name, share))
    return Mix(text, tuple(shares))


class PromptMaker:
    """Random token-id prompts; every prompt's tokens after the shared prefix start differently from
    every other prompt this maker has made, so no run reuses another's cached blocks."""

    def __init__(self, vocab: int, args: WorkloadArgs, seed: int, block_size: int = 16) -> None:
        self.vocab, self.args, self.block = vocab, args, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.prefix = self._tokens(args.shared_prefix_len)
        self._heads: set[tuple[int, ...]] = set()

    def _tokens(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab, (n,), generator=self.generator).tolist()

    def make(self, n: int) -> list[list[int]]:
        prompts: list[list[int]] = []
        rest = self.args.input_len - len(self.prefix)
        if self.vocab ** min(rest, self.block) < len(self._heads) + n:
            raise ValueError(
                f"cannot make {n} more distinct prompts of {rest} fresh tokens from a vocabulary of "
                f"{self.vocab}: raise --input-len (or lower --shared-prefix-len)"
            )
        while len(prompts) < n:
            tail = self._tokens(rest)
            head = tuple(tail[: self.block])
            if head in self._heads:
                continue
            self._heads.add(head)
            prompts.append(self.prefix + tail)
        return prompts

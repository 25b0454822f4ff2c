"""The benchmarks' settings as frozen dataclasses (their flags are generated like every other command's);
vLLM's flag names where a flag means the same thing."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moelora.config import option


@dataclass(frozen=True)
class WorkloadArgs:
    """The requests every benchmark sends."""

    input_len: int = option(512, "prompt tokens per request (random token ids, fresh in every run)")
    output_len: int = option(128, "tokens generated per request (EOS ignored: each request makes them all)")
    shared_prefix_len: int = option(
        0, "leading prompt tokens all requests share (prefix-cache runs); 0 = every prompt entirely fresh"
    )
    temperature: float = option(1.0, "sampling temperature of the requests (vLLM's benchmarks use 1.0)")
    lora_mix: tuple[str, ...] = option(
        (),
        "adapter mixes to run, each NAME:SHARE,... over loaded adapters ('base' = no adapter), e.g. "
        "base:0.2,dummy-0:0.4,dummy-1:0.4",
        nargs="+",
    )
    loras_per_batch: int = option(
        0, "a mix spreading requests evenly over the first N loaded adapters (with --base-share)"
    )
    base_share: float = option(0.0, "share of base-model requests in the --loras-per-batch mix")
    base_row: bool = option(True, "also run every row on the base model alone (the ratio's reference)")
    output_json: str | None = option(None, "write every row, the settings and the environment here")
    plot: str | None = option(None, "draw the rows into this PNG (matplotlib)")

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(
                f"--input-len and --output-len must be >= 1, got {self.input_len}, {self.output_len}"
            )
        if not 0 <= self.shared_prefix_len < self.input_len:
            raise ValueError(
                f"--shared-prefix-len must be in [0, --input-len={self.input_len}), "
                f"got {self.shared_prefix_len}"
            )
        if self.loras_per_batch < 0 or not 0 <= self.base_share < 1:
            raise ValueError(
                f"--loras-per-batch must be >= 0 and --base-share in [0, 1), got {self.loras_per_batch}, "
                f"{self.base_share}"
            )


@dataclass(frozen=True)
class LatencyArgs:
    """`moelora bench latency`: fixed batches, prefill time and decode time per step."""

    batch_size: tuple[int, ...] = option((8,), "requests per batch; several sizes give a row each", nargs="+")
    num_iters: int = option(3, "timed runs per row (each with fresh prompts)")
    num_iters_warmup: int = option(1, "untimed runs per row before the timed ones")
    profile: str | None = option(
        None, "also profile a few decode steps of each row (torch.profiler) into this folder"
    )
    plan_variants: tuple[str, ...] = option(
        (),
        "kernel plans to compare in this one process, each in MOELORA_PLAN's syntax on top of the plan it "
        "started with ('' for that plan itself), e.g. '' 'rotary_in_decode=False': every row runs under "
        "each in turn, its CUDA graphs captured again (same weights, memory and compiled kernels)",
        nargs="+",
    )
    plan_rounds: int = option(
        1,
        "go through the rows (and --plan-variants) this many times, A B A B ..., each row's runs pooled: "
        "a drift of the card shows in every row's spread instead of as a difference between variants",
    )

    def __post_init__(self) -> None:
        from moelora.ops.plan import KernelPlan, with_overrides

        if self.plan_rounds < 1:
            raise ValueError(f"--plan-rounds must be >= 1, got {self.plan_rounds}")
        if not self.batch_size or min(self.batch_size) < 1:
            raise ValueError(f"--batch-size needs sizes >= 1, got {list(self.batch_size)}")
        for spec in self.plan_variants:  # refused before the model loads
            try:
                with_overrides(KernelPlan(), spec)
            except ValueError as e:
                raise ValueError(f"--plan-variants: {e}") from None
        if len(set(self.plan_variants)) < len(self.plan_variants):
            raise ValueError(f"--plan-variants names a plan twice: {list(self.plan_variants)}")
        if self.num_iters < 1 or self.num_iters_warmup < 0:
            raise ValueError(
                f"--num-iters must be >= 1 and --num-iters-warmup >= 0, got {self.num_iters}, "
                f"{self.num_iters_warmup}"
            )


@dataclass(frozen=True)
class ThroughputArgs:
    """`moelora bench throughput`: every prompt submitted at once, offline."""

    num_prompts: int = option(1000, "requests, all submitted at once")
    num_prompts_warmup: int = option(
        32, "requests of an untimed run first (compiles kernels; decode graphs are captured before it)"
    )

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.num_prompts_warmup < 0:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")


@dataclass(frozen=True)
class ServeBenchArgs:
    """`moelora bench serve`: streaming requests at a Poisson rate against `moelora serve`."""

    base_url: str | None = option(
        None, "a running server (http://HOST:PORT); default: start `moelora serve` with the model flags"
    )
    num_prompts: int = option(200, "requests to send")
    request_rate: float = option(math.inf, "requests per second (Poisson arrivals); inf = all at once")
    burstiness: float = option(1.0, "gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier")
    max_concurrency: int | None = option(None, "most requests in flight at once; default: no limit")
    goodput: tuple[str, ...] = option(
        (),
        "service-level objectives in ms, e.g. ttft:500 tpot:50 e2el:10000 (goodput counts requests "
        "meeting all)",
        nargs="+",
    )
    api_key: str | None = option(None, "the server's API key, if it needs one")

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or not self.request_rate > 0 or not self.burstiness > 0:
            raise ValueError(
                f"--num-prompts must be >= 1 and --request-rate, --burstiness > 0, got {self.num_prompts}, "
                f"{self.request_rate}, {self.burstiness}"
            )
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        parse_goodput(self.goodput)


SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: tuple[str, ...]) -> dict[str, float]:
    """("ttft:500", "tpot:50") -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if name not in SLO_METRICS or not ms > 0:
            raise ValueError(
                f"--goodput takes METRIC:MS with METRIC in {', '.join(SLO_METRICS)}, got '{item}'"
            )
        slos[name] = ms
    return slos

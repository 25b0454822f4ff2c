"""`moelora bench throughput`: every prompt submitted at once (offline); requests and tokens per second."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from moelora.benchmark.args import ThroughputArgs
from moelora.benchmark.report import fmt, print_table
from moelora.benchmark.session import Session
from moelora.benchmark.workload import Mix
from moelora.sampling_params import SamplingParams


@dataclass(frozen=True)
class ThroughputRow:
    mix: str
    num_prompts: int
    wall_s: float
    input_tokens: int
    generated_tokens: int
    steps: int
    preemptions: int

    def summary(self) -> dict[str, Any]:
        return {
            "mix": self.mix,
            "num_prompts": self.num_prompts,
            "wall_s": self.wall_s,
            "requests_per_s": self.num_prompts / self.wall_s,
            "input_tok_s": self.input_tokens / self.wall_s,
            "output_tok_s": self.generated_tokens / self.wall_s,
            "total_tok_s": (self.input_tokens + self.generated_tokens) / self.wall_s,
            "generated_tokens": self.generated_tokens,
            "steps": self.steps,
            "preemptions": self.preemptions,
        }


def run_offline(session: Session, mix: Mix, n: int, label: str | None) -> ThroughputRow:
    """Submit n fresh requests of the mix at once and wait for all; a progress bar when labelled."""
    llm, w = session.llm, session.workload
    params = SamplingParams(temperature=w.temperature, max_tokens=w.output_len, ignore_eos=True)
    prompts, loras = session.prompts.make(n), mix.assign(n)
    engine = llm.engine
    preempted = engine.num_preemptions
    start = time.perf_counter()
    streams = engine.submit_many(list(zip(prompts, [params] * n, loras, strict=True)))
    show = label is not None and llm.args.progress
    generated = 0
    with tqdm(total=n, desc=label, unit="req", disable=not show) as bar:
        for stream in streams:
            generated += len(stream.result().token_ids)
            bar.update()
    wall = time.perf_counter() - start
    steps = len(engine.step_records(since=start))
    return ThroughputRow(
        mix.name, n, wall, n * w.input_len, generated, steps, engine.num_preemptions - preempted
    )


def run_throughput(session: Session, args: ThroughputArgs) -> list[ThroughputRow]:
    rows = []
    for mix in session.mixes:
        if args.num_prompts_warmup:
            run_offline(session, mix, args.num_prompts_warmup, None)
        rows.append(run_offline(session, mix, args.num_prompts, f"bench throughput ({mix.name})"))
    return rows


def print_throughput(session: Session, rows: list[ThroughputRow]) -> None:
    base = next((r.summary()["output_tok_s"] for r in rows if r.mix == "base"), None)
    table = []
    for r in rows:
        s = r.summary()
        table.append(
            [
                r.mix,
                str(r.num_prompts),
                fmt(s["requests_per_s"]),
                fmt(s["input_tok_s"], 0),
                fmt(s["output_tok_s"], 0),
                fmt(s["total_tok_s"], 0),
                fmt(s["output_tok_s"] / base * 100, 0) + "%" if base else "-",
                fmt(r.wall_s, 1),
                str(r.generated_tokens),
                str(r.preemptions),
            ]
        )
    w = session.workload
    print_table(
        f"bench throughput: input {w.input_len}, output {w.output_len}, {session.env['device']}, "
        f"{session.settings()['dtype']}",
        ["mix", "requests", "req/s", "input tok/s", "output tok/s", "total tok/s", "vs base", "wall s",
         "generated", "preemptions"],
        table,
    )  # fmt: skip

"""`moelora bench latency`: fixed batches of fresh prompts; prefill time, and the time of every decode step
from the engine's own per-step timestamps (never the difference of two runs)."""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moelora.benchmark.args import LatencyArgs
from moelora.benchmark.floors import prefill_flops
from moelora.benchmark.profile import IDLE, DecodeProfile, profile_decode
from moelora.benchmark.report import fmt, percentile, print_table, table_text
from moelora.benchmark.session import Session
from moelora.benchmark.workload import Mix
from moelora.cache.kv_cache import blocks_for
from moelora.engine.stats import StepRecord
from moelora.sampling_params import SamplingParams


@dataclass(frozen=True)
class Iteration:
    """One timed run of a batch: prefill (submission to the end of the last step with prompt tokens), the
    decode steps after it (each from the previous step's end to its own) with the sequences each
    decoded, and the tokens generated. A batch the KV cache cannot hold at once runs in waves: its
    last wave's decode steps have fewer sequences than the batch (`decode_seqs`)."""

    prefill_s: float
    decode_steps_s: list[float]
    generated: int
    wall_s: float
    preemptions: int
    decode_seqs: list[int]


def split_steps(records: list[StepRecord], submitted: float) -> tuple[float, list[float]]:
    """(prefill seconds, decode step seconds) of one run's steps, in order."""
    last = last_prefill(records)
    prefill_end = records[last].end if last >= 0 else submitted
    ends = [prefill_end] + [r.end for r in records[last + 1 :]]
    return prefill_end - submitted, [b - a for a, b in itertools.pairwise(ends)]


def last_prefill(records: list[StepRecord]) -> int:
    """Index of the last step that computed prompt tokens (-1: none)."""
    return max((i for i, r in enumerate(records) if r.prefill_tokens), default=-1)


def run_batch(session: Session, batch: int, mix: Mix) -> Iteration:
    llm, w = session.llm, session.workload
    params = SamplingParams(temperature=w.temperature, max_tokens=w.output_len, ignore_eos=True)
    prompts, loras = session.prompts.make(batch), mix.assign(batch)
    preempted = llm.engine.num_preemptions
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora=loras)
    wall = time.perf_counter() - start
    records = llm.engine.step_records(since=start)
    prefill, steps = split_steps(records, start)
    seqs = [r.decode_tokens for r in records[last_prefill(records) + 1 :]]
    generated = sum(len(o.token_ids) for o in outs)
    return Iteration(prefill, steps, generated, wall, llm.engine.num_preemptions - preempted, seqs)


@dataclass
class Row:
    batch: int
    mix: str
    plan: str = ""  # the `--plan-variants` item it ran under ("" without variants or for the start plan)
    iterations: list[Iteration] = field(default_factory=list)
    floor_ms: float = 0.0
    prefill_gflop: float = 0.0
    profile: DecodeProfile = field(default_factory=DecodeProfile)  # --profile: its decode steps' kernels

    @property
    def label(self) -> str:
        return f"{f'[{self.plan}] ' if self.plan else ''}batch {self.batch} {self.mix}"

    @property
    def steps_ms(self) -> list[float]:
        return [s * 1e3 for it in self.iterations for s in it.decode_steps_s]

    @property
    def decode_tok_s(self) -> float:
        """Tokens the decode steps generated (counted, not batch x steps) per second."""
        seconds = sum(sum(it.decode_steps_s) for it in self.iterations)
        return sum(sum(it.decode_seqs) for it in self.iterations) / seconds if seconds else float("nan")

    @property
    def running(self) -> int:
        """Median sequences a decode step ran: the batch, unless the KV cache held it only in waves
        (then the floor is that of this many, and the row is marked)."""
        seqs = sorted(n for it in self.iterations for n in it.decode_seqs)
        return seqs[len(seqs) // 2] if seqs else self.batch

    @property
    def prefill_ms(self) -> float:
        return percentile([it.prefill_s * 1e3 for it in self.iterations], 50)

    @property
    def spread(self) -> float:
        """Slowest over fastest run's mean decode step (1.0 = steady)."""
        means = [
            sum(it.decode_steps_s) / len(it.decode_steps_s) for it in self.iterations if it.decode_steps_s
        ]
        return max(means) / min(means) if means else float("nan")

    def summary(self) -> dict[str, Any]:
        steps = self.steps_ms
        return {
            "batch": self.batch,
            "mix": self.mix,
            "plan": self.plan,
            "prefill_ms": self.prefill_ms,
            "decode_ms_p50": percentile(steps, 50),
            "decode_ms_p90": percentile(steps, 90),
            "decode_ms_p99": percentile(steps, 99),
            "decode_tok_s": self.decode_tok_s,
            "floor_ms": self.floor_ms,
            "floor_share": self.floor_ms / percentile(steps, 50) if steps else None,
            "spread": self.spread,
            "prefill_gflop": self.prefill_gflop,
            "decode_seqs_p50": self.running,
            "generated_tokens": sum(it.generated for it in self.iterations),
            "preemptions": sum(it.preemptions for it in self.iterations),
            "decode_kernel_us": self.profile.kernel_us,
            "decode_chain_us": self.profile.chain_us,
            "iterations": [asdict(it) for it in self.iterations],
        }


def run_latency(session: Session, args: LatencyArgs) -> list[Row]:
    """Every row (batch size x mix), under each of `--plan-variants` in turn (the plan switched and the
    decode graphs captured again between them), in one process; with `--plan-rounds` R the variants
    R times over (A B A B ...), each row's runs pooled."""
    plans = args.plan_variants or ("",)
    rows = [Row(b, m.name, p) for p in plans for b in args.batch_size for m in session.mixes]
    total = args.plan_rounds * len(rows) * (args.num_iters + args.num_iters_warmup)
    engine = session.llm.engine
    plan = ""  # the plan the session captured its graphs with (the start plan)
    with tqdm(total=total, desc="bench latency", unit="run", disable=not session.llm.args.progress) as bar:
        for round_ in range(args.plan_rounds):
            for row in rows:
                if args.plan_variants and row.plan != plan:
                    plan = row.plan
                    start = time.perf_counter()
                    engine.use_plan(plan)
                    captured = engine.capture_graphs()
                    took = f": captured {captured} decode graphs in {time.perf_counter() - start:.1f} s"
                    bar.write(f"plan {plan!r}{took if captured else ''}")
                _run_row(session, args, row, bar, round_)
    if args.plan_variants:
        engine.use_plan("")  # the plan the process started with, for whatever runs next
    if args.profile and any(r.profile.kernel_us for r in rows):
        table = kernel_table(rows)
        if any(r.profile.chain_us for r in rows):
            table += "\n" + kernel_table(rows, chain=True)
        (Path(args.profile) / "decode_kernels.md").write_text(table)
        print(table)
    return rows


def _run_row(session: Session, args: LatencyArgs, row: Row, bar: Any, round_: int) -> None:
    """One round of a row: its warm-up and timed runs; after the last round its floor, its line and (with
    --profile) its profile."""
    w, engine = session.workload, session.llm.engine
    mix = next(m for m in session.mixes if m.name == row.mix)
    if round_ == 0:
        lens = [w.input_len] * row.batch
        cfg = session.llm.model.cfg
        row.prefill_gflop = (
            prefill_flops(session.model, cfg.num_heads, cfg.head_dim, cfg.num_layers, lens) / 1e9
        )
        if row.mix == session.mixes[0].name and (need := kv_blocks_needed(session, row.batch)):
            bar.write(
                f"WARNING: batch {row.batch} needs {need} KV blocks of {engine.scheduler.block_size} "
                f"tokens at its longest; the cache holds {engine.allocator.num_blocks}: it will run in "
                "waves"
            )
    for i in range(args.num_iters_warmup + args.num_iters):
        it = run_batch(session, row.batch, mix)
        if i >= args.num_iters_warmup:
            row.iterations.append(it)
        bar.update()
    if round_ < args.plan_rounds - 1:
        steps = [s * 1e3 for it in row.iterations[-args.num_iters :] for s in it.decode_steps_s]
        bar.write(f"{row.label}, round {round_ + 1}: decode {fmt(percentile(steps, 50))} ms/step")
        return
    row.floor_ms = session.floor_ms(mix, row.running, w.input_len + w.output_len / 2)  # mean KV length
    s = row.summary()
    rounds = f" ({args.plan_rounds} rounds pooled)" if args.plan_rounds > 1 else ""
    bar.write(
        f"{row.label}: prefill {fmt(s['prefill_ms'], 1)} ms, decode "
        f"{fmt(s['decode_ms_p50'])} ms/step (floor {fmt(row.floor_ms)}), "
        f"{fmt(s['decode_tok_s'], 0)} tok/s{rounds}"
    )
    if row.running < row.batch:
        bar.write(waves_warning(session, row))
    if args.profile:
        name = f"{row.mix}_{row.plan}" if row.plan else row.mix
        stem = f"profile_b{row.batch}_{''.join(c if c.isalnum() else '_' for c in name)}"
        row.profile = profile_decode(session, row.batch, mix, Path(args.profile), stem)


def kernel_table(rows: list[Row], top: int = 30, chain: bool = False) -> str:
    """The profiled rows' kernels side by side, us a decode step (`--profile`), the largest first; with
    several rows a last column: the last row's time less the first's (base against adapters, say).
    `chain`: each kernel's share of the step's wall time (`DecodeProfile.chain_us`), not its own time."""
    profiled = [(r, t) for r in rows if (t := r.profile.chain_us if chain else r.profile.kernel_us)]
    names = sorted(
        {n for _, t in profiled for n in t}, key=lambda n: -max(t.get(n, 0.0) for _, t in profiled)
    )
    diff = len(profiled) > 1
    header = ["kernel", *(r.label for r, _ in profiled), *(["last - first"] if diff else [])]

    def line(name: str, values: list[float]) -> list[str]:
        return [name, *(fmt(v) for v in values), *([fmt(values[-1] - values[0])] if diff else [])]

    table = []
    for name in names[:top]:
        short = name if len(name) <= 60 else name[:57] + "..."
        table.append(line(short.replace("|", "/"), [t.get(name, 0.0) for _, t in profiled]))
    rest = names[top:]
    if rest:
        table.append(line(f"{len(rest)} others", [sum(t.get(n, 0.0) for n in rest) for _, t in profiled]))
    table.append(line("all" if chain else "all kernels", [sum(t.values()) for _, t in profiled]))
    replays = [r.profile.between_replays for r, _ in profiled]
    if all(replays):
        how = "the decode steps from the first CUDA-graph replay to the last"
    elif not any(replays):
        how = "a profiled run's kernels less a prefill-only run's of prompts as long, over its decode steps"
    else:
        how = "between graph replays where decode ran in graphs, else a profiled run less a prefill-only run"
    title = (
        f"decode-step kernels (us a step: {how}; with PDL a kernel's time includes its wait on the one "
        "before: MOELORA_PDL=0 for each kernel's own)"
    )
    if chain:
        title = (
            f"each kernel's share of a decode step's wall time on the card (us a step: {how}; every "
            "instant goes to the running kernel that ends first, or to "
            f"{IDLE!r} before the kernel that starts next when none runs: with or without PDL these add up "
            "to the step, and no kernel's wait counts)"
        )
    return table_text(title, header, table)


def kv_blocks_needed(session: Session, batch: int) -> int:
    """KV blocks `batch` sequences hold at their longest (prompt and every new token but the last), if
    more than the cache has; else 0."""
    engine, w = session.llm.engine, session.workload
    need = batch * blocks_for(w.input_len + w.output_len - 1, engine.scheduler.block_size)
    return need if need > engine.allocator.num_blocks else 0


def waves_warning(session: Session, row: Row) -> str:
    """What a row that did not run as one batch measured, and what to change."""
    engine = session.llm.engine
    return (
        f"WARNING: batch {row.batch} ({row.mix}) did not run as one batch: a decode step ran {row.running} "
        f"sequences (median) with {sum(it.preemptions for it in row.iterations)} preemptions; the KV cache "
        f"holds {engine.allocator.num_blocks} blocks of {engine.scheduler.block_size} tokens. Its prefill "
        f"time includes earlier waves' decoding, and its decode figures and floor are those of "
        f"{row.running} sequences. Free memory for the cache: fewer or smaller adapter slots "
        f"(--max-loras-per-batch, --max-lora-rank), a higher --gpu-memory-utilization, or a smaller batch."
    )


def print_latency(session: Session, rows: list[Row]) -> None:
    """The rows as a table ("vs base": the base row of the same batch and plan); with `--plan-variants` a
    first column names each row's plan, and each row's decode p50 is also given over that of the first
    plan's row of the same batch and mix (below 1: faster)."""
    base = {(r.plan, r.batch): r.decode_tok_s for r in rows if r.mix == "base"}
    variants = any(r.plan for r in rows)
    first = {}  # (batch, mix) -> the first plan's decode p50
    for r in rows:
        if r.plan == rows[0].plan:
            first[(r.batch, r.mix)] = r.summary()["decode_ms_p50"]
    gemm = session.ceilings.gemm_flops
    table = []
    for r in rows:
        s = r.summary()
        share = s["floor_share"]
        flag = " BELOW FLOOR" if share is not None and share > 1 else ""
        batch = str(r.batch) if r.running == r.batch else f"{r.batch} (ran {r.running})"
        prefill_rate = r.prefill_gflop * 1e9 / (r.prefill_ms / 1e3) if r.prefill_ms else float("nan")
        own_base = base.get((r.plan, r.batch))
        table.append(
            [
                *([repr(r.plan)] if variants else []),
                batch,
                r.mix,
                fmt(s["prefill_ms"], 1),
                fmt(prefill_rate / gemm * 100, 0) + "%" if gemm else "-",
                f"{fmt(s['decode_ms_p50'])} / {fmt(s['decode_ms_p90'])} / {fmt(s['decode_ms_p99'])}",
                *([_over_first(s["decode_ms_p50"], first.get((r.batch, r.mix)))] if variants else []),
                fmt(s["decode_tok_s"], 0),
                fmt(s["decode_tok_s"] / own_base * 100, 0) + "%" if own_base else "-",
                fmt(r.floor_ms),
                (fmt(share * 100, 0) + "%" if share is not None else "-") + flag,
                fmt(s["spread"], 3),
            ]
        )
    w = session.workload
    print_table(
        f"bench latency: input {w.input_len}, output {w.output_len}, {session.env['device']}, "
        f"{session.settings()['dtype']}; floor = bytes a decode step reads at "
        f"{session.ceilings.bytes_per_s / 1e12:.2f} TB/s (the faster of a measured copy and read)",
        [*(["plan"] if variants else []), "batch", "mix", "prefill ms", "prefill / GEMM rate",
         "decode ms/step p50 / p90 / p99", *(["p50 / first plan's"] if variants else []), "decode tok/s",
         "vs base", "floor ms", "floor / p50", "spread"],
        table,
    )  # fmt: skip


def _over_first(p50: float | None, first: float | None) -> str:
    """A row's decode p50 over the first plan's (same batch and mix), 3 decimals; "-" where either is
    missing."""
    if p50 is None or not first:
        return "-"
    return f"{p50 / first:.3f}"

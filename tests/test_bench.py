"""`moelora bench`: fresh prompts, decode steps from the engine's own timestamps, floors, clear errors."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moelora import LLM, ops
from moelora.benchmark.args import LatencyArgs, WorkloadArgs
from moelora.benchmark.latency import Row, kernel_table, print_latency, run_latency, split_steps
from moelora.benchmark.profile import (
    GRAPH_KERNELS,
    IDLE,
    DecodeProfile,
    DeviceEvent,
    _grid,
    _on_device,
    chain_shares,
    device_events,
    per_decode_step,
    replay_steps,
    timeline_summary,
)
from moelora.benchmark.session import open_session
from moelora.benchmark.workload import BASE, Mix, PromptMaker, build_mixes
from moelora.cli import main
from moelora.lora.dummy import DummyLora
from moelora.ops.plan import TUNED, KernelPlan

TINY = "preset:tiny-qwen3-moe"


def test_prompts_are_fresh_across_runs_unless_a_prefix_is_shared():
    maker = PromptMaker(512, WorkloadArgs(input_len=40), seed=0)
    runs = [maker.make(64) for _ in range(5)]
    prompts = [tuple(p) for run in runs for p in run]
    assert len(set(prompts)) == len(prompts) and all(len(p) == 40 for p in prompts)
    assert len({p[:16] for p in prompts}) == len(prompts)  # no two share even a first KV block
    shared = PromptMaker(512, WorkloadArgs(input_len=40, shared_prefix_len=20), seed=0).make(8)
    assert len({tuple(p[:20]) for p in shared}) == 1 and len({tuple(p[20:36]) for p in shared}) == 8
    with pytest.raises(ValueError, match="distinct prompts"):
        PromptMaker(4, WorkloadArgs(input_len=1), seed=0).make(5)


def test_mixes_spread_adapters_over_the_batch():
    names = [f"dummy-{i}" for i in range(8)]
    (base, mixed) = build_mixes(WorkloadArgs(), names)
    assert base.assign(3) == [None] * 3 and sorted(mixed.assign(8)) == names
    assert mixed.assign(1) == ["dummy-0"]
    (quarter,) = build_mixes(WorkloadArgs(loras_per_batch=2, base_share=0.5, base_row=False), names)
    assert quarter.assign(8).count(None) == 4 and quarter.assign(8).count("dummy-1") == 2
    mix = Mix("m", ((None, 1.0), ("a", 3.0)))
    assert mix.assign(4) == ["a", None, "a", "a"]
    with pytest.raises(ValueError, match="'nope', which is not loaded"):
        build_mixes(WorkloadArgs(lora_mix=("base:0.5,nope:0.5",)), names)
    with pytest.raises(ValueError, match="NAME:SHARE"):
        build_mixes(WorkloadArgs(lora_mix=("dummy-0",)), names)
    with pytest.raises(ValueError, match="--loras-per-batch 9 but 8"):
        build_mixes(WorkloadArgs(loras_per_batch=9), names)
    assert [m.name for m in build_mixes(WorkloadArgs(), [])] == [BASE]


@pytest.fixture(scope="module")
def tiny_llm():
    adapters = {f"dummy-{i}": DummyLora(rank=8, seed=i) for i in range(2)}
    with LLM(TINY, device="cpu", progress=False, lora_modules=adapters, max_loras_per_batch=2) as llm:
        yield llm


def test_latency_decode_steps_are_the_engine_s_timestamps(tiny_llm):
    """Every decode step the bench reports is the gap between two consecutive engine step ends, after the
    last step that computed prompt tokens; every request generated all its tokens."""
    w = WorkloadArgs(input_len=24, output_len=6)
    session = open_session(tiny_llm, w, ["dummy-0", "dummy-1"], seed=0)
    assert [m.name for m in session.mixes] == ["base", "2 adapters"]
    rows = run_latency(session, LatencyArgs(batch_size=(3,), num_iters=2, num_iters_warmup=0))
    for row in rows:
        for it in row.iterations:
            assert it.generated == 3 * w.output_len and it.preemptions == 0
            assert len(it.decode_steps_s) == w.output_len - 1
            assert it.prefill_s + sum(it.decode_steps_s) <= it.wall_s
            assert it.wall_s - (it.prefill_s + sum(it.decode_steps_s)) < 0.25 * it.wall_s
        s = row.summary()
        assert s["floor_ms"] > 0 and s["decode_ms_p50"] <= s["decode_ms_p99"]
    last_run = tiny_llm.engine.step_records()[-w.output_len :]  # one prefill step, then decode steps
    assert [(r.prefill_tokens, r.decode_tokens) for r in last_run] == [(3 * 24, 0)] + [(0, 3)] * 5
    assert [r.num_adapters for r in last_run] == [2] * w.output_len
    prefill, steps = split_steps(last_run, last_run[0].start)
    assert prefill == last_run[0].end - last_run[0].start
    assert steps == [b.end - a.end for a, b in itertools.pairwise(last_run)]


def test_plan_variants_run_every_row_under_each_plan_in_one_process(tiny_llm, monkeypatch, capsys):
    """`--plan-variants`: the rows run under each plan in turn, every decode step of a variant's rows
    taking that plan through the ops' default argument; the start plan is back afterwards; a bad variant
    is refused before the model loads."""
    w = WorkloadArgs(input_len=16, output_len=4)
    session = open_session(tiny_llm, w, ["dummy-0"], seed=0)
    executor = tiny_llm.engine.executor
    seen: list[bool] = []  # the plan a decode step's ops take by default, at each step
    default = inspect.signature(ops.fuses_rotary_decode).parameters["plan"]
    real_step = executor.step
    monkeypatch.setattr(executor, "step", lambda *a, **k: (seen.append(default.default.rotary_in_decode),
                                                            real_step(*a, **k))[1])  # fmt: skip
    start = TUNED.rotary_in_decode
    args = LatencyArgs(batch_size=(1, 2), num_iters=1, num_iters_warmup=0,
                       plan_variants=("", "rotary_in_decode=False"))  # fmt: skip
    rows = run_latency(session, args)
    assert [(r.plan, r.batch, r.mix) for r in rows] == [
        (p, b, m) for p in ("", "rotary_in_decode=False") for b in (1, 2) for m in ("base", "1 adapter")
    ]
    steps_per_plan = len(seen) // 2  # both plans ran the same rows, so the same steps
    assert seen == [start] * steps_per_plan + [False] * steps_per_plan and start is True
    assert TUNED.rotary_in_decode is start
    print_latency(session, rows)
    out = capsys.readouterr().out
    assert "| plan | batch |" in out and "| 'rotary_in_decode=False' | 2 | 1 adapter |" in out
    assert out.count("| 100% |") == 4  # each plan's base row against itself
    assert "| p50 / first plan's |" in out and out.count("| 1.000 |") >= 4  # the first plan against itself


def test_profile_tables_each_kernel_a_decode_step_side_by_side():
    """`--profile`: a kernel's time a decode step is its time in the profiled run less that in a prefill
    alone, over the decode steps; the rows' kernels side by side, largest first, the last row less the
    first, the kernels past the top summed."""
    run = {"gemv": 70.0, "prefill_gemm": 40.0, "norm": 7.0}
    prefill = {"prefill_gemm": 40.0, "gemv": 0.0, "norm": 1.0}
    assert per_decode_step(run, prefill, 7) == {"gemv": 10.0, "norm": 6.0 / 7}
    base, mixed = Row(1, "base"), Row(1, "8 adapters", "rotary_in_decode=False")
    base.profile.kernel_us = {"gemv": 10.0, "norm": 2.0, "router": 1.0}
    mixed.profile.kernel_us = {"gemv": 12.5, "lora_shrink": 3.0, "norm": 2.0}
    text = kernel_table([base, mixed], top=2)
    lines = text.splitlines()
    assert (
        lines[1] == "| kernel | batch 1 base | [rotary_in_decode=False] batch 1 8 adapters | last - first |"
    )
    assert lines[3:] == [
        "| gemv | 10.00 | 12.50 | 2.50 |",
        "| lora_shrink | 0.00 | 3.00 | 3.00 |",
        "| 2 others | 3.00 | 2.00 | -1.00 |",
        "| all kernels | 13.00 | 17.50 | 4.50 |",
    ]


def test_chain_shares_add_up_to_the_span_with_and_without_overlap():
    """Each instant goes to the running event that ends first: a kernel that started during the one before
    (PDL) gets only its time past that one's end, not its wait; a gap with nothing running is idle; a copy
    on another stream inside a kernel gets the time it ran. The shares add up to the span (0 to 100 us)."""
    trace = [
        DeviceEvent(0, 20, "qkv", 1),
        DeviceEvent(5, 30, "attn", 1),  # started during qkv (PDL): ends at 30, 10 past qkv
        DeviceEvent(22, 25, "Memcpy HtoD", 2),  # inside attn, ending first: 3 of attn's
        DeviceEvent(40, 50, "o_proj", 1),  # 10 idle before it
        DeviceEvent(50, 80, "qkv", 3),
        DeviceEvent(70, 100, "attn", 3),
    ]
    shares = chain_shares(trace)
    idle = f"{IDLE} before o_proj"  # the launch the card waited for
    assert shares == {idle: 10.0, "qkv": 50.0, "attn": 27.0, "Memcpy HtoD": 3.0, "o_proj": 10.0}
    assert sum(shares.values()) == 100.0
    base, mixed = Row(1, "base"), Row(1, "8 adapters")
    base.profile = DecodeProfile({"qkv": 1.0}, {"qkv": 4.0, IDLE: 1.0})
    mixed.profile = DecodeProfile({"qkv": 1.0}, {"qkv": 5.0, IDLE: 1.5})
    text = kernel_table([base, mixed], chain=True)
    assert text.startswith("each kernel's share of a decode step's wall time")
    assert "| qkv | 4.00 | 5.00 | 1.00 |" in text and "| all | 5.00 | 6.50 | 1.50 |" in text
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(4).sum()
    assert device_events(prof) == []  # the profiler's own events: a CPU op is not the card's
    # torch 2.11 (the GPU machine's) has no activity_type: the device type decides, annotations excluded
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    old = [
        SimpleNamespace(device_type=lambda d=d: d, is_user_annotation=lambda a=a: a)
        for d, a in [(cuda, False), (cuda, True), (cpu, False)]
    ]
    assert [_on_device(e) for e in old] == [True, False, False]
    # a kernel's grid from the profiler's metadata (what the trace's "grid" holds), on its table row
    meta = '"queued": 0, "grid": [80, 1, 1], "block": [128, 1, 1]'
    assert _grid(SimpleNamespace(metadata_json=lambda: meta)) == "80x1x1"
    assert _grid(SimpleNamespace(metadata_json=lambda: "")) == "" and _grid(SimpleNamespace()) == ""
    assert DeviceEvent(0, 1, "_linear_kernel", 7, "80x1x1").label == "_linear_kernel (80x1x1)"
    assert DeviceEvent(0, 1, "x" * 60, 7, "1x4x32").label == "x" * 45 + "... (1x4x32)"
    assert _on_device(SimpleNamespace(activity_type=lambda: "gpu_memset"))
    assert not _on_device(SimpleNamespace(activity_type=lambda: "gpu_user_annotation"))
    # per launch (correlation 1 and 3: two graph replays; the copy is its own launch)
    lines = timeline_summary(trace).splitlines()
    assert lines[2].split() == ["3", "50", "40", "80%", "5.0", "-"]  # gaps between its kernels: 0 and 10
    assert lines[3].split() == ["2", "50", "50", "100%", "0.0", "0"]


def test_replay_steps_take_whole_decode_steps_between_graph_replays():
    """The decode steps of a profiled run: from the first graph replay (a launch of many kernels) to the
    last one's start; eager prefill kernels before them and the last step's tail are left out, and the
    sampling after a replay and the idle time before the next belong to its step."""

    def replay(t0: float, correlation: int) -> list[DeviceEvent]:
        return [DeviceEvent(t0 + i, t0 + i + 1, "layer", correlation) for i in range(GRAPH_KERNELS)]

    prefill = [DeviceEvent(float(i), i + 0.5, "prefill_gemm", i) for i in range(20)]  # one launch each
    steps = [*replay(100, 50), DeviceEvent(110, 112, "sample", 51), *replay(120, 52)]
    steps += [DeviceEvent(130, 131, "sample", 53), *replay(140, 54), DeviceEvent(150, 152, "sample", 55)]
    got = replay_steps(sorted(prefill + steps))
    assert got is not None
    window, count = got
    assert count == 2 and {e.name for e in window} == {"layer", "sample"}
    assert min(e.start for e in window) == 100 and max(e.end for e in window) == 140  # the end mark
    shares = chain_shares(window)  # two steps of 20 us: the replay, its sampling, idle time before each
    assert shares == {
        "layer": 16.0,
        "sample": 3.0,
        f"{IDLE} before sample": 4.0,
        f"{IDLE} before layer": 17.0,
    }
    assert replay_steps(prefill + replay(100, 50)) is None  # one replay: no whole step
    row = Row(1, "base")
    row.profile = DecodeProfile({"layer": 8.0}, between_replays=True)
    assert "from the first CUDA-graph replay to the last" in kernel_table([row])
    assert "prefill-only run" in kernel_table(
        [row, Row(1, "8 adapters", profile=DecodeProfile({"layer": 9.0}))]
    )


@pytest.mark.gpu
def test_profile_writes_the_decode_kernels_on_a_gpu(tmp_path: Path, capsys):
    """On the card the profiler sees the kernels of the engine's thread and of graph replays."""
    argv = ["bench", "latency", "demo", "--no-progress", "--batch-size", "1", "--input-len", "16",
            "--output-len", "8", "--num-iters", "1", "--profile", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    table = (tmp_path / "decode_kernels.md").read_text()
    assert "| all kernels |" in table and "_kernel" in table  # Triton kernels by name
    assert "share of a decode step's wall time" in table
    assert "decode-step kernels" in capsys.readouterr().out


def test_plan_rounds_alternate_the_variants_and_pool_each_row(tiny_llm, monkeypatch, capsys):
    """`--plan-rounds 2`: A B A B, each row's runs from both rounds pooled (a drift shows in its spread)."""
    session = open_session(tiny_llm, WorkloadArgs(input_len=16, output_len=4), [], seed=0)
    executor = tiny_llm.engine.executor
    seen: list[bool] = []
    default = inspect.signature(ops.fuses_rotary_decode).parameters["plan"]
    real_step = executor.step
    monkeypatch.setattr(executor, "step", lambda *a, **k: (seen.append(default.default.rotary_in_decode),
                                                            real_step(*a, **k))[1])  # fmt: skip
    args = LatencyArgs(batch_size=(1,), num_iters=1, num_iters_warmup=0,
                       plan_variants=("", "rotary_in_decode=False"), plan_rounds=2)  # fmt: skip
    rows = run_latency(session, args)
    assert [(r.plan, len(r.iterations)) for r in rows] == [("", 2), ("rotary_in_decode=False", 2)]
    run = len(seen) // 4  # the steps of one run
    assert seen == [True] * run + [False] * run + [True] * run + [False] * run
    out = capsys.readouterr()
    assert "[rotary_in_decode=False] batch 1 base, round 1: decode" in out.out + out.err
    assert "(2 rounds pooled)" in out.out + out.err


def test_use_plan_waits_for_the_engine_to_be_empty(tiny_llm, monkeypatch):
    monkeypatch.setattr(tiny_llm.engine.scheduler, "has_work", lambda: True)
    with pytest.raises(RuntimeError, match="requests are running or waiting"):
        tiny_llm.engine.use_plan("decode_pairs=3")
    assert TUNED.decode_pairs == KernelPlan().decode_pairs


def test_a_batch_the_kv_cache_holds_only_in_waves_is_reported_as_what_ran(capsys):
    """4 sequences of 30 tokens need 8 blocks of 16; with 4 the engine runs them in waves of 2. The row
    counts the tokens the decode steps generated, takes the floor of the sequences a step ran, and says
    so (a floor computed for the whole batch would put the figures below it)."""
    w = WorkloadArgs(input_len=24, output_len=6)
    with LLM(TINY, device="cpu", progress=False, num_kv_blocks=4, block_size=16) as llm:
        session = open_session(llm, w, [], seed=0)
        (row,) = run_latency(session, LatencyArgs(batch_size=(4,), num_iters=1, num_iters_warmup=0))
        whole = session.floor_ms(session.mixes[0], 4, w.input_len + w.output_len / 2)
    (it,) = row.iterations
    assert it.generated == 4 * w.output_len and row.running == 2 and max(it.decode_seqs) == 2
    assert row.decode_tok_s == sum(it.decode_seqs) / sum(it.decode_steps_s)
    assert 0 < row.floor_ms < whole
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "did not run as one batch: a decode step ran 2 sequences" in out and "4 blocks of 16" in out
    assert "batch 4 needs 8 KV blocks of 16 tokens at its longest; the cache holds 4" in out


def test_bench_cli_runs_and_writes_json(tmp_path: Path, capsys):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    argv = ["bench", "latency", TINY, "--no-progress", "--dummy-loras", "2", "--max-loras-per-batch", "2",
            "--batch-size", "1", "2", "--input-len", "16", "--output-len", "4", "--num-iters", "1",
            "--num-iters-warmup", "0", "--output-json", str(out), "--plot", str(png)]  # fmt: skip
    assert main(argv) == 0
    assert png.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "floor / p50" in text and "| 2 | 2 adapters |" in text and "dummy weights" in text
    data = json.loads(out.read_text())
    assert [(r["batch"], r["mix"]) for r in data["rows"]] == [
        (1, "base"), (1, "2 adapters"), (2, "base"), (2, "2 adapters"),
    ]  # fmt: skip
    assert data["settings"]["prefix_caching"] is True and data["rows"][0]["generated_tokens"] == 4
    argv = ["bench", "throughput", TINY, "--no-progress", "--num-prompts", "6", "--num-prompts-warmup", "0",
            "--input-len", "8", "--output-len", "3"]  # fmt: skip
    assert main(argv) == 0
    assert "| base | 6 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-mix", "base:1,ghost:1"], "'ghost', which is not loaded"),
        (["--batch-size", "0"], "--batch-size needs sizes >= 1"),
        (["--dummy-loras", "2", "--loras-per-batch", "3"], "--loras-per-batch 3 but 2"),
        (["--dummy-loras", "5"], "raise --max-loras-per-batch to 5"),
        (["--input-len", "5000"], "above max_model_len"),
        (["--load-format", "safetensors"], "has no weights"),
        (["--dummy-loras", "1", "--dummy-lora-targets", "router"], "choose from attn"),
        (["--hf-overrides", "[1]"], "must be a JSON object"),
        (
            ["--plan-variants", "", "rotary_in_decode=1"],
            "--plan-variants: MOELORA_PLAN item 'rotary_in_decode=1'",
        ),
        (["--plan-variants", "pdl=False", "pdl=False"], "names a plan twice"),
        (["--plan-rounds", "0"], "--plan-rounds must be >= 1"),
    ],
)
def test_bench_errors_are_clear(flags, message, capsys):
    argv = ["bench", "latency", TINY, "--no-progress", "--input-len", "8", "--output-len", "2", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_serve_starts_a_server_with_the_model_flags(tmp_path: Path, capsys):
    """Without --base-url the bench starts `moelora serve` with the same model and adapter flags and
    streams every request of each mix through it."""
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", TINY, "--no-progress", "--dummy-loras", "2", "--max-loras-per-batch", "2",
            "--num-prompts", "6", "--input-len", "8", "--output-len", "3", "--request-rate", "50",
            "--goodput", "ttft:60000", "--output-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mix"] for r in rows] == ["base", "2 adapters"]
    assert all(r["failed"] == 0 and r["generated_tokens"] == 18 and r["goodput"] > 0 for r in rows)
    assert "TTFT ms p50 / p99" in capsys.readouterr().out


def test_fp8_halves_the_weight_bytes_of_the_floor():
    """With `quantization="fp8"` the floors count the experts and the linear layers at a byte a weight
    plus their scales (4 bytes per 128 columns), and the active parameters are parameters, not bytes."""
    from moelora.benchmark.floors import model_bytes
    from moelora.layers.linear import ColumnLinear, RowLinear

    sizes, itemsize, shrunk = {}, 0, 0
    for quant in ("none", "fp8"):
        with LLM(TINY, device="cpu", progress=False, quantization=quant, num_kv_blocks=8) as llm:
            sizes[quant] = model_bytes(llm.model, kv_per_token=0)
            itemsize = llm.model.dtype.itemsize
            for m in llm.model.modules():
                if isinstance(m, (ColumnLinear, RowLinear)) and m.scales is not None:
                    table = m.scales.table
                    shrunk += m.weight.numel() * (itemsize - 1) - table.numel() * table.element_size()
    weights = sizes["none"].expert // itemsize
    assert weights < sizes["fp8"].expert < weights * 1.1
    assert sizes["fp8"].active_params == sizes["none"].active_params  # parameters, not bytes
    assert shrunk > 0 and sizes["fp8"].always == sizes["none"].always - shrunk


@pytest.mark.parametrize(("value", "pdl"), [(None, True), ("1", True), ("0", False), ("yes", None)])
def test_moelora_pdl_sets_the_plans_default(value: str | None, pdl: bool | None):
    """MOELORA_PDL=0 turns programmatic dependent launch off (for a profile with each kernel's own time),
    read when the plan is imported; anything but 0 or 1 is refused with the variable's name."""
    env = {k: v for k, v in os.environ.items() if k != "MOELORA_PDL"}
    if value is not None:
        env["MOELORA_PDL"] = value
    code = "from moelora.ops.plan import TUNED, KernelPlan; print(TUNED.pdl, KernelPlan().pdl)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if pdl is None:
        assert run.returncode != 0 and "MOELORA_PDL='yes': 1" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [str(pdl), str(pdl)]


def test_latency_rows_reach_a_pipe_as_they_are_measured():
    """A row's line is written through (line-buffered stdout) as soon as it is measured, also into a pipe:
    the first row is read while the run still measures the rest, so a run cut short keeps its rows."""
    cmd = [sys.executable, "-m", "moelora.cli", "bench", "latency", "demo", "--no-progress"]
    cmd += ["--input-len", "8", "--output-len", "64", "--num-iters", "3", "--batch-size", "1", "8", "32"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("batch 1 base:"):
                time.sleep(1.0)  # the rows left take several seconds more
                assert proc.poll() is None, "the first row came only when the run ended"
                break
        else:
            raise AssertionError("no row line")
    finally:
        proc.kill()
        proc.wait()

"""Tensor and expert parallelism on CPU (gloo, one torch thread per process): every TP x EP layout runs one
mixed adapter batch and agrees with the single-process run and with transformers (adapters merged by hand).

float64 takes rounding out of the comparison, so the tolerance checks the sharding itself; one fp32 layout
per family shows the user's dtype works too. Each LLM starts its own worker processes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moelora import LLM, SamplingParams
from moelora.engine.stream import EngineDeadError
from moelora.outputs import RequestOutput
from moelora.parallel.launch import WorkerError
from tests.hf_models import VOCAB, build_hf_model, hf_logprobs, logprob_tol, save_per_expert
from tests.lora_files import ExpectedLora, merged_hf_model
from tests.test_engine_hf import hf_greedy

TOL = 1e-4  # between moelora layouts computing in the same dtype
NEAR_TIE = 1e-3
NEW_TOKENS = 8
# (family, tp, ep, dtype): the full matrix on Qwen3-MoE, (2, 2) on the others, 6 experts over ep=4,
# GLM-4.5's grouped routing and DeepSeek-V3's latent attention (heads split, latent replicated) at (4, 4).
LAYOUTS = [
    *[("qwen3_moe", tp, ep, "float64") for tp, ep in [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]],
    ("qwen3_moe", 4, 2, "float32"),
    *[(f, 2, 2, "float64") for f in ("qwen2_moe", "mixtral", "olmoe")],
    ("olmoe", 2, 1, "float32"),
    ("qwen2_moe", 4, 4, "float64"),
    *[("glm4_moe", tp, ep, "float64") for tp, ep in [(2, 2), (4, 4)]],
    *[("deepseek_v3", tp, ep, "float64") for tp, ep in [(2, 2), (4, 4)]],
    ("deepseek_v2", 2, 2, "float64"),
]


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(23)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 12)]


def run_batch(
    checkpoint: Path,
    adapters: dict[str, tuple[Path, ExpectedLora]],
    tp: int,
    ep: int,
    dtype: str,
    device: str = "cpu",
) -> tuple[list[str | None], list[RequestOutput], list[torch.Tensor]]:
    names: list[str | None] = [None, *adapters]
    lora = [n for n in names for _ in prompts()]
    batch = [p for _ in names for p in prompts()]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=3)
    with LLM(
        str(checkpoint),
        device=device,
        dtype=dtype,
        progress=False,
        tp_size=tp,
        ep_size=ep,
        num_kv_blocks=64,
        lora_modules={n: str(folder) for n, (folder, _) in adapters.items()},
        max_loras_per_batch=3,
    ) as llm:
        outs = llm.generate(batch, params, lora=lora)
        logits = llm.logits(prompts())  # the cacheless forward goes through the workers too
    return lora, outs, logits


@pytest.fixture(scope="module")
def single(checkpoints, mixed_adapters, one_thread) -> dict[tuple[str, str], Any]:
    """The single-process run of each (family, dtype) a layout needs, computed once."""
    wanted = {(f, d) for f, _, _, d in LAYOUTS}
    return {(f, d): run_batch(checkpoints[f], mixed_adapters[f], 1, 1, d) for f, d in sorted(wanted)}


@pytest.mark.parametrize(
    ("family", "tp", "ep", "dtype"), LAYOUTS, ids=[f"{f}-tp{t}-ep{e}-{d}" for f, t, e, d in LAYOUTS]
)
def test_layout_matches_single_process_and_transformers(
    family, tp, ep, dtype, hf_models, checkpoints, mixed_adapters, single, one_thread
):
    run = run_batch(checkpoints[family], mixed_adapters[family], tp, ep, dtype)
    check_layout(family, hf_models[family], mixed_adapters[family], tp, ep, dtype, run, single[family, dtype])


@pytest.mark.parametrize(("tp", "ep"), [(8, 8), (8, 4)])
def test_eight_way_layouts(tp, ep, tmp_path: Path, one_thread):
    """tp=8 with ep=8 (one expert a rank) and ep=4 (each expert's columns over two ranks) on a Qwen3-MoE
    with 8 query heads and 2 key/value heads (each replicated over four ranks): the mixed batch equals the
    single process's and transformers'."""
    check_new_model_layout("qwen3_moe", tp, ep, tmp_path, num_attention_heads=8)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_uneven_experts_in_grouped_families(family, tmp_path: Path, one_thread):
    """DeepSeek-V3's and GLM-4.5's group-limited routing with 6 experts in 2 groups over ep=4 (2, 2, 1 and
    1 experts a rank), tp=4: the mixed batch equals the single process's and transformers'."""
    check_new_model_layout(family, 4, 4, tmp_path, n_routed_experts=6)


def model_with_adapters(
    family: str, folder: Path, **overrides: Any
) -> tuple[Any, Path, dict[str, tuple[Path, ExpectedLora]]]:
    """A test model of `family` with config `overrides` (transformers, fp32), its checkpoint and the three
    mixed adapters, written under `folder`."""
    from tests.lora_files import adapter_specs, write_adapter

    base = build_hf_model(family, **overrides)
    checkpoint = save_per_expert(base, folder / "model")
    num_experts = getattr(base.config, "n_routed_experts", None) or base.config.num_experts
    adapters = {
        name: (folder / name, write_adapter(folder / name, family, base.config, **spec))
        for name, spec in adapter_specs(num_experts).items()
    }
    return base, checkpoint, adapters


def check_new_model_layout(family: str, tp: int, ep: int, folder: Path, **overrides: Any) -> None:
    base, checkpoint, adapters = model_with_adapters(family, folder, **overrides)
    single, run = (run_batch(checkpoint, adapters, t, e, "float64") for t, e in ((1, 1), (tp, ep)))
    check_layout(family, base, adapters, tp, ep, "float64", run, single)


def check_layout(
    family: str,
    base: Any,
    adapters: dict[str, tuple[Path, ExpectedLora]],
    tp: int,
    ep: int,
    dtype: str,
    run: tuple[list[str | None], list[RequestOutput], list[torch.Tensor]],
    single: tuple[list[str | None], list[RequestOutput], list[torch.Tensor]],
) -> None:
    """A layout's run of the mixed batch against the single process's and transformers' (`base` and its
    adapters merged by hand; hf_greedy and hf_logprobs compute in float64)."""
    lora, outs, logits = run
    _, ref_outs, ref_logits = single
    if True:
        references = {None: base} | {n: merged_hf_model(base, exp) for n, (_, exp) in adapters.items()}
        for name, prompt, out, ref in zip(
            lora, [p for _ in range(4) for p in prompts()], outs, ref_outs, strict=True
        ):
            where = f"{family} tp={tp} ep={ep} {name or 'base'}"
            model = references[name]
            hf_tokens, margins = hf_greedy(model, prompt, NEW_TOKENS)
            for i, (a, b, c) in enumerate(zip(out.token_ids, ref.token_ids, hf_tokens, strict=True)):
                if margins[i] < NEAR_TIE:
                    break
                assert a == b == c, (where, i, out.token_ids, ref.token_ids, hf_tokens)
            (hf,) = hf_logprobs(model, [prompt])
            assert out.prompt_logprobs is not None and ref.prompt_logprobs is not None
            for i, (got, want) in enumerate(
                zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True), 1
            ):
                assert got is not None and want is not None and set(got) == set(want), (where, i)
                for tok, lp in got.items():
                    assert abs(lp - want[tok]) < TOL, (where, "vs single process", i, tok)
                    hf_tol = logprob_tol(dtype)
                    assert abs(lp - hf[i - 1, tok].item()) < hf_tol, (where, "vs transformers", i, tok)
        for got, want in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)


# ---- failures are clear and fast


def test_bad_layouts_fail_before_any_process_starts(checkpoints, tmp_path: Path):
    from transformers import Qwen3MoeConfig

    with pytest.raises(ValueError, match="ep_size 3 does not divide tp_size 4"):
        LLM(str(checkpoints["qwen3_moe"]), device="cpu", tp_size=4, ep_size=3, progress=False)
    with pytest.raises(ValueError, match=r"tp_size=8.*does not divide the 4 attention heads"):
        LLM(str(checkpoints["qwen3_moe"]), device="cpu", tp_size=8, progress=False)
    with pytest.raises(ValueError, match=r"tp_size=3.*vocab size \(160\) is not divisible by 3"):
        LLM(str(checkpoints["qwen3_moe"]), device="cpu", tp_size=3, progress=False)
    two = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        moe_intermediate_size=8,
        num_experts=2,
        num_experts_per_tok=1,
    )
    two.architectures = ["Qwen3MoeForCausalLM"]
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="ep_size 4 is larger than the model's 2 experts"):
        LLM(str(tmp_path / "two"), device="cpu", tp_size=4, ep_size=4, progress=False)


def test_a_dead_worker_fails_the_driver_with_its_rank(checkpoints, one_thread):
    llm = LLM(str(checkpoints["mixtral"]), device="cpu", tp_size=2, progress=False, num_kv_blocks=16)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([[5, 6, 7]], params)[0].token_ids) == 4
        assert llm.workers is not None
        proc = llm.workers._procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises((EngineDeadError, WorkerError), match="worker rank 1 exited with code -9"):
            llm.generate([[5, 6, 7]], params)
        assert time.monotonic() - start < 30
        with pytest.raises(WorkerError, match="worker rank 1"):
            llm.logits([[1, 2, 3]])
    finally:
        llm.shutdown()


def test_a_worker_that_cannot_load_names_its_rank(checkpoints, tmp_path: Path, one_thread):
    """The driver's own share loads; rank 1's expert file is gone: the error names rank 1 and the file."""
    import json
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen3_moe"], folder)
    # Split the checkpoint so that rank 1's experts (4..7 with ep=2) live in a file of their own, then
    # truncate that file: rank 0 never opens it.
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    late = {k: v for k, v in state.items() if any(f".experts.{e}." in k for e in range(4, 8))}
    early = {k: v for k, v in state.items() if k not in late}
    (folder / "model.safetensors").unlink()
    save_file(early, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(late, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in early}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in late}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    late_file = folder / "model-00002-of-00002.safetensors"
    late_file.write_bytes(late_file.read_bytes()[:-100])
    with pytest.raises(WorkerError, match=r"worker rank 1 .*model-00002-of-00002"):
        LLM(str(folder), device="cpu", tp_size=2, ep_size=2, progress=False)


def test_a_worker_that_finds_changed_adapter_files_fails_only_that_adapter(
    checkpoints, mixed_adapters, tmp_path: Path, one_thread
):
    """Rank 0 serves its CPU copy, each worker reads the adapter from disk when it takes a slot; files
    changed in between would make the ranks disagree, so every rank leaves the slot empty instead, the
    adapter's requests fail with the reason and the rest of the batch runs."""
    import shutil

    folder = tmp_path / "r4"
    shutil.copytree(mixed_adapters["mixtral"]["r4-per-expert"][0], folder)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(
        str(checkpoints["mixtral"]),
        device="cpu",
        tp_size=2,
        ep_size=2,
        progress=False,
        num_kv_blocks=32,
        lora_modules={"r4": str(folder), "r8": str(mixed_adapters["mixtral"]["r8-fused"][0])},
    ) as llm:
        base = llm.generate([[5, 6, 7]], params)[0].token_ids
        time.sleep(0.01)
        (folder / "adapter_config.json").write_text((folder / "adapter_config.json").read_text() + "\n")
        streams = [llm.engine.submit_stream([5, 6, 7], params, lora=n) for n in ("r4", None, "r8")]
        with pytest.raises(ValueError, match=r"adapter 'r4': the files .* changed .*\(on worker rank 1\)"):
            streams[0].result()
        assert streams[1].result().token_ids == base
        assert len(streams[2].result().token_ids) == 4
        assert [i.name for i in llm.list_loras()] == ["r8"]


def exits_within(pid: int, seconds: float) -> bool:
    """Whether process `pid` exits (or is a zombie: exited, not yet reaped) in time; killed if not."""
    status, deadline = Path(f"/proc/{pid}/status"), time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in status.read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return False


def test_workers_exit_when_the_driver_is_killed(checkpoints, tmp_path: Path):
    """A driver that dies without shutting down (SIGKILL) leaves no worker behind."""
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(
        "import sys, time, torch\n"
        "torch.set_num_threads(1)\n"
        "from moelora import LLM\n"
        f"llm = LLM({str(checkpoints['mixtral'])!r}, tp_size=2, device='cpu', progress=False, "
        "num_kv_blocks=8)\n"
        "print(llm.workers._procs[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        worker_pid = int(driver.stdout.readline())
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        assert exits_within(worker_pid, 15), "the worker outlived its driver"
    finally:
        driver.kill()


def test_the_parent_watch_ends_an_orphan(tmp_path: Path):
    """The worker's own guard, for collectives that would not notice a dead driver (NCCL): a process
    calling exit_with_parent exits once its parent is gone, even while blocked."""
    import subprocess
    import sys

    child = tmp_path / "child.py"
    child.write_text(
        "import time\n"
        "from moelora.parallel.launch import exit_with_parent\n"
        "exit_with_parent()\n"
        "print('armed', flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, {str(child)!r}], stdout=sys.stdout)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child_pid = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "armed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert exits_within(child_pid, 10), "the orphan kept running"
    finally:
        proc.kill()


def test_n_completions_share_the_prompt_on_every_rank(checkpoints, one_thread):
    """The copy of a shared prompt's partial block is repeated on the workers, and a prompt's cached
    prefix blocks are reused on every rank: the same completions as one process (and after a change of
    kernel plan, which every rank takes)."""
    params = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=6, ignore_eos=True)
    prompt = [5, 17, 33, 2, 90, 41, 7]  # 7 tokens: the last block (of 4) is partial
    outs = {}
    for tp in (1, 2):
        with LLM(
            str(checkpoints["qwen3_moe"]), device="cpu", dtype="float64", tp_size=tp, ep_size=tp,
            progress=False, num_kv_blocks=32, block_size=4,
        ) as llm:  # fmt: skip
            outs[tp] = [c.token_ids for c in llm.generate([prompt], params)[0].outputs]
            hits = llm.engine.allocator.hits
            again = [c.token_ids for c in llm.generate([prompt], params)[0].outputs]
            assert llm.engine.allocator.hits > hits and again == outs[tp]
            llm.engine.use_plan("decode_pairs=3")  # every rank takes the message (`UsePlan`) and goes on
            try:
                assert [c.token_ids for c in llm.generate([prompt], params)[0].outputs] == outs[tp]
            finally:
                llm.engine.use_plan("")
    assert outs[1] == outs[2]


def test_async_scheduling_feeds_every_rank(checkpoints, one_thread):
    """Steps queued before rank 0 has read the previous step's tokens: the workers get those tokens in a
    broadcast on the device and compute the same step; the completions equal those of waiting steps
    (sampled, n > 1, free endings)."""
    from tests.test_engine import assert_same_outputs, fed_steps

    batch = prompts()
    params = [
        SamplingParams(temperature=1.0, seed=3, max_tokens=9),
        SamplingParams(temperature=0.8, seed=4, max_tokens=6, n=2, logprobs=2),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    ]
    outs = {}
    for overlap in (False, True):
        with LLM(
            str(checkpoints["qwen3_moe"]), device="cpu", dtype="float64", tp_size=2, ep_size=2,
            progress=False, num_kv_blocks=32, block_size=4, async_scheduling=overlap,
        ) as llm:  # fmt: skip
            fed = fed_steps(llm)
            outs[overlap] = llm.generate(batch, params)
        assert any(fed) == overlap
    assert_same_outputs(outs[True], outs[False])


def test_chunked_prefill_on_every_rank(checkpoints, one_thread):
    """Prompts of 7 and 12 tokens in parts of at most 4 tokens a step under tp=2 x ep=2: every rank runs
    the same parts (prompt log-probs too), and the completions equal one process computing whole prompts."""
    from tests.test_engine import assert_same_outputs, per_step

    batch = prompts()
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0.8, seed=4, max_tokens=6, n=2, logprobs=2),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    ]
    outs = {}
    for tp, chunked in ((1, False), (2, True)):
        with LLM(
            str(checkpoints["qwen3_moe"]), device="cpu", dtype="float64", tp_size=tp, ep_size=tp,
            progress=False, num_kv_blocks=32, block_size=4, enable_chunked_prefill=chunked,
            max_num_batched_tokens=4, max_num_seqs=4,
        ) as llm:  # fmt: skip
            sizes = per_step(llm, lambda step: len(step.ids))
            outs[tp] = llm.generate(batch, params)
        assert (max(sizes) <= 4) == chunked
    assert_same_outputs(outs[2], outs[1])


def test_a_refused_start_adapter_leaves_no_worker_behind(checkpoints, tmp_path: Path, one_thread):
    from moelora.lora.adapter import AdapterError

    def my_workers() -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and b"moelora.engine.worker" in (proc / "cmdline").read_bytes():
                    stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[1]) == os.getpid() and stat[0] != "Z":
                        found.append(int(proc.name))
            except OSError:
                continue
        return found

    with pytest.raises(AdapterError, match="adapter 'bad'"):
        LLM(str(checkpoints["mixtral"]), device="cpu", tp_size=2, progress=False,
            lora_modules={"bad": str(tmp_path / "missing")})  # fmt: skip
    assert my_workers() == []

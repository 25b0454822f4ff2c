"""Adapters in the engine on the demo model: slots, eviction, pins, live load/unload, refusals."""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import pytest

from moelora import LLM, SamplingParams
from moelora.demo import demo_adapter_paths
from moelora.lora.adapter import AdapterError

PROMPTS = ["The weather today is", "Hello", "My computer keeps", "To make a simple soup,", "Travelling light"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three demo adapters, and three more copies under other names (six distinct adapters)."""
    paths = demo_adapter_paths(tmp_path_factory.mktemp("cache"))
    extra = tmp_path_factory.mktemp("copies")
    for name in list(paths):
        copy = extra / f"{name}-copy"
        shutil.copytree(paths[name], copy)
        paths[f"{name}-copy"] = copy
    return paths


@pytest.fixture(scope="module")
def reference(adapters: dict[str, Path]) -> dict[tuple[str | None, str], list[int]]:
    """Each (adapter, prompt) run alone with enough slots for everything."""
    with LLM("demo", device="cpu", progress=False, lora_modules=adapters, max_loras_per_batch=7) as llm:
        names: list[str | None] = [None, *adapters]
        return {(n, p): llm.generate(p, GREEDY, lora=n)[0].token_ids for n in names for p in PROMPTS}


def wait_idle(llm: LLM, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while llm.engine.scheduler.has_work():
        assert time.time() < end
        time.sleep(0.005)


def test_adapters_change_outputs_and_base_stays_base(reference):
    base = [reference[(None, p)] for p in PROMPTS]
    for name in ("expert-r8", "fused-r16", "partial-r4"):
        assert [reference[(name, p)] for p in PROMPTS] != base
        # A copy of an adapter under another name computes the same thing.
        assert [reference[(f"{name}-copy", p)] for p in PROMPTS] == [reference[(name, p)] for p in PROMPTS]


def test_mixed_batch_matches_single_runs(adapters, reference):
    names = [None, "expert-r8", "fused-r16", "partial-r4"]
    pairs = [(n, p) for p in PROMPTS for n in names]
    with LLM("demo", device="cpu", progress=False, lora_modules=adapters, max_loras_per_batch=4) as llm:
        outs = llm.generate([p for _, p in pairs], GREEDY, lora=[n for n, _ in pairs])
        assert [o.token_ids for o in outs] == [reference[pair] for pair in pairs]
        assert [o.lora for o in outs] == [n for n, _ in pairs]


def lru_loads(history: Iterable[tuple[str, ...]], slots: int) -> int:
    """Slot loads an LRU policy makes for this sequence of batches (the spec the manager follows)."""
    resident: OrderedDict[str, None] = OrderedDict()
    loads = 0
    for batch in history:
        for name in batch:
            if name not in resident:
                if len(resident) >= slots:
                    victim = next(n for n in resident if n not in batch)
                    del resident[victim]
                resident[name] = None
                loads += 1
            resident.move_to_end(name)
    return loads


def test_eviction_with_two_slots(adapters, reference):
    order = ["expert-r8", "fused-r16", "partial-r4", "expert-r8-copy", "fused-r16-copy", "partial-r4-copy"]
    pairs = [(order[(i * 5) % 6], PROMPTS[i % len(PROMPTS)]) for i in range(18)]
    with LLM("demo", device="cpu", progress=False, lora_modules=adapters, max_loras_per_batch=2) as llm:
        outs = llm.generate([p for _, p in pairs], GREEDY, lora=[n for n, _ in pairs])
        assert [o.token_ids for o in outs] == [reference[pair] for pair in pairs]
        loras = llm.engine.loras
        assert loras is not None
        assert all(len(set(batch)) <= 2 for batch in loras.history)
        assert loras.stats.loads == lru_loads(loras.history, 2)
        # Six adapters through two slots: at least four evictions. How many reloads beyond the six first
        # loads depends on how the engine's steps interleave with the submissions (LRU is checked above).
        assert loras.stats.loads >= 6 and loras.stats.evictions == loras.stats.loads - 2


def test_cpu_cache_drops_and_rereads(adapters, reference):
    names = ["expert-r8", "fused-r16", "partial-r4"]
    with LLM(
        "demo",
        device="cpu",
        progress=False,
        lora_modules={n: adapters[n] for n in names},
        max_loras_per_batch=2,
        max_cpu_loras=1,
    ) as llm:
        outs = llm.generate([PROMPTS[0]] * 6, GREEDY, lora=names * 2)
        assert [o.token_ids for o in outs] == [reference[(n, PROMPTS[0])] for n in names * 2]
        assert llm.engine.loras is not None and llm.engine.loras.stats.cpu_evictions >= 2


def test_pinned_adapter_keeps_its_slot(adapters):
    with LLM("demo", device="cpu", progress=False, enable_lora=True, max_loras_per_batch=2) as llm:
        llm.load_lora("pinned", adapters["expert-r8"], pinned=True)
        llm.load_lora("a", adapters["fused-r16"])
        llm.load_lora("b", adapters["partial-r4"])
        llm.generate([PROMPTS[0]] * 4, GREEDY, lora=["a", "b", "a", "b"])
        info = {i.name: i for i in llm.list_loras()}
        assert info["pinned"].pinned and info["pinned"].resident
        with pytest.raises(ValueError, match="at most max_loras_per_batch - 1 = 1 may be"):
            llm.load_lora("second-pin", adapters["partial-r4"], pinned=True)


def test_load_and_unload_while_requests_run(adapters, reference):
    with LLM("demo", device="cpu", progress=False, enable_lora=True, max_loras_per_batch=3) as llm:
        llm.load_lora("a", adapters["expert-r8"])
        llm.load_lora("b", adapters["fused-r16"])
        long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        streams = [
            llm.engine.submit_stream(PROMPTS[i], long, lora) for i, lora in enumerate(["a", "b", None])
        ]
        expected_long = {}
        next(iter(streams[1]))  # running
        llm.load_lora("c", adapters["partial-r4"])
        llm.unload_lora("b")  # its running request must still finish on it
        with pytest.raises(ValueError, match="unknown adapter 'b'"):
            llm.generate("Hi", lora="b")
        mid = llm.generate(PROMPTS[3], GREEDY, lora="c")[0].token_ids
        assert mid == reference[("partial-r4", PROMPTS[3])]
        outs = [s.result() for s in streams]
        llm.load_lora("b", adapters["partial-r4"])  # the name is free again; a different adapter now
        assert (
            llm.generate(PROMPTS[0], GREEDY, lora="b")[0].token_ids == reference[("partial-r4", PROMPTS[0])]
        )
        wait_idle(llm)
    with LLM("demo", device="cpu", progress=False, lora_modules=adapters, max_loras_per_batch=3) as alone:
        for i, name in enumerate(["expert-r8", "fused-r16", None]):
            expected_long[i] = alone.generate(PROMPTS[i], long, lora=name)[0].token_ids
    assert [o.token_ids for o in outs] == [expected_long[i] for i in range(3)]


def test_threads_loading_and_generating(adapters, reference):
    with LLM("demo", device="cpu", progress=False, enable_lora=True, max_loras_per_batch=2) as llm:
        errors: list[BaseException] = []

        def loader() -> None:
            try:
                for k in range(4):
                    llm.load_lora(f"tmp{k}", adapters["partial-r4"])
                    llm.unload_lora(f"tmp{k}")
            except BaseException as e:
                errors.append(e)

        llm.load_lora("a", adapters["expert-r8"])
        t = threading.Thread(target=loader)
        t.start()
        outs = llm.generate(PROMPTS, GREEDY, lora="a")
        t.join()
        assert not errors
        assert [o.token_ids for o in outs] == [reference[("expert-r8", p)] for p in PROMPTS]


def test_refused_adapters_leave_nothing_behind(adapters, tmp_path: Path):
    no_demo_adapters: dict[str, Path] = {}
    with LLM(
        "demo", device="cpu", progress=False, enable_lora=True, max_lora_rank=8, lora_modules=no_demo_adapters
    ) as llm:
        llm.load_lora("a", adapters["expert-r8"])
        with pytest.raises(ValueError, match="already loaded"):
            llm.load_lora("a", adapters["partial-r4"])
        with pytest.raises(AdapterError, match="max_lora_rank"):
            llm.load_lora("big", adapters["fused-r16"])
        broken = Path(shutil.copytree(adapters["partial-r4"], tmp_path / "broken"))
        (broken / "adapter_config.json").write_text("{oops")
        with pytest.raises(AdapterError):
            llm.load_lora("broken", broken)
        assert [i.name for i in llm.list_loras()] == ["a"]
        with pytest.raises(KeyError, match="no adapter named 'zzz'"):
            llm.unload_lora("zzz")


def test_adapters_off_is_a_clear_error():
    with LLM("demo", device="cpu", progress=False, lora_modules={}) as llm:
        with pytest.raises(ValueError, match="adapters are off"):
            llm.load_lora("a", "/nowhere")
        with pytest.raises(ValueError, match="adapters are off"):
            llm.generate("Hi", lora="a")


def test_no_adapter_starves(adapters):
    """One slot: a request for b waits behind a's, but later a's cannot keep overtaking it."""
    with LLM(
        "demo", device="cpu", progress=False, lora_modules=adapters, max_loras_per_batch=1, max_num_seqs=2
    ) as llm:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        streams = [llm.engine.submit_stream(PROMPTS[0], params, "expert-r8")]
        streams.append(llm.engine.submit_stream(PROMPTS[1], params, "fused-r16"))
        streams += [llm.engine.submit_stream(PROMPTS[2], params, "expert-r8") for _ in range(12)]
        for stream in streams:
            stream.result()
        loras = llm.engine.loras
        assert loras is not None and all(len(set(batch)) == 1 for batch in loras.history)
        steps_b = [i for i, batch in enumerate(loras.history) if "fused-r16" in batch]
        steps_a = [i for i, batch in enumerate(loras.history) if "expert-r8" in batch]
        # b ran before the a's submitted after it were all done: they did not overtake it for ever.
        assert steps_b and steps_b[0] < steps_a[-1]


def test_adapter_files_changed_or_gone_after_load_fail_only_their_requests(
    adapters, reference, tmp_path: Path
):
    """An adapter evicted from the CPU cache is re-read from disk for its next slot; if its files changed
    (or vanished) meanwhile, its requests fail with the reason and it is unloaded; everything else runs."""
    changed, gone = tmp_path / "changed", tmp_path / "gone"
    shutil.copytree(adapters["expert-r8"], changed)
    shutil.copytree(adapters["fused-r16"], gone)
    modules = {
        "changed": changed,
        "gone": gone,
        "partial-r4": adapters["partial-r4"],
        "other": adapters["expert-r8-copy"],
    }
    with LLM(
        "demo", device="cpu", progress=False, lora_modules=modules, max_loras_per_batch=2, max_cpu_loras=1
    ) as llm:
        assert (
            llm.generate(PROMPTS[0], GREEDY, lora="changed")[0].token_ids
            == reference[("expert-r8", PROMPTS[0])]
        )
        llm.generate(PROMPTS[0], GREEDY, lora="gone")
        llm.generate(PROMPTS[0], GREEDY, lora="partial-r4")  # these two evict both from the slots
        llm.generate(PROMPTS[1], GREEDY, lora="other")  # and the CPU cache
        time.sleep(0.01)
        (changed / "adapter_config.json").write_text((changed / "adapter_config.json").read_text() + "\n")
        shutil.rmtree(gone)
        streams = [
            llm.engine.submit_stream(PROMPTS[2], GREEDY, lora=name) for name in ("changed", None, "gone")
        ]
        with pytest.raises(
            AdapterError, match=r"adapter 'changed': the files in .* changed since it was loaded"
        ):
            streams[0].result()
        with pytest.raises(AdapterError, match=r"adapter 'gone'.* does not exist"):
            streams[2].result()
        assert streams[1].result().token_ids == reference[(None, PROMPTS[2])]
        assert {i.name for i in llm.list_loras()} == {"partial-r4", "other"}
        with pytest.raises(ValueError, match="unknown adapter 'changed'"):
            llm.generate(PROMPTS[0], GREEDY, lora="changed")
        llm.load_lora("changed", changed)  # the new version loads under the freed name
        assert (
            llm.generate(PROMPTS[0], GREEDY, lora="changed")[0].token_ids
            == reference[("expert-r8", PROMPTS[0])]
        )
        wait_idle(llm)
        assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def test_a_step_runs_its_sequences_grouped_by_adapter(adapters, reference):
    """The LoRA kernels make one pass per distinct adapter of a block of tokens, so the scheduler orders
    a step's batch by adapter (base first, then by adapter), arrival order within a group; outputs are
    those of single runs."""
    names = [None, "expert-r8", "fused-r16", "partial-r4"]
    pairs = [(names[i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(12)]
    with LLM("demo", device="cpu", progress=False, lora_modules=adapters, max_loras_per_batch=4) as llm:
        scheduler, steps = llm.engine.scheduler, []
        schedule = scheduler.schedule

        def recorded():
            step = schedule()
            steps.append([(s.request.lora_entry, s.request.arrival) for s in step.seqs])
            return step

        scheduler.schedule = recorded
        outs = llm.generate([p for _, p in pairs], GREEDY, lora=[n for n, _ in pairs])
    assert [o.outputs[0].token_ids for o in outs] == [reference[pair] for pair in pairs]
    assert any(len({entry for entry, _ in step}) == 4 for step in steps)
    for step in steps:
        keys = [(0 if entry is None else entry.uid, arrival) for entry, arrival in step]
        assert keys == sorted(keys)

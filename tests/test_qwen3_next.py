"""Qwen3-Next against transformers (fp32 eager): Gated DeltaNet linear-attention layers (their state in a
slot per sequence), the gated full-attention layer with partial rotary and zero-centered q/k norms, a
dense layer, experts with a gated shared expert. Prompts longer than transformers' 64-token chunk, batched
with short ones; preemption, n > 1, and a mixed adapter batch."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelora import LLM, SamplingParams
from moelora.batch import StateRows
from moelora.engine.scheduler import Scheduler
from tests.hf_models import VOCAB, assert_logprobs, build_hf_model, hf_logprobs, logprob_tol
from tests.test_engine_hf import agree_until_near_tie, hf_greedy

NEW_TOKENS = 8
next_modeling = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 80, 1, 23)]


@pytest.fixture(scope="module")
def hf_model() -> Any:
    return build_hf_model("qwen3_next")


@pytest.fixture(scope="module")
def checkpoint(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3-next")
    hf_model.save_pretrained(folder)
    return folder


def recurrent(model: Any, monkeypatch: pytest.MonkeyPatch, modeling: Any = next_modeling) -> Any:
    """`model` with its prefill's chunked delta rule replaced by transformers' own token-by-token one
    (what its decode runs). Both are transformers' definition; in fp32 they differ by about 1e-3 in
    this model's log-probs (its sharp logits magnify the chunking's rounding), more than the parity
    tolerance, so the exact comparison is with the recurrence (moelora's twin is that recurrence)."""

    def by_token(q, k, v, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, **kwargs):  # fmt: skip
        return modeling.torch_recurrent_gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip

    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", by_token)
    for layer in model.model.layers:
        if hasattr(layer, "linear_attn"):
            monkeypatch.setattr(layer.linear_attn, "chunk_gated_delta_rule", by_token, raising=False)
    return model


def same_dtype(model: Any, prompt: list[int]) -> list[torch.Tensor]:
    """transformers' log-probs with the model in its own dtype (fp32: its fp64 copy would keep the delta
    rule and the norms in fp32 anyway, so fp32 against fp32 is the like-for-like comparison)."""
    with torch.no_grad():
        return [model(torch.tensor([prompt])).logits[0].double().log_softmax(-1)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_base_matches_transformers(
    hf_model: Any, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
):
    """One batch of prompts of 7, 80, 1 and 23 tokens (and `LLM.logits`, the cacheless forward, in
    float64); greedy tokens equal to transformers' cached
    generation (chunked prefill, then its recurrent decode) up to a near tie. Prompt log-probs: in float64
    within 1e-4 of transformers' float64 model with the recurrence (both keep the delta rule and the norms
    in fp32, as transformers does in any dtype); in float32 within 1e-2 of its float32 model, chunked and
    recurrent: this tiny model's sharp logits put transformers' own float32 and float64 runs up to 5e-3
    apart, so two float32 runs that each round differently may sit up to twice that apart (a change of
    summation order alone moved one log-prob past 5e-3, to 5.04e-3); float64 is the tight check."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    with LLM(str(checkpoint), device="cpu", dtype=dtype, progress=False) as llm:
        outs = llm.generate(prompts(), params)
        cacheless = llm.logits(prompts())  # one forward without KV or state caches
    greedy = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts()]
    loose = [same_dtype(hf_model, p)[0] for p in prompts()] if dtype == "float32" else None
    reference = recurrent(copy.deepcopy(hf_model), monkeypatch)
    for i, (prompt, out) in enumerate(zip(prompts(), outs, strict=True)):
        if dtype == "float64":
            (ref,) = hf_logprobs(reference, [prompt])
            assert_logprobs(out, ref, logprob_tol("float64"), "float64, recurrent")
            whole = cacheless[i].double().log_softmax(-1)
            assert (whole - ref).abs().max() < logprob_tol("float64"), "LLM.logits"
        else:
            assert loose is not None
            assert_logprobs(out, loose[i], 1e-2, "float32, chunked")
            assert_logprobs(out, same_dtype(reference, prompt)[0], 1e-2, "float32, recurrent")
        agree_until_near_tie(out.outputs[0].token_ids, *greedy[i])


def test_state_rows_sort_starts_resumes_and_decodes():
    """Per sequence (tokens this step, tokens after it, slot): a first part (or a whole prompt, one token
    included) starts from nothing, a later part of several tokens resumes its slot's states, one token
    after others steps them (a decode, or a one-token part)."""
    rows = StateRows.of([3, 1, 5, 1, 1], [3, 10, 9, 1, 4], [4, 0, 2, 1, 3], torch.device("cpu"))
    assert rows.start.lens == (3, 1) and rows.start.rows.tolist() == [0, 1, 2, 9]
    assert rows.start.slots.tolist() == [4, 1]
    assert rows.resume.lens == (5,) and rows.resume.rows.tolist() == [4, 5, 6, 7, 8]
    assert rows.resume.slots.tolist() == [2]
    assert rows.decode_rows.tolist() == [3, 10] and rows.decode_slots.tolist() == [0, 3]
    assert not rows.decode_only(11)
    assert StateRows.of([1, 1], [5, 2], [0, 1], torch.device("cpu")).decode_only(2)
    with pytest.raises(ValueError, match="state slot"):
        StateRows.of([2], [2], [-1], torch.device("cpu"))


@pytest.mark.parametrize("budget", [8, 5])
def test_chunked_prefill_matches_transformers(
    hf_model: Any, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, budget: int
):
    """Steps of at most `budget` tokens: the prompts of 7, 80 and 23 tokens are computed in parts, each part
    resuming from its slot's convolution and delta-rule states (a part of one token steps them as a decode
    does), beside the other sequences' decoding. Float64 prompt log-probs within 1e-4 of transformers'
    recurrent model, greedy tokens as its cached generation up to a near tie, and the same tokens as whole
    prompts."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    kwargs: dict[str, Any] = dict(device="cpu", dtype="float64", progress=False, max_num_seqs=4)
    with LLM(str(checkpoint), max_num_batched_tokens=budget, **kwargs) as llm:
        assert llm.engine.chunked_prefill
        since = time.perf_counter()
        outs = llm.generate(prompts(), params)
        records = llm.engine.step_records(since)
    with LLM(str(checkpoint), enable_chunked_prefill=False, **kwargs) as llm:
        whole = llm.generate(prompts(), params)
    assert all(r.prefill_tokens + r.decode_tokens <= budget for r in records)
    assert any(r.prefill_tokens and r.decode_tokens for r in records), "a part beside decoding"
    reference = recurrent(copy.deepcopy(hf_model), monkeypatch)
    for prompt, out, one in zip(prompts(), outs, whole, strict=True):
        (ref,) = hf_logprobs(reference, [prompt])
        assert_logprobs(out, ref, logprob_tol("float64"), f"budget {budget}")
        agree_until_near_tie(out.outputs[0].token_ids, *hf_greedy(hf_model, prompt, NEW_TOKENS))
        assert out.outputs[0].token_ids == one.outputs[0].token_ids


@pytest.mark.parametrize("snapshots", [16, 1])
def test_a_later_turn_starts_after_the_cached_prompt(hf_model: Any, checkpoint: Path, snapshots: int):
    """Prefix caching with the linear layers' states: a second turn (the first prompt, its reply, a new
    message) starts after the first prompt's last full block, from the states kept there (a part of the
    first prompt ended at that block); with one snapshot slot an unrelated prompt in between takes it, and
    the second turn is computed whole. Float64 tokens and log-probs as without prefix caching, greedy
    tokens as transformers'."""
    g = torch.Generator().manual_seed(11)
    first, other = (torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (30, 13))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    kwargs: dict[str, Any] = dict(device="cpu", dtype="float64", progress=False, block_size=4)
    kwargs |= dict(max_num_seqs=4, max_num_batched_tokens=8, num_kv_blocks=64)
    turns: dict[bool, list[Any]] = {}
    for cached in (True, False):
        with LLM(str(checkpoint), enable_prefix_caching=cached, state_snapshots=snapshots, **kwargs) as llm:
            reply = llm.generate([first], params)[0]
            llm.generate([other], params)
            second = first + reply.outputs[0].token_ids + [5, 6, 7, 8, 9]
            since = time.perf_counter()
            turns[cached] = [reply, llm.generate([second], params)[0]]
            computed = sum(r.prefill_tokens for r in llm.engine.step_records(since))
        assert computed == len(second) - (28 if cached and snapshots > 1 else 0)
    for got, want in zip(turns[True], turns[False], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-9 for t in a)
    agree_until_near_tie(turns[True][1].outputs[0].token_ids, *hf_greedy(hf_model, second, 6))


def test_prompts_sharing_a_system_prompt_start_after_it(hf_model: Any, checkpoint: Path):
    """Three prompts share their first 20 tokens (a system prompt, 5 blocks of 4), then ask different
    things: the first is computed whole; the second finds those blocks cached without states there,
    computes them again with a part ending at 20 and keeps the states there; the third starts after them.
    Float64 tokens and log-probs as without prefix caching, greedy tokens as transformers'."""
    g = torch.Generator().manual_seed(12)
    system = torch.randint(3, VOCAB, (20,), generator=g).tolist()
    prompts = [system + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 6, 11)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    kwargs: dict[str, Any] = dict(device="cpu", dtype="float64", progress=False, block_size=4)
    kwargs |= dict(max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=64)
    outs: dict[bool, list[Any]] = {True: [], False: []}
    for cached in (True, False):
        with LLM(str(checkpoint), enable_prefix_caching=cached, **kwargs) as llm:
            computed = []
            for prompt in prompts:
                since = time.perf_counter()
                outs[cached].append(llm.generate([prompt], params)[0])
                computed.append(sum(r.prefill_tokens for r in llm.engine.step_records(since)))
        if cached:
            assert computed == [len(prompts[0]), len(prompts[1]), len(prompts[2]) - 20]
    for got, want in zip(outs[True], outs[False], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-9 for t in a)
    agree_until_near_tie(outs[True][2].outputs[0].token_ids, *hf_greedy(hf_model, prompts[2], 5))


@pytest.fixture(scope="module")
def prefix_llms(checkpoint: Path):
    """Float64, blocks of 4, parts of at most 8 tokens, 12 KV blocks (preemptions: 4 in a run of the
    property below), three state snapshots (taken over); with prefix caching and without."""
    kwargs: dict[str, Any] = dict(device="cpu", dtype="float64", progress=False, block_size=4)
    kwargs |= dict(max_num_seqs=3, max_num_batched_tokens=8, num_kv_blocks=12, state_snapshots=3)
    with (
        LLM(str(checkpoint), **kwargs) as cached,
        LLM(str(checkpoint), enable_prefix_caching=False, **kwargs) as plain,
    ):
        yield cached, plain


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prompts=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 18), st.integers(1, 12)), min_size=1, max_size=5
    ),
)
def test_any_prefix_sharing_gives_the_tokens_of_no_caching(prefix_llms, prompts):
    """Prompts made of one of three shared beginnings (3, 9 and 17 tokens) and their own ends, run
    together (preemption, parts, snapshots taken over): with prefix caching the greedy tokens of each as
    without it, every KV block and state slot free after, and every snapshot slot either kept or free."""
    cached, plain = prefix_llms
    g = torch.Generator().manual_seed(13)
    beginnings = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 17)]
    batch = [
        beginnings[b] + [(7 * i + 11 * j) % 90 + 5 for j in range(n)] for i, (b, n, _) in enumerate(prompts)
    ]
    params = [SamplingParams(temperature=0, max_tokens=t, ignore_eos=True) for _, _, t in prompts]
    for i in range(len(batch)):
        want = plain.generate([batch[i]], params[i])[0].outputs[0].token_ids
        assert want == cached.generate([batch[i]], params[i])[0].outputs[0].token_ids  # alone, after others
    together = cached.generate(batch, params)
    alone = plain.generate(batch, params)
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    engine = cached.engine
    assert engine.allocator.num_free == engine.allocator.num_blocks
    scheduler = engine.scheduler
    assert scheduler.states is not None and scheduler.states.num_free == 3
    assert len(scheduler._free_snapshots) + len(scheduler.snapshots) == 3


LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]  # the dense layer's and the shared experts'
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_adapter(
    hf_model: Any, folder: Path, seed: int, modules: list[str] = LINEAR_MODULES + MLP_MODULES
) -> dict[str, torch.Tensor]:
    """A PEFT adapter on every projection: attention (q with its gate rows), the linear-attention
    projections, the dense and shared-expert MLPs (target_modules), the routed experts (target_parameters);
    random A and B. Returns its LoRA tensors."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=modules, target_parameters=EXPERTS)
    model = get_peft_model(copy.deepcopy(hf_model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return {k: v.detach().double() for k, v in model.state_dict().items() if "lora_" in k}


def merged(hf_model: Any, lora: dict[str, torch.Tensor]) -> Any:
    """The reference: transformers' model with every LoRA folded in by hand, W += s * B @ A, and for the
    fused experts W[e] += s * B_e @ A_e with A_e = lora_A[e*r:(e+1)*r], B_e = lora_B[:, e::E]."""
    model = copy.deepcopy(hf_model).double()
    s = 8 / 4
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            path = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            if path.endswith("experts.base_layer") or path.endswith("experts"):
                experts = modules[path.removesuffix(".base_layer")]
                param = experts.gate_up_proj if path.endswith("base_layer") else experts.down_proj
                n = param.shape[0]
                r = a.shape[0] // n
                for e in range(n):
                    param[e] += s * b[:, e::n] @ a[e * r : (e + 1) * r]
            else:
                modules[path].weight += s * b @ a
    return model


def test_mixed_adapter_batch_matches_the_merge(
    hf_model: Any, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Base and adapter requests in one float64 batch: the adapter rows equal the hand-merged model, the
    base rows the base model (within 1e-4, both with the recurrence), and the adapter changes every
    prompt's log-probs (an adapter that leaves the output equal to the base model's fails)."""
    lora = peft_adapter(hf_model, tmp_path / "a", 1)
    assert any("linear_attn.in_proj_qkvz" in k for k in lora) and any("experts.base_layer" in k for k in lora)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=5)
    batch, names = prompts() * 2, [None] * 4 + ["a"] * 4
    with LLM(
        str(checkpoint),
        device="cpu",
        dtype="float64",
        progress=False,
        lora_modules={"a": str(tmp_path / "a")},
    ) as llm:
        outs = llm.generate(batch, params, lora=names)
    references = {
        None: recurrent(copy.deepcopy(hf_model), monkeypatch),
        "a": recurrent(merged(hf_model, lora), monkeypatch),
    }
    for prompt, name, out in zip(batch, names, outs, strict=True):
        (ref,) = hf_logprobs(references[name], [prompt])
        assert_logprobs(out, ref, logprob_tol("float64"), f"float64 {name}")
    for base, tuned in zip(outs[:4], outs[4:], strict=True):
        if len(base.prompt_token_ids) > 1:
            pairs = zip(base.prompt_logprobs[1:], tuned.prompt_logprobs[1:], strict=True)
            moved = [abs(b[t] - a[t]) for a, b in pairs for t in a.keys() & b.keys()]
            assert max(moved) > 1e-2, "the adapter must change the output"


def test_preemption_forks_and_repeats_keep_the_tokens(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """Preempted sequences (their state slots given back, computed again from position 0 later; with
    chunked prefill also between a prompt's parts), n > 1 completions (completion 0 computes the prompt,
    the others start from a copy of its states and blocks) and prompts run again (each starting after its
    first block, cached with the layers' states there) give the tokens each prompt gets alone."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(str(checkpoint), device="cpu", dtype="float32", progress=False) as llm:
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts()]
        since = time.perf_counter()
        again = llm.generate(prompts(), params)
        reused = sum(len(p) for p in prompts()) - sum(
            r.prefill_tokens for r in llm.engine.step_records(since)
        )
        since = time.perf_counter()
        forks = llm.generate(
            [prompts()[3]], SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True)
        )
        computed = sum(r.prefill_tokens for r in llm.engine.step_records(since))
    assert reused == 64 + 16  # the 80-token prompt from its 64th token on, the 23-token one from its 16th
    # the prompt after its cached first block, once: its states copied to the other completions
    assert computed == len(prompts()[3]) - 16
    assert [o.outputs[0].token_ids for o in again] == alone
    assert [c.token_ids for c in forks[0].outputs] == [alone[3]] * 3
    preempted: list[tuple[int, int]] = []  # (prompt tokens computed, prompt length) of each preemption
    preempt = Scheduler._preempt

    def spy(self: Scheduler, seq: Any) -> None:
        preempted.append((seq.num_cached, seq.num_prompt))
        preempt(self, seq)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    # Whole prompts; parts of at most 8 tokens, where 24 blocks preempt the 80-token prompt between parts.
    for budget, blocks in ((None, 30), (8, 24)):
        preempted.clear()
        with LLM(
            str(checkpoint), device="cpu", dtype="float32", progress=False, num_kv_blocks=blocks,
            block_size=4, max_num_seqs=4, max_num_batched_tokens=budget,
        ) as small:  # fmt: skip
            squeezed = small.generate(prompts(), params)
        assert preempted, f"budget {budget}"
        assert budget is None or any(0 < done < prompt for done, prompt in preempted), preempted
        assert [o.outputs[0].token_ids for o in squeezed] == alone, f"budget {budget}"


def assert_layout_matches_one_process(checkpoint: Path, adapter: Path, tp: int, ep: int) -> None:
    """A mixed batch (base and adapter rows) under tp x ep, its prompts computed in parts of at most 8
    tokens a step (each rank resuming its heads' states), gives the tokens of one process taking the same
    parts, and log-probs within float32's tolerance: the delta rule and the norms round in fp32, as
    transformers' do, and a one-token part steps its state as a decode does, in products over this
    rank's heads that round apart from one process's (up to 6e-5 seen; whole prompts match to 1e-6, and
    parts against whole prompts are checked against transformers in
    test_chunked_prefill_matches_transformers)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=3)
    batch, names = prompts() * 2, [None] * 4 + ["a"] * 4
    outs = {}
    for layout in ((1, 1), (tp, ep)):
        with LLM(
            str(checkpoint), device="cpu", dtype="float64", progress=False, tp_size=layout[0],
            ep_size=layout[1], num_kv_blocks=64, lora_modules={"a": str(adapter)}, max_num_seqs=8,
            max_num_batched_tokens=8,
        ) as llm:  # fmt: skip
            outs[layout] = llm.generate(batch, params, lora=names)
            # n = 2 on a prompt of the batch: it starts after its cached first 64 tokens (their states copied
            # on every rank), completion 1 from completion 0's states
            forks = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
            hits = llm.engine.allocator.hits
            outs[layout, "n"] = llm.generate([prompts()[1]], forks, lora="a")[0].outputs
            assert llm.engine.allocator.hits - hits == 4
    assert [c.token_ids for c in outs[(tp, ep), "n"]] == [c.token_ids for c in outs[(1, 1), "n"]]
    assert outs[(1, 1), "n"][0].token_ids == outs[(1, 1)][5].outputs[0].token_ids
    for got, want in zip(outs[(tp, ep)], outs[(1, 1)], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
            assert g.keys() == w.keys() and all(abs(g[t] - w[t]) < logprob_tol("float32") for t in g)


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (2, 2)])
def test_tp_ep_layouts_match_one_process(checkpoint: Path, hf_model: Any, tmp_path: Path, tp, ep, one_thread):
    """The linear layers' heads split over TP (each rank keeps its heads' states), the attention heads
    too, 4 experts over EP, with an adapter on every projection."""
    peft_adapter(hf_model, tmp_path / "a", 2)
    assert_layout_matches_one_process(checkpoint, tmp_path / "a", tp, ep)


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_adapter_batch_on_cuda(hf_model: Any, checkpoint: Path, tmp_path: Path, budget: int | None):
    """On the GPU in fp32 with the Triton kernels forced (the delta-rule and convolution steps of decode
    among them; with a budget of 16 tokens a step the prompts in parts, the prefill kernels resuming from
    the slots' states): base and adapter rows against transformers and the hand merge within float32's
    1e-2 (see test_base_matches_transformers: transformers' own float32 run is up to 5e-3 from its float64
    one here; the H200 gave 6.2e-3 on 2026-12-05), greedy tokens up to a near tie. Then the adapter's
    80-token prompt again, without prompt log-probs: it starts after its cached first 64 tokens from a
    copy of the layers' states kept there (prefix caching), greedy tokens as the hand merge's."""
    lora = peft_adapter(hf_model, tmp_path / "a", 4)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    batch, names = prompts() * 2, [None] * 4 + ["a"] * 4
    modules = {"a": str(tmp_path / "a")}
    with LLM(
        str(checkpoint), device="cuda", dtype="float32", progress=False, kernel_backend="triton",
        lora_modules=modules, max_num_seqs=8, max_num_batched_tokens=budget,
    ) as llm:  # fmt: skip
        outs = llm.generate(batch, params, lora=names)
        hits = llm.engine.allocator.hits
        again = llm.generate(
            [prompts()[1]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), lora="a"
        )
        assert llm.engine.allocator.hits - hits == 4
    references = {None: hf_model, "a": merged(hf_model, lora).float()}
    agree_until_near_tie(again[0].outputs[0].token_ids, *hf_greedy(references["a"], prompts()[1], NEW_TOKENS))
    for prompt, name, out in zip(batch, names, outs, strict=True):
        assert_logprobs(out, same_dtype(references[name], prompt)[0], 1e-2, f"cuda {name}")
        tokens, margins = hf_greedy(references[name], prompt, NEW_TOKENS)
        agree_until_near_tie(out.outputs[0].token_ids, tokens, margins)

"""`moelora serve` on a tiny Qwen3-MoE checkpoint (no tokenizer: prompts are token ids) with a per-expert
adapter: greedy outputs through the server equal transformers (the adapter merged by hand), --max-waiting
answers 503, and SIGTERM lets a running stream finish. One server process for the module; its last test
shuts it down."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from moelora.benchmark.server_proc import ServerProcess
from tests.hf_models import VOCAB, hf_logprobs
from tests.lora_files import ATTENTION, ExpectedLora, merged_hf_model, write_adapter
from tests.test_engine_hf import NEW_TOKENS, TOL, agree_until_near_tie, hf_greedy

FAMILY = "qwen3_moe"
GREEDY: dict[str, Any] = dict(
    temperature=0,
    max_tokens=NEW_TOKENS,
    logprobs=1,
    extra_body={"ignore_eos": True, "return_token_ids": True},
)


@pytest.fixture(scope="module")
def adapter(hf_models, tmp_path_factory) -> tuple[Path, ExpectedLora]:
    folder = tmp_path_factory.mktemp("server-adapter") / "r4"
    hf = hf_models[FAMILY]
    expected = write_adapter(
        folder, FAMILY, hf.config, rank=4, alpha=2.0, form="per_expert", seed=1, dense_targets=ATTENTION
    )
    return folder, expected


@pytest.fixture(scope="module")
def server(checkpoints, adapter) -> Iterator[ServerProcess]:
    args = [str(checkpoints[FAMILY]), "--lora", f"r4={adapter[0]}", "--num-kv-blocks", "64"]
    proc = ServerProcess([*args, "--max-num-seqs", "2", "--max-waiting", "6"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return server.client()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 2, 12)]


def check(reference: Any, prompt: list[int], choice: Any) -> None:
    ref_tokens, margins = hf_greedy(reference, prompt)
    agree_until_near_tie(choice.token_ids, ref_tokens, margins)
    assert choice.logprobs.tokens == [f"<{t}>" for t in choice.token_ids]  # no tokenizer: ids as text
    (ref,) = hf_logprobs(reference, [prompt + choice.token_ids])
    for j, (tok, lp) in enumerate(zip(choice.token_ids, choice.logprobs.token_logprobs, strict=True)):
        assert abs(lp - ref[len(prompt) + j - 1, tok].item()) < TOL, (j, tok)


def test_served_name_is_the_folder_name(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {FAMILY, "r4"} and cards["r4"].parent == FAMILY


def test_greedy_through_the_server_matches_transformers(client, hf_models, adapter):
    """Base and adapter requests sent at once (they share steps); each equals its own reference."""
    base = hf_models[FAMILY]
    references = {FAMILY: base, "r4": merged_hf_model(base, adapter[1])}
    results: dict[str, Any] = {}

    def run(model: str) -> None:
        results[model] = client.completions.create(model=model, prompt=prompts(), **GREEDY)

    threads = [threading.Thread(target=run, args=(m,)) for m in references]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model, reference in references.items():
        assert len(results[model].choices) == len(prompts())
        for prompt, choice in zip(prompts(), results[model].choices, strict=True):
            assert choice.finish_reason == "length"
            check(reference, prompt, choice)
    assert results["r4"].choices[0].token_ids != results[FAMILY].choices[0].token_ids


def test_streamed_greedy_matches_transformers(client, hf_models, adapter):
    reference = merged_hf_model(hf_models[FAMILY], adapter[1])
    prompt = prompts()[0]
    chunks = list(client.completions.create(model=f"{FAMILY}:r4", prompt=prompt, stream=True, **GREEDY))
    ids = [t for c in chunks for t in c.choices[0].token_ids]
    ref_tokens, margins = hf_greedy(reference, prompt)
    agree_until_near_tie(ids, ref_tokens, margins)
    assert len(chunks) == NEW_TOKENS and chunks[-1].choices[0].finish_reason == "length"  # a token a chunk


def test_no_tokenizer_errors(client):
    with pytest.raises(openai.BadRequestError, match="no tokenizer"):
        client.completions.create(model=FAMILY, prompt="text needs a tokenizer")
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=FAMILY, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=FAMILY, prompt=[VOCAB + 5])
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model=FAMILY, prompt=[5] * 300)


def test_runtime_loading_is_off_without_lora_dir(server):
    r = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403 and "--lora-dir" in r.json()["error"]["message"]


def long_stream(client: Any) -> Any:
    """A streaming request that runs for ~200 steps; the first chunk has arrived when this returns."""
    stream = client.completions.create(
        model=FAMILY, prompt=[5, 6], stream=True, **(GREEDY | {"max_tokens": 200})
    )
    first = next(iter(stream))
    return stream, first


def test_more_waiting_than_max_waiting_is_503(client, server):
    running = [long_stream(client) for _ in range(2)]  # both batch slots (--max-num-seqs 2) busy
    body = {"model": FAMILY, "prompt": [[7]] * 6, "stream": True}  # six requests: all --max-waiting allows
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body) as waiting:
        assert waiting.status_code == 200
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=FAMILY, prompt=[8], max_tokens=2)
        assert e.value.status_code == 503 and "--max-waiting 6" in e.value.body["message"]
        assert server.metrics()["moelora_requests_pending"] == 6
        for stream, _ in running:
            assert sum(len(c.choices[0].token_ids) for c in stream) == 199  # still ran to the end
        assert "[DONE]" in waiting.read().decode()


def test_sigterm_lets_running_streams_finish(client, server):
    """Last test of the module: it shuts the server down."""
    stream, first = long_stream(client)
    server.terminate()
    chunks = [first, *stream]
    assert sum(len(c.choices[0].token_ids) for c in chunks) == 200
    assert chunks[-1].choices[0].finish_reason == "length"
    server.proc.wait(timeout=60)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/health")


def test_a_tp2_ep2_server_matches_transformers(checkpoints, hf_models, adapter):
    """The same adapter request through a server whose model is split over 2 TP x 2 EP worker processes."""
    args = [str(checkpoints[FAMILY]), "--lora", f"r4={adapter[0]}", "--num-kv-blocks", "64"]
    proc = ServerProcess([*args, "--tp", "2", "--ep", "2"])
    try:
        reference = merged_hf_model(hf_models[FAMILY], adapter[1])
        out = proc.client().completions.create(model="r4", prompt=prompts(), **GREEDY)
        for prompt, choice in zip(prompts(), out.choices, strict=True):
            check(reference, prompt, choice)
    finally:
        proc.stop()

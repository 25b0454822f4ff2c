"""`moelora serve` on the demo model, driven by the official `openai` client: completions, chat, streaming,
adapters (selection, listing, live load and unload), API key, the errors of the OpenAI error shape, and a
client that disconnects mid-stream. One server process for the whole module."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from moelora.benchmark.server_proc import ServerProcess
from moelora.demo import demo_adapter_paths

KEY = "test-key"
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True, "return_token_ids": True})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the demo adapters (so they resolve inside the folder), a broken one and an escaping link."""
    root = tmp_path_factory.mktemp("lora-dir")
    for name, path in demo_adapter_paths().items():
        shutil.copytree(path, root / name)
    shutil.copytree(root / "expert-r8", root / "dora")
    config = json.loads((root / "dora" / "adapter_config.json").read_text())
    (root / "dora" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    (root / "escape").symlink_to(demo_adapter_paths()["expert-r8"])
    return root


@pytest.fixture(scope="module")
def server(lora_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(["--lora-dir", str(lora_dir), "--max-loras-per-batch", "4"], api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return server.client()


def complete(client: Any, model: str = "demo", prompt: Any = "The weather today is", **kw: Any) -> Any:
    return client.completions.create(model=model, prompt=prompt, **(GREEDY | kw))


def test_completion_greedy_with_usage_and_token_ids(client):
    out = complete(client)
    (choice,) = out.choices
    assert out.object == "text_completion" and out.model == "demo"
    assert choice.finish_reason == "length" and len(choice.token_ids) == 8 and choice.text
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    assert complete(client).choices[0].token_ids == choice.token_ids  # greedy is deterministic


def test_completion_stream_equals_non_stream(client):
    whole = complete(client, max_tokens=12)
    chunks = list(complete(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    ids = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    assert "".join(texts) == whole.choices[0].text and ids == whole.choices[0].token_ids
    assert len(texts) >= 2  # streamed, not sent at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_and_chat_stream_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = client.chat.completions.create(model="demo", messages=messages, **GREEDY)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="demo", messages=messages, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == out.choices[0].message.content
    # The template was applied: the same text as a raw completion gives another continuation.
    raw = complete(client, prompt="Hello there")
    assert raw.choices[0].token_ids != out.choices[0].token_ids


def test_adapter_selection_by_model(client):
    base = complete(client).choices[0].token_ids
    for name in ("expert-r8", "fused-r16", "partial-r4"):
        ids = complete(client, model=name).choices[0].token_ids
        assert ids == complete(client, model=f"demo:{name}").choices[0].token_ids
        assert ids != base, name  # the adapter changed the greedy output


def test_models_lists_base_and_adapters_with_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert {"demo", "expert-r8", "fused-r16", "partial-r4"} <= set(cards)
    assert cards["demo"].parent is None and cards["expert-r8"].parent == "demo"
    assert cards["partial-r4"].root.endswith("partial-r4")


def test_n_seed_stop_logprobs_penalties(client):
    kw = dict(temperature=1.0, max_tokens=10, n=3, seed=5, extra_body={"ignore_eos": True})
    first = complete(client, **kw)
    again = complete(client, **kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in first.choices}) > 1  # each completion draws its own tokens
    text = complete(client, max_tokens=12).choices[0].text
    stop = text[3:6]
    stopped = complete(client, max_tokens=12, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]
    lp = complete(client, logprobs=3).choices[0].logprobs
    # Keys are token texts: byte tokens that decode alike ('\ufffd') share one, so up to 3 each.
    assert len(lp.tokens) == 8 and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset[0] == 0
    assert max(lp.top_logprobs[0].values()) >= lp.token_logprobs[0]
    plain = complete(client, max_tokens=64).choices[0].token_ids
    assert len(set(plain)) < len(plain)  # tokens repeat, so penalties have something to act on
    penalised = complete(client, max_tokens=64, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].token_ids != plain


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(
        model="expert-r8",
        messages=[{"role": "user", "content": "Hi"}],
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_batch_of_prompts_keeps_order(client):
    prompts = ["The weather today is", "Fresh bread"]
    out = complete(client, prompt=prompts, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    single = [complete(client, prompt=p).choices[0].token_ids for p in prompts]
    assert [c.token_ids for c in out.choices] == [single[0], single[0], single[1], single[1]]


def test_live_load_and_unload(client, server, lora_dir):
    reference = complete(client, model="expert-r8").choices[0].token_ids
    loaded = httpx.post(
        f"{server.base_url}/v1/load_lora_adapter",
        json={"lora_name": "live", "lora_path": "expert-r8"},
        headers=server.headers,
    )
    assert loaded.status_code == 200, loaded.text
    assert "live" in {m.id for m in client.models.list().data}
    assert complete(client, model="live").choices[0].token_ids == reference
    # An absolute path inside the folder works too.
    absolute = {"lora_name": "live2", "lora_path": str(lora_dir / "partial-r4"), "pinned": True}
    assert httpx.post(
        f"{server.base_url}/v1/load_lora_adapter", json=absolute, headers=server.headers
    ).is_success
    for name in ("live", "live2"):
        gone = httpx.post(
            f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=server.headers
        )
        assert gone.status_code == 200, gone.text
    assert "live" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError, match="model 'live' does not exist"):
        complete(client, model="live")
    again = httpx.post(
        f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "live"}, headers=server.headers
    )
    assert again.status_code == 404 and "no adapter named 'live'" in again.json()["error"]["message"]


def error(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers, timeout=30)
    return r.status_code, r.json()["error"]


def test_adapter_paths_outside_lora_dir_are_forbidden(server, lora_dir):
    for path, why in (
        ("../etc", "must not contain '..'"),
        ("expert-r8/../../x", "must not contain '..'"),
        ("/tmp", "outside --lora-dir"),
        ("escape", "outside --lora-dir"),  # a symlink out of the folder
    ):
        status, err = error(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert (status, err["type"]) == (403, "permission_error"), (path, err)
        assert why in err["message"], (path, err)


def test_refused_adapters_are_400_with_the_reason(server):
    status, err = error(server, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "dora"})
    assert status == 400 and "DoRA" in err["message"] and "'d'" in err["message"]
    status, err = error(server, "/v1/load_lora_adapter", {"lora_name": "expert-r8", "lora_path": "expert-r8"})
    assert status == 400 and "already loaded" in err["message"]
    status, err = error(server, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": "missing"})
    assert status == 400 and "missing" in err["message"]


def test_api_key_is_required_except_for_health(server):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{server.base_url}{path}", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_errors_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, model="nope")
    assert e.value.body["code"] == "model_not_found" and "expert-r8" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        complete(client, model="demo:nope")
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, temperature=-1)
    assert e.value.body["param"] == "temperature" and "temperature must be >= 0" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], top_p=0)
    with pytest.raises(openai.BadRequestError, match="max_model_len is 2048"):
        complete(client, prompt=[5] * 2048)
    status, err = error(server, "/v1/chat/completions", {"model": "demo"})
    assert status == 400 and err["param"] == "messages" and "required" in err["message"].lower()
    status, err = error(server, "/v1/completions", {"model": "demo", "prompt": "x", "n": "many"})
    assert status == 400 and err["param"] == "n"
    status, err = error(server, "/v1/completions", {"model": "demo", "prompt": "x", "echo": True})
    assert status == 400 and "echo" in err["message"]
    r = httpx.get(f"{server.base_url}/v1/nothing", headers=server.headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def wait_for(server: ServerProcess, done: Any, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_disconnect_mid_stream_aborts_and_frees_blocks_and_adapter(client, server):
    body = {"lora_name": "drop", "lora_path": "fused-r16"}
    assert httpx.post(f"{server.base_url}/v1/load_lora_adapter", json=body, headers=server.headers).is_success
    before = server.metrics()
    stream = complete(client, model="drop", max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    during = server.metrics()
    assert during["moelora_kv_blocks_used"] > 0 and during["moelora_requests_running"] == 1
    stream.close()  # the client goes away mid-stream
    after = wait_for(
        server, lambda m: m["moelora_kv_blocks_used"] == 0 and m["moelora_requests_running"] == 0
    )
    assert after["moelora_kv_blocks_used"] == 0 and after["moelora_requests_running"] == 0
    assert after["moelora_generation_tokens_total"] - before["moelora_generation_tokens_total"] < 1500
    assert after["moelora_requests_pending"] == 0
    # The adapter reference was released too: once unloaded, its slot is freed at once.
    slots = after["moelora_lora_slots_used"]
    assert httpx.post(
        f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "drop"}, headers=server.headers
    ).is_success
    freed = wait_for(server, lambda m: m["moelora_lora_slots_used"] == slots - 1)
    assert freed["moelora_lora_slots_used"] == slots - 1


def test_metrics_count_requests_tokens_and_latencies(client, server):
    before = server.metrics()
    complete(client, model="partial-r4", max_tokens=5)
    after = server.metrics()
    assert after["moelora_generation_tokens_total"] - before["moelora_generation_tokens_total"] == 5
    key = 'moelora_lora_requests_total{adapter="partial-r4"}'
    assert after[key] - before[key] == 1
    assert after['moelora_requests_total{model="partial-r4"}'] >= 1
    assert (
        after["moelora_time_to_first_token_seconds_count"]
        - before["moelora_time_to_first_token_seconds_count"]
        == 1
    )
    assert (
        after["moelora_inter_token_latency_seconds_count"]
        - before["moelora_inter_token_latency_seconds_count"]
        == 4
    )
    assert after["moelora_lora_loads_total"] >= 3 and after["moelora_kv_blocks_total"] > 0
    assert after["moelora_lora_slots_total"] == 4
    for name in ("moelora_requests_waiting", "moelora_lora_evictions_total"):
        assert name in after
    # The same long prompt again on the same adapter reuses its cached KV blocks.
    prompt = "The kettle clicked off just as the rain began to fall on the roof of the house"
    complete(client, model="partial-r4", max_tokens=2, prompt=prompt)
    hits = server.metrics()["moelora_prefix_cache_hits_total"]
    complete(client, model="partial-r4", max_tokens=2, prompt=prompt)
    assert server.metrics()["moelora_prefix_cache_hits_total"] > hits


def test_disconnect_while_waiting_for_a_whole_completion_aborts_it(client, server):
    before = server.metrics()
    with pytest.raises(openai.APITimeoutError):
        complete(client.with_options(timeout=0.5), max_tokens=2000)
    idle = wait_for(server, lambda m: m["moelora_requests_running"] == 0 and m["moelora_kv_blocks_used"] == 0)
    assert idle["moelora_requests_running"] == 0 and idle["moelora_kv_blocks_used"] == 0
    assert idle["moelora_generation_tokens_total"] - before["moelora_generation_tokens_total"] < 1500


def test_adapter_files_changed_after_loading_give_400_and_the_rest_runs(tmp_path: Path):
    """With one CPU copy kept (the last loaded, "other"), "changed" is re-read for its slot; its changed
    files fail its request with the reason (400) and unload it; the base model and "other" keep serving."""
    changed = tmp_path / "changed"
    shutil.copytree(demo_adapter_paths()["expert-r8"], changed)
    args = ["demo", "--lora", f"changed={changed}", "--lora", f"other={demo_adapter_paths()['fused-r16']}"]
    proc = ServerProcess([*args, "--max-cpu-loras", "1", "--max-loras-per-batch", "2"])
    try:
        client = proc.client()
        time.sleep(0.01)
        config = changed / "adapter_config.json"
        config.write_text(config.read_text() + "\n")
        with pytest.raises(openai.BadRequestError, match="changed since it was loaded"):
            client.completions.create(model="changed", prompt="Hello", max_tokens=4)
        assert {m.id for m in client.models.list().data} == {"demo", "other"}
        for model in ("demo", "other"):
            out = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
            assert out.choices[0].finish_reason == "length"
    finally:
        proc.stop()

"""What a vLLM or OpenAI user expects: every request field honoured or refused, vLLM's flag names, the
model's generation config as the default, reproducible sampling, and a quiet, informative server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from moelora import LLM, SamplingParams
from moelora.benchmark.server_proc import ServerProcess
from moelora.cli import build_parser, main
from moelora.config import ServerArgs
from moelora.demo import demo_adapter_paths
from moelora.flags import parse_lora_modules
from moelora.server.app import build_app
from moelora.server.formatting import chat_logprobs
from moelora.server.serving import describe


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    llm = LLM("demo", device="cpu", progress=False, num_kv_blocks=64)
    with TestClient(build_app(llm, ServerArgs(), "demo")) as client:  # the app shuts the LLM down
        yield client


COMPLETION = {"model": "demo", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}

# (endpoint body, extra fields, accepted?) for every field of OpenAI's request bodies moelora has an
# answer for, and unknown ones: each is honoured, accepted as a no-op, or refused with 400.
CASES = [
    (COMPLETION, {"n": 2, "seed": 1, "temperature": 0.5, "top_p": 0.9, "stop": ["x"]}, True),
    (COMPLETION, {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": 2}, True),
    (COMPLETION, {"stream": True, "stream_options": {"include_usage": True}}, True),
    (COMPLETION, {"best_of": 1}, True),
    (COMPLETION, {"best_of": 3}, False),
    (COMPLETION, {"echo": True}, False),
    (COMPLETION, {"echo": False}, True),
    (COMPLETION, {"suffix": "tail"}, False),
    (COMPLETION, {"logit_bias": {"5": 1.0}}, False),
    (COMPLETION, {"user": "u1", "metadata": {"k": "v"}, "service_tier": "auto"}, True),
    (COMPLETION, {"prompt_cache_key": "k", "safety_identifier": "s", "store": False}, True),
    (COMPLETION, {"store": True}, False),
    (COMPLETION, {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1}, True),
    (COMPLETION, {"stop_token_ids": [3], "ignore_eos": True, "skip_special_tokens": False}, True),
    (COMPLETION, {"return_token_ids": True}, True),
    (COMPLETION, {"no_such_field": 1}, False),
    (COMPLETION, {"stream": "yes"}, False),
    (COMPLETION, {"prompt": [True, False]}, False),
    (CHAT, {"max_completion_tokens": 3, "logprobs": True, "top_logprobs": 2}, True),
    (CHAT, {"top_logprobs": 2}, False),
    (CHAT, {"response_format": {"type": "text"}}, True),
    (CHAT, {"response_format": {"type": "json_object"}}, False),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, False),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, False),
    (CHAT, {"tool_choice": "none", "parallel_tool_calls": True}, True),
    (CHAT, {"tool_choice": "auto"}, False),
    (CHAT, {"functions": [{"name": "f"}]}, False),
    (CHAT, {"function_call": "auto"}, False),
    (CHAT, {"modalities": ["text"]}, True),
    (CHAT, {"modalities": ["text", "audio"]}, False),
    (CHAT, {"audio": {"voice": "alloy"}}, False),
    (CHAT, {"prediction": {"type": "content", "content": "x"}}, False),
    (CHAT, {"reasoning_effort": "low"}, False),
    (CHAT, {"verbosity": "low"}, False),
    (CHAT, {"web_search_options": {}}, False),
    (CHAT, {"logit_bias": {"5": 1.0}}, False),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "name": "ann"}]}, True),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "surprise": 1}]}, False),
]


@pytest.mark.parametrize(("base", "fields", "accepted"), CASES, ids=[str(sorted(c[1])) for c in CASES])
def test_every_request_field_is_honoured_or_refused(http, base, fields, accepted):
    path = "/v1/completions" if "prompt" in base else "/v1/chat/completions"
    response = http.post(path, json=base | fields)
    if accepted:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    named = [f for f in fields if f in error["message"] or error["param"] == f]
    assert named or "messages" in fields, (fields, error)


def test_json_errors_and_version(http):
    broken = http.post(
        "/v1/completions",
        content=b'{"model": "demo", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400 and broken.json()["error"]["param"] is None
    assert "not valid JSON" in broken.json()["error"]["message"]
    assert http.get("/version").json()["version"]


def test_generation_config_gives_the_defaults(http, capsys):
    """The demo's generation_config.json says greedy: unset fields follow it, a request's own win."""
    llm = LLM("demo", device="cpu", progress=False, num_kv_blocks=32, lora_modules={})
    with llm:
        assert llm.default_sampling_params().temperature == 0
        (a,), (b,) = llm.generate("Hi"), llm.generate("Hi")
        assert a.token_ids == b.token_ids
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=32, generation_config="vllm") as llm:
        assert llm.default_sampling_params().temperature == 1.0
    texts = set()
    for _ in range(2):  # the CLI without --temperature: greedy, twice the same
        assert main(["generate", "--no-progress", "--no-demo-adapters", "--max-tokens", "6"]) == 0
        texts.add(capsys.readouterr().out)
    assert len(texts) == 1
    served = http.post("/v1/completions", json=COMPLETION | {"max_tokens": 5, "n": 2}).json()
    assert served["choices"][0]["text"] == served["choices"][1]["text"]  # greedy by default


def run_script(seed: int, stagger: float, max_num_seqs: int) -> list[str]:
    """The same script: unseeded sampled requests, submitted one by one (optionally slowly)."""
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    with LLM(
        "demo", device="cpu", progress=False, seed=seed, num_kv_blocks=64, max_num_seqs=max_num_seqs
    ) as llm:
        streams = []
        for i, prompt in enumerate(["Hello", "The weather", "Hello", "A kettle"]):
            streams.append(llm.engine.submit_stream(prompt, params, lora=[None, "expert-r8"][i % 2]))
            time.sleep(stagger)  # lets the engine run steps with only some requests in the batch
        return [s.result().text for s in streams]


def test_unseeded_sampling_is_reproducible_at_any_timing():
    first = run_script(3, 0.0, 8)
    assert run_script(3, 0.05, 8) == first  # other batches: requests joined the running batch late
    assert run_script(3, 0.0, 1) == first  # one sequence at a time
    assert run_script(4, 0.0, 8) != first  # the engine seed matters
    assert len(set(first)) > 1


def test_vllm_flag_names_parse_to_moelora_s():
    parse = build_parser().parse_args
    args = parse(["serve", "--tensor-parallel-size", "2", "--enable-expert-parallel", "--max-loras", "3",
                  "--gpu-memory-utilization", "0.5", "--enforce-eager", "--trust-remote-code",
                  "--generation-config", "vllm", "--max-cpu-loras", "5"])  # fmt: skip
    assert (args.tp_size, args.enable_expert_parallel, args.max_loras_per_batch) == (2, True, 3)
    assert (args.gpu_memory_utilization, args.cuda_graphs, args.trust_remote_code) == (0.5, False, True)
    assert (args.generation_config, args.max_cpu_loras) == ("vllm", 5)
    assert parse(["serve", "-tp", "4"]).tp_size == 4
    args = parse(["serve", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"])
    assert (args.enable_chunked_prefill, args.max_num_batched_tokens) == (False, 4096)
    assert parse(["serve", "--long-prefill-token-threshold", "512"]).long_prefill_token_threshold == 512
    args = parse(["serve", "--lora-modules", "a=/x", "b=/y", "--lora", "c=/z"])
    assert args.lora_modules == ["a=/x", "b=/y"] and args.lora == ["c=/z"]
    modules = parse_lora_modules(['{"name": "j", "path": "/p", "base_model_name": "m"}', "k=/q"])
    assert modules == {"j": "/p", "k": "/q"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_lora_modules(["nothing"])
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "--temperature" in help_text and "(default: the model's generation config, else 1.0)" in help_text


@pytest.mark.parametrize(
    ("flag", "hint"),
    [("--swap-space", "recomputed"), ("--pipeline-parallel-size", "--tp"), ("--kv-cache-dtype", "--dtype")],
)
def test_vllm_only_flags_are_refused_with_the_way_out(flag, hint, capsys):
    assert main(["serve", flag, "2"]) == 2
    err = capsys.readouterr().err
    assert "vLLM flag with no meaning here" in err and hint in err


def test_a_vllm_command_line_serves():
    paths = demo_adapter_paths()
    args = ["--lora-modules", f"a={paths['expert-r8']}", f"b={paths['fused-r16']}", "--tensor-parallel-size",
            "2", "--enable-expert-parallel", "--max-loras", "2", "--num-kv-blocks", "32"]  # fmt: skip
    server = ServerProcess(args)
    try:
        cards = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"]
        assert {c["id"] for c in cards} == {"demo", "a", "b"}
        for model in ("demo", "a", "b"):
            body = {"model": model, "prompt": "Hello", "max_tokens": 3}
            reply = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
    finally:
        log = server.stop()
    assert "tp 2 ep 2" in log and "adapters: a, b" in log and "max_model_len" in log


def test_a_port_in_use_is_reported_before_loading(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.monotonic()
        assert main(["serve", "--port", str(port)]) == 2
        assert time.monotonic() - start < 5
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_startup_line_names_what_is_served():
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=32) as llm:
        line = describe(llm, "demo", ServerArgs(port=1234))
    for part in ("as 'demo'", "tp 1 ep 1", "adapters: expert-r8, fused-r16, partial-r4", "max_model_len",
                 "KV cache 32 blocks of 16 tokens (512 tokens", "http://127.0.0.1:1234"):  # fmt: skip
        assert part in line, (part, line)


def test_readme_adapter_example_loads_a_larger_rank_later():
    paths = demo_adapter_paths()
    with LLM("demo", device="cpu", progress=False, lora_modules={"math": paths["expert-r8"]}) as llm:
        llm.load_lora("chat", paths["fused-r16"], pinned=True)  # rank 16 after a rank-8 start
        outs = llm.generate(["1+1=", "Hi", "Hi"], lora=["math", None, "chat"])
        assert len(outs) == 3 and {i.name for i in llm.list_loras()} == {"math", "chat"}


def test_chat_logprob_bytes_are_the_token_s_own(http):
    llm: Any = http.app.state.ctx.llm
    partial = llm.tokenizer.encode("é", add_special_tokens=False)
    assert len(partial) == 2 and llm.decode([partial[0]]) == "\ufffd"
    content = chat_logprobs(llm, 0, partial, [{t: -1.0} for t in partial])["content"]
    assert [bytes(c["bytes"]) for c in content] == [b"\xc3", b"\xa9"]
    assert b"".join(bytes(c["bytes"]) for c in content).decode() == "é"


def test_demo_brings_its_adapters_in_python_too():
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=16) as llm:
        assert [i.name for i in llm.list_loras()] == ["expert-r8", "fused-r16", "partial-r4"]

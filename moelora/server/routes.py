"""The OpenAI-compatible routes: completions, chat completions, models, live adapter loading."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moelora.lora.manager import check_adapter_name
from moelora.sampling_params import SamplingParams
from moelora.server.chat import chat_prompt_ids
from moelora.server.context import ServerContext
from moelora.server.formatting import chat_choices, completion_choices, usage
from moelora.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from moelora.server.runs import CLIENT_GONE, Run, collect
from moelora.server.streaming import chat_choice_fn, chat_prelude, completion_choice_fn, events

router = APIRouter()


def _ctx(http: Request) -> ServerContext:
    ctx: ServerContext = http.app.state.ctx
    return ctx


def _params(
    ctx: ServerContext,
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    lp: int | None,
) -> Any:
    """The request's sampling parameters over the model's defaults (its generation config)."""
    defaults = ctx.llm.sampling_defaults
    if max_tokens is None and "max_tokens" not in defaults:
        max_tokens = body.DEFAULT_MAX_TOKENS
    try:
        return body.sampling_params(defaults, max_tokens, lp)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=field if field in type(body).model_fields else None) from e


def _envelope(prefix: str, kind: str, model: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def _sse(body: Any) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request) -> Response:
    ctx = _ctx(http)
    body.refuse_unsupported()
    adapter = ctx.resolve_model(body.model)
    params: SamplingParams = _params(ctx, body, body.max_tokens, body.logprobs)
    prompts = body.prompts()
    ctx.check_texts([p for p in prompts if isinstance(p, str)], "prompt")
    # Tokenising runs in a worker thread: a long prompt must not stall the event loop (/health, others).
    runs = await run_in_threadpool(ctx.start, prompts, params, adapter)
    envelope = _envelope("cmpl", "text_completion", body.model)
    if body.stream:
        choice = completion_choice_fn(ctx.llm.decode, body.logprobs, body.return_token_ids)
        return _sse(events(runs, ctx.llm.engine, envelope, choice, body.include_usage))
    outputs = await collect(runs, ctx.llm.engine, http)
    if outputs is None:
        return Response(status_code=CLIENT_GONE)
    choices = completion_choices(outputs, ctx.llm.decode, body.logprobs, body.return_token_ids)
    return JSONResponse(envelope | {"choices": choices, "usage": usage(outputs)})


def _chat_prompt(ctx: ServerContext, body: ChatCompletionRequest) -> list[int]:
    tokenizer = ctx.llm.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400, f"model '{ctx.served_name}' has no chat template: use /v1/completions", param="messages"
        )
    messages = [m.template_dict() for m in body.messages]
    ctx.check_texts([m["content"] for m in messages], "messages")
    return chat_prompt_ids(tokenizer, messages)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
    ctx = _ctx(http)
    body.refuse_unsupported()
    adapter = ctx.resolve_model(body.model)
    params: SamplingParams = _params(ctx, body, body.token_limit, body.logprob_count)
    prompt = await run_in_threadpool(_chat_prompt, ctx, body)
    runs: Sequence[Run] = await run_in_threadpool(ctx.start, [prompt], params, adapter)
    envelope = _envelope("chatcmpl", "chat.completion", body.model)
    lp = body.logprob_count
    if body.stream:
        choice = chat_choice_fn(ctx.llm, lp, body.return_token_ids)
        chunk = envelope | {"object": "chat.completion.chunk"}
        stream = events(runs, ctx.llm.engine, chunk, choice, body.include_usage, chat_prelude(body.n))
        return _sse(stream)
    outputs = await collect(runs, ctx.llm.engine, http)
    if outputs is None:
        return Response(status_code=CLIENT_GONE)
    choices = chat_choices(outputs, ctx.llm, lp, body.return_token_ids)
    return JSONResponse(envelope | {"choices": choices, "usage": usage(outputs)})


def _card(ctx: ServerContext, name: str, root: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "moelora",
        "root": root,
        "parent": parent,
        "max_model_len": ctx.llm.engine.max_model_len,
    }


@router.get("/v1/models")
async def models(http: Request) -> dict[str, Any]:
    ctx = _ctx(http)
    cards = [_card(ctx, ctx.served_name, str(ctx.llm.model_path), None)]
    cards += [_card(ctx, i.name, i.path, ctx.served_name) for i in ctx.llm.list_loras()]
    return {"object": "list", "data": cards}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, http: Request) -> dict[str, Any]:
    ctx = _ctx(http)
    if body.lora_name == ctx.served_name:
        raise ApiError(400, f"lora_name '{body.lora_name}' is the base model's name", param="lora_name")
    try:
        check_adapter_name(body.lora_name)
    except ValueError as e:
        raise ApiError(400, str(e), param="lora_name") from e
    path = ctx.checked_lora_path(body.lora_path)
    try:
        await run_in_threadpool(ctx.llm.load_lora, body.lora_name, path, body.pinned)
    except (ValueError, OSError) as e:  # AdapterError is a ValueError; its message names the fix
        param = "lora_name" if "already loaded" in str(e) else "lora_path"
        raise ApiError(400, str(e), param=param) from e
    return _card(ctx, body.lora_name, str(path), ctx.served_name)


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, http: Request) -> dict[str, Any]:
    ctx = _ctx(http)
    if ctx.lora_dir is None:
        raise ApiError(403, "unloading adapters at runtime is off: restart the server with --lora-dir DIR")
    try:
        ctx.llm.unload_lora(body.lora_name)
    except KeyError as e:
        raise ApiError(404, e.args[0], param="lora_name", code="model_not_found") from e
    ctx.metrics.forget_model(body.lora_name)
    return {"id": body.lora_name, "object": "model", "deleted": True}

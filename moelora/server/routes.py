"""The OpenAI-compatible routes: completions, chat completions, models, live adapter loading."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moelora.sampling_params import SamplingParams
from moelora.server.context import ServerContext
from moelora.server.formatting import chat_choices, completion_choices, usage
from moelora.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from moelora.server.runs import Run, collect
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
    runs = ctx.start(body.prompts(), params, adapter)
    envelope = _envelope("cmpl", "text_completion", body.model)
    if body.stream:
        choice = completion_choice_fn(ctx.llm.decode, body.logprobs, body.return_token_ids)
        return _sse(events(runs, ctx.llm.engine, envelope, choice, body.include_usage))
    outputs = await collect(runs, ctx.llm.engine, http)
    choices = completion_choices(outputs, ctx.llm.decode, body.logprobs, body.return_token_ids)
    return JSONResponse(envelope | {"choices": choices, "usage": usage(outputs)})


def _chat_prompt(ctx: ServerContext, body: ChatCompletionRequest) -> str:
    tokenizer = ctx.llm.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400, f"model '{ctx.served_name}' has no chat template: use /v1/completions", param="messages"
        )
    messages = [m.template_dict() for m in body.messages]
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as e:  # templates raise their own errors (e.g. on role order); report them as given
        raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from e


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
    ctx = _ctx(http)
    body.refuse_unsupported()
    adapter = ctx.resolve_model(body.model)
    params: SamplingParams = _params(ctx, body, body.token_limit, body.logprob_count)
    runs: Sequence[Run] = ctx.start([_chat_prompt(ctx, body)], params, adapter)
    envelope = _envelope("chatcmpl", "chat.completion", body.model)
    lp = body.logprob_count
    if body.stream:
        choice = chat_choice_fn(ctx.llm, lp, body.return_token_ids)
        chunk = envelope | {"object": "chat.completion.chunk"}
        stream = events(runs, ctx.llm.engine, chunk, choice, body.include_usage, chat_prelude(body.n))
        return _sse(stream)
    outputs = await collect(runs, ctx.llm.engine, http)
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
    path = ctx.checked_lora_path(body.lora_path)
    if body.lora_name == ctx.served_name:
        raise ApiError(400, f"lora_name '{body.lora_name}' is the base model's name", param="lora_name")
    try:
        await run_in_threadpool(ctx.llm.load_lora, body.lora_name, path, body.pinned)
    except (ValueError, OSError) as e:  # AdapterError is a ValueError; its message names the fix
        raise ApiError(400, str(e), param="lora_path") from e
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
    return {"id": body.lora_name, "object": "model", "deleted": True}

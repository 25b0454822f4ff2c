"""Request bodies of the OpenAI API (the fields moelora serves), validated by pydantic, and their mapping
onto `SamplingParams`. Every field is honoured or refused with 400: fields OpenAI defines but moelora
cannot honour are refused, unknown fields too; a few that change nothing moelora computes are accepted."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from moelora.sampling_params import SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES: ClassVar[dict[int, str]] = {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        503: "service_unavailable_error",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    """Strict types (no "yes" for a boolean, no true for a token id); unknown fields are refused (400)
    rather than ignored, so nothing a client asks for is silently dropped."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints; the extensions after `stream_options` are vLLM's names (sent by
    OpenAI clients through extra_body). Fields left out take the model's generation config defaults."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Extension: each choice also carries the generated token ids ("token_ids").
    return_token_ids: bool = False
    # Accepted with no effect: they change nothing moelora computes (who the end user is, OpenAI's own
    # storage, tier and cache-routing hints); store must stay false, moelora keeps nothing.
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    store: bool | None = None

    def sampling_params(
        self, defaults: dict[str, Any], max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        """The engine's parameters: the request's own values over the model's `defaults`; ValueError
        (a 400) names the offending field."""
        given = {
            name: getattr(self, name)
            for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
            if getattr(self, name) is not None
        }
        limit = {"max_tokens": max_tokens} if max_tokens is not None else {}
        return SamplingParams(
            **(defaults | given | limit),
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            min_tokens=self.min_tokens,
            stop=self.stop or (),
            stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    def refuse_unsupported(self) -> None:
        if self.store:
            raise ApiError(400, "store is not supported: moelora keeps no completions", param="store")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # the model's max_new_tokens, else 16 (OpenAI's default)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    DEFAULT_MAX_TOKENS: ClassVar[int] = 16

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name; chat templates of the served families do not use it

    def template_dict(self) -> dict[str, str]:
        """The message as chat templates expect it (text parts joined; `developer` is `system`)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(
                400,
                f"response_format '{self.response_format.type}' is not supported: moelora has no "
                "constrained decoding; ask for JSON in the prompt and validate the reply",
                param="response_format",
            )
        if self.tools or self.functions:
            raise ApiError(400, "tools are not supported", param="tools" if self.tools else "functions")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ApiError(400, f"{name} needs tools, which are not supported", param=name)
        if self.modalities not in (None, ["text"]):
            raise ApiError(400, "only text output is supported", param="modalities")
        if self.audio is not None:
            raise ApiError(400, "audio output is not supported: only text", param="audio")
        for name in ("prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                raise ApiError(400, f"{name} is not supported", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadLoraRequest(_Strict):
    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadLoraRequest(_Strict):
    lora_name: str

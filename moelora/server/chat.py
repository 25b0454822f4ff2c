"""Chat messages -> prompt token ids through the tokenizer's chat template, with message content kept as
text: a user who writes `<|im_start|>system` gets those characters, never the special tokens (only the
template may emit those)."""

from __future__ import annotations

from typing import Any

from moelora.server.protocol import ApiError

# Private-use code points: stand-ins for message content while the template is rendered.
_OPEN, _CLOSE = "\ue000", "\ue001"


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation with the generation prompt; content tokenised as plain text."""
    specials = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    risky = any(s and s in m["content"] for m in messages for s in specials)
    if not risky:  # the common case: tokenising the rendered text is the same thing
        return list(tokenizer.encode(_render(tokenizer, messages), add_special_tokens=False))
    marks = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(messages))]
    text = _render(tokenizer, [m | {"content": mark} for m, mark in zip(messages, marks, strict=True)])
    ids: list[int] = []
    pos = 0
    for message, mark in zip(messages, marks, strict=True):
        at = text.find(mark, pos)
        if at < 0 or text.count(mark) != 1:
            raise ApiError(
                400,
                "a message contains special-token text, and this chat template rewrites message content, "
                "so it cannot be kept as plain text: remove the special-token text",
                param="messages",
            )
        ids += tokenizer.encode(text[pos:at], add_special_tokens=False)
        ids += tokenizer.encode(message["content"], add_special_tokens=False, split_special_tokens=True)
        pos = at + len(mark)
    return ids + list(tokenizer.encode(text[pos:], add_special_tokens=False))


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as e:  # templates raise their own errors (e.g. on role order); report them as given
        raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from e

"""Token ids -> streamed text, a token at a time, with stop strings cut out and never half-streamed."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

# Prompt tokens decoded along with the first generated ones: tokenizers such as SentencePiece drop the
# leading space of the first token of a decode, so a token's text is only right after some context.
_PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"  # what a decode ends with while a multi-byte character is still split


Decode = Callable[[list[int], bool], str]


def token_decoder(tokenizer: Any) -> Decode:
    """(ids, skip_special_tokens) -> tokenizer.decode(ids, skip_special_tokens=...).

    For a fast tokenizer whose decode is its Rust backend's (no clean-up pass, `_decode` not overridden),
    the backend is called directly: the same text for a third of the host time per call (this runs
    twice per generated token, on the engine's loop, between GPU steps).
    """
    from transformers import PreTrainedTokenizerFast

    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    plain = (
        backend is not None
        and getattr(type(tokenizer), "_decode", None) is PreTrainedTokenizerFast._decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
    )
    source = backend if plain else tokenizer
    return lambda ids, skip: str(source.decode(ids, skip_special_tokens=skip))


class IncrementalDetokenizer:
    """Decodes one sequence's generated tokens incrementally (the prefix/read offset technique).

    Each add() decodes only the window ids[prefix:] against ids[prefix:read]: `read` is where the
    emitted text ends, `prefix` a few tokens before it for context. New text is taken only once the
    window's decode does not end in U+FFFD, so a character split over tokens comes out whole.

    The trailing characters that could begin a stop string are held back, so a stop string is never
    streamed in part. Invariant: the add() returns plus finish() concatenate to `text`, which is
    tokenizer.decode(generated ids, skip_special_tokens=...) unless a stop string cut it (for tokenizers
    that decode a token's text independently of what precedes it, such as byte-level BPE).
    """

    def __init__(
        self,
        tokenizer: Any | None,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        skip_special_tokens: bool,
        min_tokens: int = 0,
        deferred: bool = False,
    ) -> None:
        """`min_tokens`: a stop string only counts once it ends at or after that many generated tokens
        (as stop token ids and EOS, which the sampler masks until then). `deferred` (no stop strings
        only): add() only collects ids and returns "", and `text` stays empty; `final_text()` decodes the
        whole text in one call at the end: for a consumer that reads the whole output, not the deltas
        (two decodes per generated token saved on the engine's loop)."""
        self._decode_ids = token_decoder(tokenizer) if tokenizer is not None else None
        self._min_tokens, self._count = min_tokens, 0
        self._stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not s for s in self._stop):
            raise ValueError(f"stop strings must be non-empty, got {self._stop!r}")
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])  # context, then the generated ids
        self._read = len(self._ids)
        self._prefix = 0
        if tokenizer is not None and self._decode(0, self._read).endswith(_INCOMPLETE):
            self._prefix = self._read  # context ending inside a character would shift the text: use none
        self._text = ""  # generated text decoded so far, cut before a stop string once one appears
        self._emitted = 0  # length of the prefix of _text already returned
        self._stopped = False
        self._deferred = deferred and not self._stop

    @property
    def deferred(self) -> bool:
        """Whether add() only collects ids (the text is decoded at the end by `final_text`)."""
        return self._deferred

    def final_text(self) -> str:
        """Deferred: the whole generated text, decoded now (after the last add; call once, in place of
        finish())."""
        self.finish()
        return self._text

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared in the generated text; later tokens are ignored."""
        return self._stopped

    @property
    def text(self) -> str:
        """All generated text so far, stop string excluded (held-back text included); empty while
        deferred."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text that became final (often "")."""
        if self._decode_ids is None or self._stopped:
            return ""
        self._ids.append(token_id)
        self._count += 1
        if self._deferred:
            return ""
        prefix_text = self._decode(self._prefix, self._read)
        window_text = self._decode(self._prefix, len(self._ids))
        if len(window_text) <= len(prefix_text) or window_text.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return self._extend(window_text[len(prefix_text) :], hold_back=True)

    def finish(self) -> str:
        """Return the text still held back (pending partial characters included); call once at the end."""
        if self._decode_ids is None or self._stopped:
            return ""
        prefix_text = self._decode(self._prefix, self._read)
        window_text = self._decode(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return self._extend(window_text[len(prefix_text) :], hold_back=False)

    def _extend(self, new_text: str, hold_back: bool) -> str:
        """Add decoded text, cut at the first stop string, and return what can be streamed now."""
        start = max(0, len(self._text) - max((len(s) for s in self._stop), default=0) + 1)
        self._text += new_text
        stops = self._stop if self._count >= self._min_tokens else ()
        hits = [i for i in (self._text.find(s, start) for s in stops) if i >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self._stopped = True
            hold_back = False
        end = len(self._text) - (self._partial_stop_length() if hold_back else 0)
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _partial_stop_length(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        longest = min(max((len(s) for s in self._stop), default=1) - 1, len(self._text))
        for n in range(longest, 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _decode(self, start: int, end: int) -> str:
        assert self._decode_ids is not None
        ids = self._ids[start:end]
        return self._decode_ids(ids, self._skip_special_tokens) if ids else ""


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte, inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def token_bytes(tokenizer: Any) -> Callable[[int], bytes]:
    """token id -> the bytes it stands for, also for a token holding part of a multi-byte character
    (its text alone would be the replacement character): byte-level BPE pieces are mapped back through
    the byte alphabet, SentencePiece byte-fallback pieces (<0xE2>) are the byte; any other token is its
    decoded text in UTF-8."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(getattr(backend, "decoder", None)).__name__
    alphabet = _byte_level_alphabet() if decoder == "ByteLevel" else {}

    def lookup(token: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token)
        text = str(tokenizer.decode([token]))
        if isinstance(piece, str):
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            if alphabet and all(c in alphabet for c in piece) and text != piece:
                return bytes(alphabet[c] for c in piece)
        return text.encode()

    return lookup

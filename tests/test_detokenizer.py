"""IncrementalDetokenizer on the demo BPE: split characters, stop strings, the streaming invariant."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from moelora.demo import demo_model_path
from moelora.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "The kettle clicked off just as the rain began.",
    "héllo wörld, café crème",
    "emoji 😀 and 🎉🎉 in a row",
    "日本語のテキスト and mixed ascii",
    "<|im_start|>assistant\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(demo_model_path()))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Every add() result, then finish()."""
    return [detok.add(t) for t in ids] + [detok.finish()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_concatenates_to_decode(tok, text, skip):
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, encode(tok, "Hi there, "), (), skip)
    pieces = stream(detok, ids)
    assert "".join(pieces) == detok.text == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)  # split characters come out whole
    assert not detok.stopped


def test_multibyte_characters_really_are_split(tok):
    for char in ("é", "😀", "日"):
        assert len(encode(tok, char)) > 1, f"{char!r} is one token: the tests above would prove nothing"


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_concatenate_to_decode(tok, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(tok.vocab_size) for _ in range(60)]
    prompt = [rng.randrange(tok.vocab_size) for _ in range(7)]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt, (), skip)
        assert "".join(stream(detok, ids)) == detok.text == tok.decode(ids, skip_special_tokens=skip)


def test_prompt_ending_inside_a_character(tok):
    ids = encode(tok, "😀 ok")
    detok = IncrementalDetokenizer(tok, ids[:1], (), True)
    assert "".join(stream(detok, ids[1:])) == detok.text == tok.decode(ids[1:])


def test_text_streams_as_soon_as_characters_are_complete(tok):
    detok = IncrementalDetokenizer(tok, [], ("zzz",), True)
    out = "".join(detok.add(t) for t in encode(tok, "one é two"))
    assert out == "one é two" and detok.finish() == ""


@pytest.mark.parametrize(
    ("text", "stop", "want"),
    [
        ("The kettle clicked off just as", ("clicked",), "The kettle "),
        ("The kettle clicked off", ("ettle cl",), "The k"),  # spans token boundaries
        ("one two three four", ("three", "two"), "one "),  # the earliest hit wins
        ("one two three four", ("two three four five",), "one two three four"),  # prefix only: no stop
        ("a 😀 b", ("😀",), "a "),  # a stop string made of a split character
        ("café crème", ("é c",), "caf"),
        ("stop at once", ("stop",), ""),
        ("abcabcabd", ("abd",), "abcabc"),  # overlapping partial matches
    ],
)
def test_stop_strings(tok, text, stop, want):
    detok = IncrementalDetokenizer(tok, encode(tok, "prompt: "), stop, True)
    pieces = stream(detok, encode(tok, text))
    assert detok.text == want and "".join(pieces) == want
    assert detok.stopped == (want != text)


def test_partial_stop_string_is_held_back_until_finish(tok):
    detok = IncrementalDetokenizer(tok, [], ("world!",), True)
    streamed = "".join(detok.add(t) for t in encode(tok, "hello world"))
    assert streamed == "hello " and detok.text == "hello world"
    assert detok.finish() == "world" and not detok.stopped


def test_nothing_after_a_stop(tok):
    detok = IncrementalDetokenizer(tok, [], ("rain",), True)
    streamed = "".join(detok.add(t) for t in encode(tok, "the rain"))
    assert detok.stopped and streamed == detok.text == "the "
    assert [detok.add(t) for t in encode(tok, " more text")] == [""] * len(encode(tok, " more text"))
    assert detok.finish() == "" and detok.text == "the "


def test_stop_strings_in_the_prompt_do_not_count(tok):
    detok = IncrementalDetokenizer(tok, encode(tok, "please stop"), ("stop",), True)
    assert "".join(stream(detok, encode(tok, " now"))) == " now" and not detok.stopped


def test_without_a_tokenizer_text_stays_empty():
    detok = IncrementalDetokenizer(None, [1, 2], ("x",), True)
    assert stream(detok, [3, 4, 5]) == ["", "", "", ""]
    assert detok.text == "" and not detok.stopped


def test_decoding_cost_is_a_window_not_the_length(tok):
    calls: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = encode(tok, "The kettle clicked off, é 😀 日本. " * 12)
    detok = IncrementalDetokenizer(Counting(), encode(tok, "a long prompt " * 20), (), True)
    assert "".join(stream(detok, ids)) == tok.decode(ids)
    assert len(ids) > 200 and max(calls) <= 10


def test_stop_strings_wait_for_min_tokens(tok):
    """A stop string that ends before min_tokens generated tokens is ordinary text; the next one stops."""
    ids = encode(tok, "rain falls, then rain stops")
    first_rain_end = next(i for i in range(1, len(ids) + 1) if "rain" in tok.decode(ids[:i]))
    detok = IncrementalDetokenizer(tok, [], ("rain",), True, min_tokens=first_rain_end + 1)
    out = "".join(stream(detok, ids))
    assert detok.stopped and out == detok.text == "rain falls, then "
    plain = IncrementalDetokenizer(tok, [], ("rain",), True)
    assert "".join(stream(plain, ids)) == "" and plain.stopped


def test_token_decoder_equals_decode_and_skips_the_wrapper(tok):
    """The fast path (the Rust backend) gives decode's text, special tokens kept or skipped; a tokenizer
    with the clean-up pass, or any other object, goes through its own decode."""
    import random

    from moelora.engine.detokenizer import token_decoder

    rng = random.Random(0)
    fast = token_decoder(tok)
    assert fast.__closure__ is not None and any(
        c.cell_contents is tok.backend_tokenizer for c in fast.__closure__
    )
    specials = list(tok.all_special_ids)
    for _ in range(200):
        ids = [
            rng.choice(specials) if rng.random() < 0.2 else rng.randrange(len(tok))
            for _ in range(rng.randint(1, 12))
        ]
        for skip in (False, True):
            assert fast(ids, skip) == tok.decode(ids, skip_special_tokens=skip)

    class Cleaning:
        clean_up_tokenization_spaces = True
        backend_tokenizer = tok.backend_tokenizer

        def decode(self, ids, skip_special_tokens):
            return "own"

    assert token_decoder(Cleaning())([1], True) == "own"


@pytest.mark.parametrize("seed", range(5))
def test_deferred_text_equals_decode_and_the_stream(tok, seed):
    """Deferred (a consumer of whole outputs): no text per token and none in `text` until the end, then
    in one call exactly what streaming the same ids gives."""
    rng = random.Random(100 + seed)
    ids = [rng.randrange(tok.vocab_size) for _ in range(60)] + encode(tok, "😀 日本語 café")
    prompt = [rng.randrange(tok.vocab_size) for _ in range(7)]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt, (), skip, deferred=True)
        assert all(detok.add(t) == "" for t in ids) and detok.text == ""
        streamed = IncrementalDetokenizer(tok, prompt, (), skip)
        want = "".join(stream(streamed, ids))
        assert detok.final_text() == detok.text == want == tok.decode(ids, skip_special_tokens=skip)


def test_deferred_is_ignored_with_stop_strings(tok):
    """Stop strings need the text token by token: the detokenizer streams as without deferral."""
    ids = encode(tok, "one two STOP three")
    detok = IncrementalDetokenizer(tok, [], ("STOP",), True, deferred=True)
    assert "".join(stream(detok, ids)) == detok.text == "one two "
    assert detok.stopped

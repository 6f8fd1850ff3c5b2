"""Incremental detokenizer: deltas vs full decode, split UTF-8 characters, stop strings."""

from __future__ import annotations

import random
from typing import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

WORDS = ["the", "cat", "café", "naïve", "Größe", "漢字", "日本語", "🙂", "🚀", "résumé", "hello", "world",
         "data", "stop", "end", "ü", "ß", "—", "€", "STOP", "##", "a.b"]
REPLACEMENT = "\ufffd"


def _word(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:  # rare CJK characters: too many to all become tokens, so their bytes get split
        return "".join(chr(rng.randint(0x4E00, 0x4EFF)) for _ in range(rng.randint(1, 3)))
    if r < 0.25:
        return chr(rng.randint(0x1F600, 0x1F64F))
    return rng.choice(WORDS)


def _lines(rng: random.Random, n: int) -> list[str]:
    return [" ".join(_word(rng) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_lines(random.Random(0), 400), trainer)
    return tokenizer


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _lines(random.Random(1), 60)


def stream(tok: Tokenizer, ids: list[int], params: SamplingParams, prompt: Sequence[int] = (),
           rng: random.Random | None = None) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ``ids`` in chunks (1 token each, or random 1-3 with ``rng``); deltas incl. finish()."""
    detok = IncrementalDetokenizer(tok, list(prompt), params)
    deltas, i = [], 0
    while i < len(ids) and not detok.stopped:
        n = rng.randint(1, 3) if rng else 1
        deltas.append(detok.add(ids[i:i + n]))
        i += n
    deltas.append(detok.finish())
    return deltas, detok


def _decode(tokenizer, ids) -> str:
    """The reference: a whole-sequence decode, special tokens skipped (the engine's default)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def test_detokenize_roundtrip(tok, texts):
    for text in texts:
        assert _decode(tok, tok.encode(text).ids) == text


def test_tokenizer_splits_characters(tok, texts):
    """Guards the other tests: some tokens must end mid-character."""
    split = [i for text in texts for i in tok.encode(text).ids if REPLACEMENT in tok.decode([i])]
    assert len(split) > 20


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_full_decode_random_ids(tok, skip_special_tokens):
    rng = random.Random(2)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    vocab = tok.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        prompt = tok.encode(" ".join(_word(rng) for _ in range(rng.randint(0, 4)))).ids
        deltas, detok = stream(tok, ids, params, prompt, rng)
        expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected
        assert detok.output_text == expected


def test_no_replacement_char_in_deltas_of_real_text(tok, texts):
    rng = random.Random(3)
    held = 0
    for text in texts:
        ids = tok.encode(text).ids
        deltas, _ = stream(tok, ids, SamplingParams(), tok.encode("prompt 漢字").ids, rng)
        assert all(REPLACEMENT not in d for d in deltas)
        assert "".join(deltas) == text
        single, _ = stream(tok, ids, SamplingParams())
        held += single[:-1].count("")  # empty add() results: tokens ending mid-character
        assert "".join(single) == text
    assert held > 0, "some single-token adds must have been held back"


def test_special_tokens(tok):
    eos, pad = tok.token_to_id("<eos>"), tok.token_to_id("<pad>")
    ids = tok.encode("café ").ids + [pad] + tok.encode("漢字").ids + [eos]
    skipped, _ = stream(tok, ids, SamplingParams())
    kept, _ = stream(tok, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(skipped) == "café 漢字"
    assert "".join(kept) == "café <pad>漢字<eos>"


def _check_stream(deltas: list[str], expected: str) -> None:
    """Every prefix of the stream is a prefix of the final text, and the stream adds up to it."""
    seen = ""
    for d in deltas:
        seen += d
        assert expected.startswith(seen), (seen, expected)
    assert seen == expected


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_from_real_text(tok, texts, include):
    rng = random.Random(4 + include)
    spanning = 0
    for text in texts:
        ids = tok.encode(text).ids
        start = rng.randrange(len(text) - 1)
        stop = text[start:start + rng.randint(2, 8)]
        first = text.find(stop)
        expected = text[:first + len(stop)] if include else text[:first]
        params = SamplingParams(stop=[stop, "never-seen-stop"], include_stop_str_in_output=include)
        for chunking in (None, rng):
            deltas, detok = stream(tok, ids, params, rng=chunking)
            _check_stream(deltas, expected)
            assert detok.stop_reason == stop
            assert deltas[-1] == "", "finish() after a stop has nothing left"
        token_texts = [_decode(tok, ids[:k]) for k in range(len(ids) + 1)]
        spanning += not any(first >= len(token_texts[k]) and first + len(stop) <= len(token_texts[k + 1])
                            for k in range(len(ids)))
    assert spanning > 10, "most stop strings should span several tokens"


def test_stop_string_spanning_tokens_never_leaks(tok):
    text = "hello world STOP here"
    ids = tok.encode(text).ids
    assert all("d STOP" not in tok.decode([i]) for i in ids)  # the pre-tokenizer splits at the space
    deltas, detok = stream(tok, ids, SamplingParams(stop=["d STOP"]))
    _check_stream(deltas, "hello worl")
    assert all("d" not in d and "S" not in d for d in deltas)
    assert detok.stop_reason == "d STOP"


def test_partial_stop_prefix_is_held_then_released(tok):
    text = "the cat stop end the cat stop"
    ids = tok.encode(text).ids
    deltas, detok = stream(tok, ids, SamplingParams(stop=["stop!"]))
    _check_stream(deltas, text)
    assert detok.stop_reason is None
    assert deltas[-1] == "stop", "a trailing partial match is released only by finish()"
    assert "".join(deltas[:-1]).endswith("cat ")


@pytest.mark.parametrize("stops, expected, reason", [
    (["orld", "wor"], "hello ", "wor"),  # both complete within the token " world": the earlier end wins
    (["wor", "orld"], "hello ", "wor"),
    (["ld", "world"], "hello ", "world"),  # same end: the earlier start wins
    (["world data", "ld"], "hello wor", "ld"),
])
def test_earliest_ending_stop_wins(tok, stops, expected, reason):
    ids = tok.encode("hello world data").ids
    assert " world" in [tok.decode([i]) for i in ids]
    for chunking in (None, random.Random(0)):
        deltas, detok = stream(tok, ids, SamplingParams(stop=stops), rng=chunking)
        assert "".join(deltas) == expected and detok.stop_reason == reason


def test_tokens_after_stop_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["cat"]))
    assert detok.add(tok.encode("the cat").ids) == "the "
    assert detok.add(tok.encode(" hello").ids) == ""
    assert detok.finish() == "" and detok.output_text == "the "


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("end hello end world").ids
    deltas, detok = stream(tok, ids, SamplingParams(stop=["end"], min_tokens=2, max_tokens=16))
    assert "".join(deltas) == "end hello " and detok.stop_reason == "end"


def test_incomplete_character_flushed_at_finish(tok):
    ids = tok.encode("café 漢").ids
    cut = next(k for k in range(1, len(ids)) if _decode(tok, ids[:k]).endswith(REPLACEMENT))
    deltas, _ = stream(tok, ids[:cut], SamplingParams())
    assert REPLACEMENT not in "".join(deltas[:-1])
    assert "".join(deltas) == _decode(tok, ids[:cut])


def test_prompt_context_keeps_leading_space_with_metaspace():
    """SentencePiece-style decoders drop the first token's leading space; prompt context avoids it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(["hello world data cat"] * 20, trainers.BpeTrainer(vocab_size=60, show_progress=False))
    ids = tokenizer.encode("hello world data").ids
    assert _decode(tokenizer, ids[1:]) == "world data"
    deltas, _ = stream(tokenizer, ids[1:], SamplingParams(), prompt=ids[:1])
    assert deltas == [" world", " data", ""]

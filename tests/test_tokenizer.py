"""Tokenizers: the incremental detokenizer (multi-byte characters, leading spaces, stop strings, vLLM's text
options) and chat prompts."""

from __future__ import annotations

import random

import pytest

from scalellm_jax.tokenizer import HFTokenizer, IncrementalDetokenizer, MistralTokenizer

TEXTS = ["Hello wörld — 你好, 😀 emoji!  two  spaces\n\nnew line", " leading space", "日本語のテキスト🎉🎉 mixed",
         "a\tb  c\n  d", "Ünïcödé ½ ∑ 𝔘𝔫𝔦"]


@pytest.fixture(scope="module")
def mistral():
    return MistralTokenizer()


def _stream(tokenizer, ids, rng, stop=(), **options):
    """Feed ``ids`` in random chunks; returns (every visible text, the detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, stop, **options)
    seen, i = [], 0
    while i < len(ids) and not detok.stopped:
        k = rng.randint(1, 3)
        detok.add(ids[i:i + k])
        i += k
        seen.append(detok.text())
    detok.finish()
    seen.append(detok.text(finished=True))
    return seen, detok


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_a_full_decode_and_never_retracts(mistral, text):
    ids = mistral.encode(text, add_bos=False)
    rng = random.Random(text)
    for _ in range(10):
        seen, _ = _stream(mistral, ids, rng)
        assert seen[-1] == mistral.decode(ids)  # SentencePiece drops the first piece's leading space, as here
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))
        assert not any("\ufffd" in s for s in seen)


def test_random_token_sequences_match_a_full_decode(mistral):
    rng = random.Random(0)
    for _ in range(300):  # byte-fallback ids (3..258) often, so characters split across tokens
        ids = [rng.randrange(3, 259) if rng.random() < 0.5 else rng.randrange(32000) for _ in range(rng.randint(1, 24))]
        seen, _ = _stream(mistral, ids, rng)
        assert seen[-1] == mistral.decode(ids), ids


def test_a_character_split_over_byte_tokens_waits_for_its_last_byte(mistral):
    byte_ids = mistral.encode("🦜", add_bos=False)[-4:]
    assert all(3 <= t < 259 for t in byte_ids) and mistral.decode(byte_ids) == "🦜"  # four byte-fallback pieces
    detok = IncrementalDetokenizer(mistral)
    for token in byte_ids[:3]:
        detok.add([token])
        assert detok.text() == ""
    detok.add(byte_ids[3:])
    assert detok.text() == "🦜"


def test_an_unfinished_trailing_byte_is_released_at_finish(mistral):
    detok = IncrementalDetokenizer(mistral)
    ids = mistral.encode("ok 🦜", add_bos=False)[:-1]  # the parrot's last byte never comes
    for token in ids:  # one token per step, as the engine feeds them
        detok.add([token])
    assert detok.text() == "ok "
    detok.finish()
    assert detok.text(finished=True) == mistral.decode(ids) and detok.text(finished=True).endswith("\ufffd")


@pytest.mark.parametrize("stop", ["wörld", "d —", "!", "\n\nnew", "Hello"])
def test_stop_strings_spanning_tokens_cut_the_text_and_nothing_is_retracted(mistral, stop):
    text = TEXTS[0]
    ids = mistral.encode(text, add_bos=False)
    rng = random.Random(stop)
    seen, detok = _stream(mistral, ids, rng, stop=[stop, "never there"])
    assert detok.stopped and seen[-1] == text[: text.index(stop)]
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))
    assert all(stop not in s for s in seen)


def _reference(tokenizer, ids, stop=(), include_stop=False, skip_special_tokens=True, min_tokens=0):
    """(final text, stopped) from full decodes, the stop strings looked for one character at a time."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if len(ids) <= min_tokens:
        return text, False
    # the text of the first min_tokens tokens, less an incomplete last character (a later token completes it)
    first = len(tokenizer.decode(ids[:min_tokens], skip_special_tokens=skip_special_tokens).rstrip("\ufffd"))
    for end in range(first + 1, len(text) + 1):
        hits = [s for s in stop if text.endswith(s, 0, end)]
        if hits:
            return text[: end if include_stop else end - len(max(hits, key=len))], True
    return text, False


def _random_options(rng, text, num_tokens):
    stops = []
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(text) + 1)
        stops.append(text[i : i + rng.randint(1, 4)] or "never there")
    return dict(stop=stops, include_stop=rng.random() < 0.5, min_tokens=rng.choice([0, rng.randint(0, num_tokens + 1)]))


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_options_stream_like_a_full_decode(mistral, skip_special_tokens):
    """Random tokens (byte-fallback pieces, BOS and EOS often), random stops taken from the text, random
    include_stop and min_tokens, random chunks: the streamed text is the reference's and never retracted."""
    rng = random.Random(int(skip_special_tokens))
    for _ in range(300):
        ids = [rng.choice([1, 2]) if rng.random() < 0.15 else rng.randrange(3, 259) if rng.random() < 0.4
               else rng.randrange(32000) for _ in range(rng.randint(1, 24))]
        options = _random_options(rng, mistral.decode(ids, skip_special_tokens=skip_special_tokens), len(ids))
        options["skip_special_tokens"] = skip_special_tokens
        seen, detok = _stream(mistral, ids, rng, **options)
        assert (seen[-1], detok.stopped) == _reference(mistral, ids, **options), (ids, options)
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False)), (ids, options)


def test_hf_special_tokens_stream_like_a_full_decode(hf_folder):
    tokenizer = HFTokenizer(hf_folder[0])
    assert tokenizer.decode([1, 3, 2, 4], skip_special_tokens=False) == "<s> hello </s> world"
    assert tokenizer.decode([1, 3, 2, 4]) == "hello world"
    rng = random.Random(2)
    for _ in range(100):
        ids = [rng.randrange(7) for _ in range(rng.randint(1, 12))]
        options = _random_options(rng, tokenizer.decode(ids, skip_special_tokens=False), len(ids))
        seen, detok = _stream(tokenizer, ids, rng, skip_special_tokens=False, **options)
        assert (seen[-1], detok.stopped) == _reference(tokenizer, ids, skip_special_tokens=False, **options)


def test_mistral_special_tokens_decode_in_mistrals_v1_chat_format(mistral):
    ids = mistral.apply_chat_template([{"role": "user", "content": "Hello, how are you?"},
                                       {"role": "assistant", "content": "Fine, and you?"},
                                       {"role": "user", "content": "I'm doing great!"}])
    # Mistral's documented string form of a v1 conversation: only the first piece loses its space
    assert (mistral.decode(ids, skip_special_tokens=False)
            == "<s> [INST] Hello, how are you? [/INST] Fine, and you?</s> [INST] I'm doing great! [/INST]")
    assert mistral.decode(ids) == "[INST] Hello, how are you? [/INST] Fine, and you? [INST] I'm doing great! [/INST]"
    assert mistral.decode([2, 1, 2], skip_special_tokens=False) == "</s><s></s>"
    assert mistral.decode(mistral.encode("Hi", add_bos=False) + [2], skip_special_tokens=False) == "Hi</s>"


@pytest.mark.parametrize("stop", ["wörld", "d —", "!", "\n\nnew", "Hello"])
def test_include_stop_ends_the_text_after_the_stop_and_holds_nothing_back(mistral, stop):
    text = TEXTS[0]
    ids = mistral.encode(text, add_bos=False)
    rng = random.Random(stop)
    detok = IncrementalDetokenizer(mistral, [stop, "never there"], include_stop=True)
    seen, i = [], 0
    while not detok.stopped:
        k = rng.randint(1, 3)
        detok.add(ids[i:i + k])
        i += k
        assert detok.text() == detok.text(finished=True)  # no holdback: a kept stop never needs retracting
        seen.append(detok.text())
    assert seen[-1] == text[: text.index(stop) + len(stop)]
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))


@pytest.mark.parametrize("include_stop", [False, True])
def test_the_first_stop_string_to_complete_wins_however_the_tokens_arrive(mistral, include_stop):
    ids = mistral.encode("Hello world", add_bos=False)  # "▁Hello", "▁world"
    for stop, before, after in [(["lo world", "wor"], "Hello ", "Hello wor"),  # "wor" ends first
                                (["ld", "world"], "Hello ", "Hello world")]:  # same end: the longer one
        for chunks in ([ids], [ids[:1], ids[1:]]):
            detok = IncrementalDetokenizer(mistral, stop, include_stop=include_stop)
            for chunk in chunks:
                detok.add(chunk)
            assert detok.stopped and detok.text() == (after if include_stop else before)


@pytest.mark.parametrize("min_tokens, stop, expected", [
    (0, "one", ""), (1, "one", "one two "), (3, "one", "one two one two"),
    (2, "two one", "one "),  # starts in the first two tokens' text, ends in the third's: it counts
    (3, "two one", "one two one two"), (4, "two", "one two one two"),
])
def test_min_tokens_ignores_stop_strings_ending_in_the_first_tokens_text(mistral, min_tokens, stop, expected):
    ids = mistral.encode("one two one two", add_bos=False)  # "▁one", "▁two", "▁one", "▁two"
    for chunk in (1, 4):  # token by token, or all at once
        detok = IncrementalDetokenizer(mistral, [stop], min_tokens=min_tokens)
        for i in range(0, len(ids), chunk):
            detok.add(ids[i:i + chunk])
        detok.finish()
        assert detok.text(finished=True) == expected and detok.stopped == (expected != "one two one two")


@pytest.mark.parametrize("min_tokens, expected", [(4, "ok "), (6, "ok 🦜 ")])
def test_min_tokens_counts_a_character_by_the_token_that_completes_it(mistral, min_tokens, expected):
    ids = mistral.encode("ok 🦜 🦜", add_bos=False)  # "▁ok", "▁", then each parrot as four byte pieces
    for chunk in (1, 3, len(ids)):
        detok = IncrementalDetokenizer(mistral, ["🦜"], min_tokens=min_tokens)
        for i in range(0, len(ids), chunk):
            detok.add(ids[i:i + chunk])
        assert detok.stopped and detok.text() == expected  # min_tokens=4 ends mid-parrot: its last byte counts


def test_unfinished_text_holds_back_a_possible_stop_prefix(mistral):
    detok = IncrementalDetokenizer(mistral, stop=["END!"])
    detok.add(mistral.encode("abc EN", add_bos=False))
    assert len(detok.text()) == len("abc EN") - 3  # longest stop - 1 characters held back
    detok.finish()
    assert detok.text(finished=True) == "abc EN"


def test_decoding_work_per_token_stays_constant(mistral):
    class Counting:
        decoded = 0

        def decode(self, ids):
            Counting.decoded += len(ids)
            return mistral.decode(ids)

    ids = mistral.encode(" ".join(TEXTS) * 20, add_bos=False)
    detok = IncrementalDetokenizer(Counting())
    for token in ids:
        detok.add([token])
    assert Counting.decoded < 8 * len(ids)  # a full re-decode per token would be ~len(ids)**2 / 2


def test_mistral_chat_prompt_uses_the_inst_format(mistral):
    ids = mistral.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}])
    assert ids[0] == mistral.bos_id and ids.count(mistral.eos_id) == 1  # the finished assistant turn ends in EOS
    text = mistral.decode(ids)
    assert text.startswith("[INST] Be brief.\n\nHi [/INST]") and text.endswith("[INST] Bye [/INST]")
    with pytest.raises(ValueError, match="^messages"):
        mistral.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="^messages"):
        mistral.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "[U]": 5, "[A]": 6}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[U]", "[A]"]})
    plain = tmp_path_factory.mktemp("plain")
    tokenizer.save_pretrained(plain)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '[U]' if m['role'] == 'user' else '[A]' }}"
                               " {{ m['content'] }} {% endfor %}[A]")
    templated = tmp_path_factory.mktemp("templated")
    tokenizer.save_pretrained(templated)
    return plain, templated


def test_hf_chat_template_renders_with_its_own_special_tokens(hf_folder):
    plain, templated = hf_folder
    tokenizer = HFTokenizer(templated)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}]) == [1, 5, 3, 4, 6]
    with pytest.raises(ValueError, match="^messages: .*no chat template"):
        HFTokenizer(plain).apply_chat_template([{"role": "user", "content": "hello"}])


def test_hf_detokenizer_matches_a_full_decode(hf_folder):
    tokenizer = HFTokenizer(hf_folder[1])
    ids = [3, 4, 2, 3, 3, 4]
    seen, _ = _stream(tokenizer, ids, random.Random(1))
    assert seen[-1] == tokenizer.decode(ids) == "hello world hello hello world"

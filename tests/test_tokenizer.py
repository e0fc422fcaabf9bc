"""Tokenizers: the incremental detokenizer (multi-byte characters, leading spaces, stop strings) and chat prompts."""

from __future__ import annotations

import random

import pytest

from scalellm_jax.tokenizer import HFTokenizer, IncrementalDetokenizer, MistralTokenizer

TEXTS = ["Hello wörld — 你好, 😀 emoji!  two  spaces\n\nnew line", " leading space", "日本語のテキスト🎉🎉 mixed",
         "a\tb  c\n  d", "Ünïcödé ½ ∑ 𝔘𝔫𝔦"]


@pytest.fixture(scope="module")
def mistral():
    return MistralTokenizer()


def _stream(tokenizer, ids, rng, stop=()):
    """Feed ``ids`` in random chunks; returns (every visible text, the detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, stop)
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

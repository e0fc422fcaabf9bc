"""Tokenizers: a checkpoint's own Hugging Face tokenizer, or Mixtral's, shipped inside mistral-common.

Mixtral's SentencePiece model (``tokenizer.model.v1``) is part of the ``mistral-common`` wheel, so
the real tokenizer works offline without a model hub.

Also here: chat prompts (``apply_chat_template``) and ``IncrementalDetokenizer``, which turns a
growing list of output tokens into text a few tokens at a time, with stop strings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

ChatMessages = Sequence[Mapping[str, str]]  # [{"role": "system" | "user" | "assistant", "content": text}]


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    # the most characters of text one token can stand for (its longest piece): a text longer than this
    # times a token limit cannot fit in it, which is known before tokenizing
    max_token_chars: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``; with ``skip_special_tokens=False`` special tokens (BOS, EOS,
        control tokens) appear as their strings, e.g. ``</s>``."""
        ...

    def apply_chat_template(self, messages: ChatMessages) -> list[int]:
        """Token ids of a chat prompt ending where the assistant's reply starts.

        Raises ``ValueError`` starting with ``messages`` for a conversation the template rejects.
        """
        ...


class MistralTokenizer:
    """Mixtral's tokenizer (SentencePiece v1) from mistral-common."""

    def __init__(self, model_file: str | Path | None = None):
        import mistral_common
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as _Mistral

        if model_file is None:
            model_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        self._mistral = _Mistral.from_file(str(model_file))
        self._inner = self._mistral.instruct_tokenizer.tokenizer
        self.bos_id = self._inner.bos_id
        self.eos_id = self._inner.eos_id
        self.vocab_size = self._inner.n_words
        self._special = self._inner.special_ids  # SentencePiece's control tokens: <s>, </s>
        self.max_token_chars = max(len(self._inner.id_to_piece(i)) for i in range(self.vocab_size))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._inner.encode(text, bos=add_bos, eos=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self._inner.decode(list(token_ids))
        # mistral-common's SpecialTokenPolicy.KEEP writes every piece raw ("▁Hello", "<0x0A>"), so
        # here only the special tokens are kept as pieces and the runs between them decode as usual.
        # SentencePiece drops the leading space of a decode's first piece: only the text's own first
        # run loses it, as in Mixtral's Hugging Face tokenizer ("<s> [INST] Hi [/INST] Hello</s>").
        parts: list[str] = []
        run: list[int] = []
        for token in [*token_ids, None]:
            if token is not None and token not in self._special:
                run.append(token)
                continue
            if run:
                text = self._inner.decode(run)
                if parts and self._inner.id_to_piece(run[0]).startswith("▁"):
                    text = " " + text
                parts.append(text)
                run = []
            if token is not None:
                parts.append(self._inner.id_to_piece(token))
        return "".join(parts)

    def apply_chat_template(self, messages: ChatMessages) -> list[int]:
        """Mixtral's ``[INST] … [/INST]`` format, rendered by mistral-common itself."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        for m in messages:
            if m.get("role") not in kinds:
                raise ValueError(f"messages: unsupported role {m.get('role')!r} (use system, user or assistant)")
        try:
            chat = [kinds[m["role"]](content=m["content"]) for m in messages]
            return self._mistral.encode_chat_completion(ChatCompletionRequest(messages=chat)).tokens
        except (MistralCommonException, ValueError) as exc:  # e.g. a conversation starting with the assistant
            raise ValueError(f"messages: {exc}") from None


class HFTokenizer:
    """A tokenizer saved next to a Hugging Face checkpoint (``tokenizer.json`` / ``tokenizer.model``)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self._inner = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.bos_id = self._inner.bos_token_id
        self.eos_id = self._inner.eos_token_id
        self.vocab_size = len(self._inner)
        self.max_token_chars = max(map(len, self._inner.get_vocab()))  # added (special) tokens included

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._inner.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._inner.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: ChatMessages) -> list[int]:
        """The checkpoint's own chat template (``chat_template`` in its tokenizer config)."""
        if not self._inner.chat_template:
            raise ValueError("messages: this model's tokenizer has no chat template; use /v1/completions")
        try:
            rendered = self._inner.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja templates raise anything (often TemplateError via raise_exception)
            raise ValueError(f"messages: {exc}") from None
        # The template writes the special tokens (BOS included) itself.
        return self._inner.encode(rendered, add_special_tokens=False)


def load_tokenizer(model_path: str | Path | None = None) -> Tokenizer:
    """The checkpoint folder's own tokenizer when it has one, else Mixtral's from mistral-common."""
    if model_path is not None:
        folder = Path(model_path)
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            return HFTokenizer(folder)
        logger.info("%s has no tokenizer files; using Mixtral's tokenizer from mistral-common", folder)
    return MistralTokenizer()


class IncrementalDetokenizer:
    """Output text of one request, grown a few tokens at a time (O(new tokens) per call).

    Each call decodes a short window: from the token before the last text boundary to the end.
    The new text is the window's decode minus the decode of its already-read part, so
    tokenizer rules that depend on the neighbour (SentencePiece drops the leading space of the
    first piece of a decode; byte-fallback pieces only make a character together) come out as in
    a full decode. A window whose text ends in U+FFFD is an incomplete multi-byte character: it
    is held back until the next token completes it (or until ``finish``). The text is always that
    of a full ``decode(token_ids, skip_special_tokens)``, however the tokens are split into calls.

    Stop strings (vLLM's rules): the text ends at the first stop string to complete (the earliest
    end; of two ending at the same character, the longer), right before it, or right after it with
    ``include_stop`` (vLLM's ``include_stop_str_in_output``). With ``min_tokens``, a stop string
    counts only once more than ``min_tokens`` tokens were fed and only if it ends after the text of
    the first ``min_tokens`` tokens (their decode less an incomplete last character, which comes
    with the token that completes it): vLLM v1 checks stop strings only in text decoded after its
    ``min_tokens``-th output token, so a stop string may start in that text but not end there.

    Stop strings are searched only in the new text plus the ``len(stop) - 1`` characters before
    it (a stop may span tokens). Unless ``include_stop``, ``text`` holds back ``longest stop - 1``
    characters while unfinished, so text once shown never has to be retracted when a stop string
    completes; a stop string kept in the text ends after all text shown, so it needs no holdback.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = True, min_tokens: int = 0):
        self._include_stop = include_stop
        self._min_tokens = min_tokens
        # The default call stays decode(ids), so tokenizers whose decode lacks the keyword still work.
        decode = tokenizer.decode
        self._decode = decode if skip_special_tokens else partial(decode, skip_special_tokens=False)
        self._ids: list[int] = []
        self._prefix = 0  # window start: one text boundary back, for the neighbour rules above
        self._read = 0  # tokens up to here are in self._text
        self._text = ""
        self._stop = tuple(stop)
        self._holdback = 0 if include_stop else max(map(len, self._stop), default=1) - 1
        self._stop_from = 0  # a stop string must end after this many characters (min_tokens)
        self.stopped = False  # a stop string was found; the text ends right before (or after) it

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def add(self, token_ids: Sequence[int]) -> None:
        """Feed the next output tokens (no-op once a stop string was found)."""
        if self.stopped or not token_ids:
            return
        if self._stop and len(self._ids) < self._min_tokens <= len(self._ids) + len(token_ids):
            # Decoded once, so the boundary does not depend on how the tokens were split into calls.
            first = self._ids + list(token_ids[: self._min_tokens - len(self._ids)])
            self._stop_from = len(self._decode(first).rstrip("\ufffd"))
        self._ids.extend(token_ids)
        self._advance(final=False)

    def finish(self) -> None:
        """The request ended: release text held back for an incomplete character."""
        if not self.stopped:
            self._advance(final=True)

    def text(self, finished: bool = False) -> str:
        """The text so far; while unfinished, minus the tail a stop string could still claim."""
        if finished or self.stopped or not self._holdback:
            return self._text
        return self._text[: max(0, len(self._text) - self._holdback)]

    def _advance(self, final: bool) -> None:
        done = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(done) or (window.endswith("\ufffd") and not final):
            return  # nothing visible yet (special token, or an incomplete character)
        self._prefix, self._read = self._read, len(self._ids)
        start = len(self._text)
        self._text += window[len(done) :]
        if self._stop and len(self._ids) > self._min_tokens:
            self._match_stop(max(start, self._stop_from))

    def _match_stop(self, after: int) -> None:
        """Stop at the earliest-ending stop string that ends past ``after`` characters, if any.

        Stops ending earlier were looked for by earlier calls (or do not count, for min_tokens), so
        the result is the same as if the text had come one character at a time.
        """
        hits = [(i + len(s), i) for s in self._stop if (i := self._text.find(s, max(0, after - len(s) + 1))) >= 0]
        if hits:
            end, begin = min(hits)  # of two ending together, the longer (earlier start) wins
            self._text = self._text[: end if self._include_stop else begin]
            self.stopped = True

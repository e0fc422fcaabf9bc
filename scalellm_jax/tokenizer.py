"""Tokenizers: a checkpoint's own Hugging Face tokenizer, or Mixtral's, shipped inside mistral-common.

Mixtral's SentencePiece model (``tokenizer.model.v1``) is part of the ``mistral-common`` wheel, so
the real tokenizer works offline without a model hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class MistralTokenizer:
    """Mixtral's tokenizer (SentencePiece v1) from mistral-common."""

    def __init__(self, model_file: str | Path | None = None):
        import mistral_common
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as _Mistral

        if model_file is None:
            model_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        self._inner = _Mistral.from_file(str(model_file)).instruct_tokenizer.tokenizer
        self.bos_id = self._inner.bos_id
        self.eos_id = self._inner.eos_id
        self.vocab_size = self._inner.n_words

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._inner.encode(text, bos=add_bos, eos=False)

    def decode(self, token_ids: list[int]) -> str:
        return self._inner.decode(list(token_ids))


class HFTokenizer:
    """A tokenizer saved next to a Hugging Face checkpoint (``tokenizer.json`` / ``tokenizer.model``)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self._inner = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.bos_id = self._inner.bos_token_id
        self.eos_id = self._inner.eos_token_id
        self.vocab_size = len(self._inner)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._inner.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, token_ids: list[int]) -> str:
        return self._inner.decode(list(token_ids), skip_special_tokens=True)


def load_tokenizer(model_path: str | Path | None = None) -> Tokenizer:
    """The checkpoint folder's own tokenizer when it has one, else Mixtral's from mistral-common."""
    if model_path is not None:
        folder = Path(model_path)
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            return HFTokenizer(folder)
        logger.info("%s has no tokenizer files; using Mixtral's tokenizer from mistral-common", folder)
    return MistralTokenizer()

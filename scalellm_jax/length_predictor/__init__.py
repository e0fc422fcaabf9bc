"""The output-length predictor behind the ``alise`` policy: prompt text -> expected answer length.

``predictor`` (features -> ridge regression on log length, plus retrieval of near-identical past
prompts), ``text_encoder`` and ``static_embedding`` (the features), ``tiered`` (a fast and an accurate
predictor on their own threads), ``dataset`` (training rows), ``evaluation`` (quality and cost). It
imports nothing from the engine (``engine.predicted_lengths`` adapts it to the scheduling policy).
CLI: ``python -m scalellm_jax.length_predictor``.
"""

"""Per-request logit controls on device: logit bias, min_tokens, and repetition/frequency/presence penalties.

The controls that depend on what a request has seen live in a device-resident ``TokenHistory``: one row of
vocabulary width per *slot*, and a slot per running request that uses any of them (``HistorySlots`` hands
them out on the host). A row holds, per token, ``COUNT`` × its output count plus flag bits (``PROMPT``: in
the prompt; ``STOP``: a stop token ``min_tokens`` must hold back), and a float32 bias row for ``logit_bias``.
A row is written once when its request takes the slot; after that the step itself adds each sampled token,
so a step reads no token lists from the host. Rows without a slot (``slot == NO_SLOT``) are untouched, and
when no row of a step has one, the controls cost nothing (``sampling.sample`` runs them under a ``lax.cond``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

PROMPT, STOP, COUNT = 1, 2, 4  # a history value: COUNT × output count | STOP | PROMPT
NO_SLOT = 2**31 - 1  # any index past the slots: read as nothing, written nowhere


class TokenHistory(NamedTuple):
    """Device state, one row per slot (donated to every step and updated in place)."""

    marks: jax.Array  # [slots, V] int32
    bias: jax.Array  # [slots, V] float32


class RowControls(NamedTuple):
    """Per batch row [rows]: its history slot and the penalties that read it."""

    slot: jax.Array  # int32; NO_SLOT: no controls
    presence: jax.Array  # float32
    frequency: jax.Array  # float32
    repetition: jax.Array  # float32
    suppress_stop: jax.Array  # bool: fewer than min_tokens outputs so far


def history_shapes(num_slots: int, vocab_size: int) -> TokenHistory:
    return TokenHistory(jax.ShapeDtypeStruct((num_slots, vocab_size), jnp.int32),
                        jax.ShapeDtypeStruct((num_slots, vocab_size), jnp.float32))


def history_bytes(num_slots: int, vocab_size: int) -> int:
    return 8 * num_slots * vocab_size


def controlled_rows(history: TokenHistory, controls: RowControls) -> jax.Array:
    """[rows] bool: the rows with a slot (the others are left as they are)."""
    return controls.slot < history.marks.shape[0]


def apply_controls(logits: jax.Array, history: TokenHistory, controls: RowControls) -> jax.Array:
    """``logits`` [rows, V] float32 with each row's controls applied, in vLLM's order: bias, the min_tokens
    mask, then the repetition penalty (prompt and output tokens), frequency and presence (output tokens)."""
    num_slots = history.marks.shape[0]
    active = controlled_rows(history, controls)
    slot = jnp.minimum(controls.slot, num_slots - 1)
    marks = history.marks[slot]
    x = logits + history.bias[slot]
    x = jnp.where(controls.suppress_stop[:, None] & ((marks & STOP) != 0), -jnp.inf, x)
    count = marks // COUNT
    seen = (count > 0) | ((marks & PROMPT) != 0)
    repetition = controls.repetition[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / repetition, x * repetition), x)
    x = x - controls.frequency[:, None] * count - controls.presence[:, None] * (count > 0)
    return jnp.where(active[:, None], x, logits)


def record_tokens(history: TokenHistory, slot: jax.Array, tokens: jax.Array) -> TokenHistory:
    """Count each row's sampled token in its slot (rows without one write nothing)."""
    return history._replace(marks=history.marks.at[slot, tokens].add(COUNT, mode="drop"))


def write_rows(history: TokenHistory, slots: jax.Array, marks: jax.Array, bias: jax.Array) -> TokenHistory:
    """Replace whole rows (a request taking a slot); ``slots`` entries of NO_SLOT are padding."""
    return TokenHistory(history.marks.at[slots].set(marks, mode="drop"),
                        history.bias.at[slots].set(bias, mode="drop"))

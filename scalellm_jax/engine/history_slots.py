"""Host side of the token history (``logit_controls``): which running request owns which device slot.

A request that uses a logit control takes a slot the first time it samples, and its row is written whole
from host state (its prompt, its outputs so far, its stop tokens and bias); it gives the slot back as soon
as it is not running (finished, aborted or preempted: a resumed request gets a fresh row, so nothing
recorded while it was away can be stale). Running requests never outnumber ``max_num_seqs``, so neither
do slots.
"""

from __future__ import annotations

import numpy as np

from scalellm_jax.engine.buckets import bucket_for, pow2_buckets
from scalellm_jax.engine.logit_controls import COUNT, NO_SLOT, PROMPT, STOP
from scalellm_jax.engine.request import Request, RequestStatus


class HistorySlots:
    def __init__(self, num_slots: int, vocab_size: int):
        self.num_slots, self.vocab_size = num_slots, vocab_size
        self.write_buckets = pow2_buckets(1, num_slots)  # rows written in one call, padded up
        self._free = list(range(num_slots - 1, -1, -1))
        self._owners: dict[int, Request] = {}  # slot -> request
        self._slot_of: dict[int, int] = {}  # id(request) -> slot
        self._writes: list[tuple[int, Request]] = []

    def release_idle(self) -> None:
        """Give back the slots of requests no longer running (call before handing out this step's)."""
        for slot, request in list(self._owners.items()):
            if request.status is not RequestStatus.RUNNING:
                del self._owners[slot], self._slot_of[id(request)]
                self._free.append(slot)

    def slot(self, request: Request) -> int:
        """The request's slot, taking a free one (and queueing its row) if it has none."""
        slot = self._slot_of.get(id(request))
        if slot is None:
            if not self._free:
                raise RuntimeError(f"no free history slot for {request.request_id}: more than "
                                   f"{self.num_slots} running requests use logit controls")
            slot = self._free.pop()
            self._owners[slot], self._slot_of[id(request)] = request, slot
            self._writes.append((slot, request))
        return slot

    def in_use(self) -> int:
        return len(self._owners)

    def take_writes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The rows queued since the last call, padded to a write bucket: (slots, marks, bias); None if none."""
        if not self._writes:
            return None
        writes, self._writes = self._writes, []
        n = bucket_for(len(writes), self.write_buckets)
        slots = np.full(n, NO_SLOT, np.int32)
        marks = np.zeros((n, self.vocab_size), np.int32)
        bias = np.zeros((n, self.vocab_size), np.float32)
        for i, (slot, request) in enumerate(writes):
            slots[i] = slot
            marks[i], bias[i] = history_row(request, self.vocab_size)
        return slots, marks, bias


def history_row(request: Request, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A request's history row from its host state: (marks [V] int32, bias [V] float32)."""
    params = request.sampling_params
    marks = COUNT * np.bincount(np.asarray(request.output_token_ids, np.int64), minlength=vocab_size)[:vocab_size]
    marks = marks.astype(np.int32)
    marks[np.unique(request.prompt_token_ids)] |= PROMPT
    marks[[t for t in request.stop_tokens() if t < vocab_size]] |= STOP
    bias = np.zeros(vocab_size, np.float32)
    for token, value in params.logit_bias:
        bias[token] = value
    return marks, bias

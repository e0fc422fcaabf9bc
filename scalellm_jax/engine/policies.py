"""Scheduling policies: who is admitted first, and who is preempted when the KV cache runs out.

The scheduler owns the mechanics (token budget, KV allocation, preemption by recompute); a policy
only ranks requests. Both methods take ``now`` so time-dependent policies (ALISE: predicted
shortest remaining time with aging, a later issue) fit the same interface.

A policy should rank consistently: the victim it picks among running requests should be one it
would admit last. The scheduler relies on that for progress: the best-ranked running request is
never preempted while others run, so it always finishes.
"""

from __future__ import annotations

import abc

from scalellm_jax.engine.request import Request


class Policy(abc.ABC):
    name: str

    @abc.abstractmethod
    def order_waiting(self, waiting: list[Request], now: float) -> list[Request]:
        """The waiting requests in admission order (a new list; the input is not modified)."""

    @abc.abstractmethod
    def pick_victim(self, running: list[Request], now: float) -> Request:
        """The running request to preempt when a running request cannot get KV pages (non-empty input)."""


class _KeyedPolicy(Policy):
    """A static sort key: waiting requests run smallest key first; the largest running key is the victim."""

    @staticmethod
    @abc.abstractmethod
    def _key(request: Request) -> tuple: ...

    def order_waiting(self, waiting: list[Request], now: float) -> list[Request]:
        return sorted(waiting, key=self._key)

    def pick_victim(self, running: list[Request], now: float) -> Request:
        if not running:
            raise ValueError("pick_victim needs at least one running request")
        return max(running, key=self._key)


class FCFSPolicy(_KeyedPolicy):
    """First come, first served; ties broken by request id so the order is deterministic.

    Preempted requests keep their arrival time, so they go back to the front of the queue.
    """

    name = "fcfs"

    @staticmethod
    def _key(request: Request) -> tuple:
        return (request.arrival_time, request.request_id)


class PriorityPolicy(_KeyedPolicy):
    """Lower ``priority`` value first (as in vLLM), then first come, first served."""

    name = "priority"

    @staticmethod
    def _key(request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)



_POLICIES: dict[str, type[Policy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}


def make_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"policy must be one of {sorted(_POLICIES)}, got {name!r}") from None

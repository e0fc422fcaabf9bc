"""Two server replicas behind HAProxy with the recipe's config (server/haproxy/haproxy.cfg), driven by the
``openai`` client: a replica killed mid-load costs only the streams it was sending, and a replica told to
shut down (SIGTERM) finishes its streams while HAProxy sends everything new to the other.

The replicas run on a simulated H200 (every part real but the model step, which sleeps for the cost
model's time), so they start in seconds and behave like GPU hosts. The clients never retry on their own
(``max_retries=0``): every request that succeeds despite a dead or draining replica was saved by HAProxy.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_helpers import ServerProcess, metric, wait_until

from benchmarks.load_balancer import HAProxy, haproxy_binary

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(haproxy_binary() is None,
                                 reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)")]

MODEL = "mixtral-8x7b"  # the simulated replicas' served name (ServerProcess serves the preset)
SHORT = 24  # tokens per request of the steady load: about a second on the simulated H200 at this batch


@dataclasses.dataclass
class Outcome:
    started: float  # time.monotonic() when the request was sent
    replica: str | None = None  # HAProxy's X-ScaleLLM-Replica: the replica the request last went to
    status: int | None = None  # the response's HTTP status (None: no response)
    tokens: int = 0  # completion tokens in the final usage chunk
    finish_reason: str | None = None
    error: str | None = None
    chunks: int = 0  # content chunks received so far
    done: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason == "length"


def stream_chat(client, max_tokens: int, outcome: Outcome) -> Outcome:
    """One streamed chat completion through the load balancer, as an application sends it; ``outcome``
    is filled in as it goes (other threads watch it)."""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me about load balancers."}],
            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        outcome.replica, outcome.status = raw.headers.get("x-scalellm-replica"), raw.status_code
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                outcome.chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome.finish_reason = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                outcome.tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - what a client sees is the data point
        outcome.error = f"{type(exc).__name__}: {exc}"
        response = getattr(exc, "response", None)  # an HTTP error status: who answered it
        if response is not None:
            outcome.replica, outcome.status = response.headers.get("x-scalellm-replica"), response.status_code
    if outcome.error is None and outcome.tokens != max_tokens:
        outcome.error = f"{outcome.tokens} tokens of {max_tokens}"
    outcome.done = True
    return outcome


class Load:
    """``clients`` threads, each sending streamed chat completions back to back until ``stop``."""

    def __init__(self, url: str, clients: int, max_tokens: int = SHORT):
        import openai

        self.outcomes: list[Outcome] = []
        self.current: dict[int, Outcome] = {}  # each client's request in flight
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k, openai.OpenAI(
            base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), max_tokens)) for k in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, k, client, max_tokens):
        while not self._stop.is_set():
            self.current[k] = Outcome(started=time.monotonic())
            self.outcomes.append(stream_chat(client, max_tokens, self.current[k]))

    def streaming_from(self, replica: str, max_chunks: int) -> int:
        """Streams in flight that ``replica`` has begun sending and is at most ``max_chunks`` chunks into."""
        return sum(o.replica == replica and 0 < o.chunks <= max_chunks and not o.done
                   for o in list(self.current.values()))

    def done_since(self, t: float) -> int:
        """Requests sent at or after ``t`` that have finished (either way)."""
        return sum(o.started >= t for o in list(self.outcomes))

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return self.outcomes


def incidents(balancer: HAProxy) -> str:
    """HAProxy's log without its successful requests: failures, retries' outcomes, servers going down."""
    return "".join(line for line in balancer.log if " 200 " not in line)[-4000:]


@pytest.fixture
def cluster():
    """``cluster(*server flags)`` → (two replicas, HAProxy in front of them); all stopped after the test."""
    started = []

    def start(*flags):
        with ThreadPoolExecutor(2) as pool:  # both replicas start at once
            replicas = list(pool.map(lambda _: ServerProcess(*flags), range(2)))
        started.extend(replicas)
        balancer = HAProxy([r.url.removeprefix("http://") for r in replicas])
        started.append(balancer)
        balancer.wait_all_up()
        return replicas, balancer

    yield start
    for process in reversed(started):
        process.stop()


def test_a_killed_replica_costs_only_its_streams_in_flight_and_new_requests_keep_succeeding(cluster):
    (victim, survivor), balancer = cluster()
    load = Load(balancer.url, clients=8)
    # Mid-load: both replicas have answered, and the victim is sending streams it is early in (so they
    # cannot end in the moment before the kill; in-flight requests finish together, and start together).
    wait_until(lambda: {o.replica for o in load.outcomes if o.ok} == {"replica1", "replica2"}, timeout=30)
    wait_until(lambda: load.streaming_from("replica1", max_chunks=SHORT // 3) >= 2, timeout=30, interval=0.005)
    victim.process.kill()
    victim.process.wait()
    dead = time.monotonic()  # from here on nothing can reach the victim
    wait_until(lambda: balancer.server_states()["replica1"].startswith("DOWN"), timeout=10)
    wait_until(lambda: load.done_since(dead) >= 40, timeout=60)
    outcomes = load.stop()

    before = [o for o in outcomes if o.started < dead]
    after = [o for o in outcomes if o.started >= dead]
    assert len(after) >= 40
    failed_after = [o for o in after if not o.ok]
    assert not failed_after, f"requests sent after the kill failed: {failed_after[:3]}\n{incidents(balancer)}"
    assert {o.replica for o in after} == {"replica2"}, incidents(balancer)
    # Before the kill, the only failures are requests HAProxy had sent to the victim: streams it had
    # begun answering, cut mid-way (status 200, no final chunk: a response under way cannot be
    # replayed), and requests it was killed before reading, whose connection its kernel reset
    # (HAProxy 2.6 answers 502 instead of retrying). One it had read but not answered was closed,
    # retried on the survivor (retry-on empty-response, redispatch) and succeeded.
    lost = [o for o in before if not o.ok]
    assert any(o.status == 200 for o in lost), "the kill cut no stream in flight: the test did not test failover"
    for o in lost:
        assert o.replica == "replica1" and o.finish_reason is None, f"{o}\n{incidents(balancer)}"
        assert (o.status == 200 and o.error.startswith("APIConnectionError")) or o.status == 502, \
            f"{o}\n{incidents(balancer)}"
    assert len(lost) <= 8  # at most one per client
    assert all(o.ok for o in before if o.replica == "replica2")
    assert survivor.process.poll() is None and balancer.process.poll() is None


def test_a_draining_replica_finishes_its_streams_while_new_requests_go_to_the_other(cluster):
    (draining, other), balancer = cluster("--shutdown-grace-s", "30")
    long_streams = Load(balancer.url, clients=4, max_tokens=150)  # ~5 s each on the simulated H200
    wait_until(lambda: metric(draining.url, "scalellm_num_requests_running") >= 1, timeout=30)
    load = Load(balancer.url, clients=4)
    wait_until(lambda: {o.replica for o in load.outcomes if o.ok} == {"replica1", "replica2"}, timeout=30)
    draining.signal(signal.SIGTERM)  # /health turns 503 at once: HAProxy's checks take it out
    wait_until(lambda: balancer.server_states()["replica1"].startswith("DOWN"), timeout=10)
    out = time.monotonic()
    wait_until(lambda: load.done_since(out) >= 16, timeout=60)
    outcomes, streams = load.stop(), long_streams.stop()

    # Every request succeeded, including those sent between the SIGTERM and HAProxy's check seeing it:
    # the draining replica answered them 503, and HAProxy sent them to the other (retry-on 503).
    failed = [o for o in outcomes + streams if not o.ok]
    assert not failed, f"{failed[:3]}\n{incidents(balancer)}"
    assert {o.replica for o in outcomes if o.started >= out} == {"replica2"}, incidents(balancer)
    # The long streams the draining replica was sending ran to their end (150 tokens, finish "length").
    assert any(o.replica == "replica1" and o.started < out for o in streams)
    assert draining.process.wait(timeout=40) == 0  # it exits once its last stream ended, within the grace
    assert "Traceback" not in "".join(draining.log)

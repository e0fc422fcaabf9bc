"""Shutdown under load, with real signals on a server process: drain, bounded grace, second signal.

The server runs on a simulated H200 (every part real but the model step, which sleeps for the cost
model's time): it starts in seconds and its streams last as long as asked.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import pytest
from server_helpers import ServerProcess, call, metric, wait_until


@pytest.fixture
def start():
    servers = []

    def start_server(*flags):
        servers.append(ServerProcess(*flags))
        return servers[-1]

    yield start_server
    for server in servers:
        server.stop()


def _stream(url: str, max_tokens: int):
    """Open a streamed completion; returns the response, whose lines are read by the caller."""
    body = {"model": "mixtral-8x7b", "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=120)


def _events(response) -> list[str]:
    """The ``data:`` payloads of an SSE response, to its end."""
    return [line[6:].strip() for line in (raw.decode() for raw in response) if line.startswith("data: ")]


def _first_event(response) -> str:
    for raw in response:
        line = raw.decode()
        if line.startswith("data: "):
            return line[6:].strip()
    raise AssertionError("the stream ended before its first event")


def test_sigterm_drains_in_flight_streams_and_refuses_new_work(start):
    server = start("--shutdown-grace-s", "30")
    response = _stream(server.url, max_tokens=150)  # ~5 s of simulated decode steps
    _first_event(response)
    server.signal(signal.SIGTERM)
    wait_until(lambda: call(server.url + "/health")[0] == 503, timeout=10)
    status, headers, body = call(server.url + "/v1/completions",
                                 {"model": "mixtral-8x7b", "prompt": "Hi", "max_tokens": 2})
    assert status == 503 and headers["Retry-After"] and "shutting down" in body["error"]["message"]
    events = _events(response)
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 150  # the stream ran to its end
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(timeout=15) == 0


def test_after_the_grace_streams_end_with_an_error_event_and_the_process_exits(start):
    server = start("--shutdown-grace-s", "1")
    response = _stream(server.url, max_tokens=3000)  # ~90 s: far past the grace
    _first_event(response)
    result = {}

    def unstreamed():  # a non-streamed request in flight too: it gets a 503
        result["call"] = call(server.url + "/v1/completions", {"model": "mixtral-8x7b", "prompt": "Hi",
                                                                "max_tokens": 3000, "ignore_eos": True})

    thread = threading.Thread(target=unstreamed)
    thread.start()
    wait_until(lambda: metric(server.url, "scalellm_num_requests_running") == 2, timeout=10)
    signalled = server.signal(signal.SIGTERM)
    events = _events(response)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable" and "shut down" in error["message"]
    thread.join(timeout=30)
    status, _, body = result["call"]
    assert status == 503 and "shut down" in body["error"]["message"]
    assert server.process.wait(timeout=15) == 0
    assert time.monotonic() - signalled < 1 + 6  # the grace, then a few seconds at most
    assert "Traceback" not in "".join(server.log)


def test_a_second_signal_exits_at_once(start):
    server = start("--shutdown-grace-s", "120")
    response = _stream(server.url, max_tokens=3000)
    _first_event(response)
    server.signal(signal.SIGTERM)
    wait_until(lambda: call(server.url + "/health")[0] == 503, timeout=10)
    signalled = server.signal(signal.SIGINT)
    assert server.process.wait(timeout=10) == 1
    assert time.monotonic() - signalled < 5
    response.close()

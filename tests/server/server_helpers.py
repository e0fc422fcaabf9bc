"""Helpers for the server tests (polling instead of sleeping)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny-test"
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, page_size=4, num_pages=160)

def wait_until(condition, timeout: float = 20.0, interval: float = 0.02):
    """Poll ``condition`` until it is truthy; fail with its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"condition still false after {timeout} s"
            return value
        time.sleep(interval)


def kv_pages_in_use(served) -> int:
    """KV pages held by requests (0 once every request finished or was aborted)."""
    kv = served.engine.engine.kv
    return kv.num_usable_pages - kv.num_free_pages


def metric(url: str, sample_name: str, **labels) -> float:
    """One sample's value from the server's ``/metrics`` (0 when absent)."""
    with urllib.request.urlopen(url + "/metrics") as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def call(url: str, body: dict | bytes | None = None, *, method: str | None = None, headers: dict | None = None):
    """``(status, headers, JSON body or text)`` of one HTTP request; errors are returned, not raised."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, head, raw = error.code, error.headers, error.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw.decode()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServerProcess:
    """``python -m scalellm_jax.server`` on a simulated device, on a free port; its log is kept."""

    START_S = 120
    # the server's flags before the caller's (a subclass serves another model)
    BASE_FLAGS = ("--model", "mixtral-8x7b", "--simulate-device", "h200", "--max-num-seqs", "8",
                  "--max-num-batched-tokens", "256", "--max-model-len", "4096")

    def __init__(self, *flags: str):
        cmd = [sys.executable, "-m", "scalellm_jax.server", *self.BASE_FLAGS, "--port", "0",
               "--compilation-cache-dir", "", *flags]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read_log():
            for line in self.process.stdout:
                self.log.append(line)
                found = re.search(r"ready in .*: (http://[\d.]+:\d+)/v1", line)
                if found:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read_log, daemon=True)
        self._reader.start()
        if not ready.wait(self.START_S) or not self.url:
            self.process.kill()
            raise AssertionError("server did not start:\n" + "".join(self.log))

    def signal(self, sig=signal.SIGTERM) -> float:
        self.process.send_signal(sig)
        return time.monotonic()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(10)  # the log to its end

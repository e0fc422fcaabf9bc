"""The server over two processes (``jax.distributed`` on localhost, CPU, gloo): process 0 serves HTTP, process 1
follows its steps. Greedy output equals one process's on the same mesh (swaps included), a disconnect frees the
request, a clean shutdown stops both, and a lost process stops the other with a clear error.

Each launch compiles the demo model's steps in both processes (about a minute on two loaded cores), so the
cases share launches where they can.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.server.server_helpers import call, metric, wait_until

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mixtral-tiny-random-demo"
# tensor=2 within each process's two devices, experts across the processes; few pages and swap space, so four
# long requests preempt each other and the preempted KV moves to host memory (each process holds its own shards)
FLAGS = ("--tensor-parallel-size", "2", "--expert-parallel-size", "2", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "32", "--max-model-len", "256", "--decode-buckets", "4", "--token-buckets", "32",
         "--num-pages", "20", "--swap-space-gb", "0.01", "--compilation-cache-dir", "")
PROMPTS = ["Hello there, how are", "The capital of France is", "One two three four", "Write a poem about the sea"]
START_S, EXIT_S = 300, 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerGroup:
    """``python -m scalellm_jax.server`` as ``num_processes`` processes of ``devices`` CPU devices each; process 0's
    URL once it is ready. Logs are kept per process."""

    def __init__(self, num_processes: int, devices: int, *flags: str):
        coordinator = f"127.0.0.1:{free_port()}"
        self.logs: list[list[str]] = []
        self.processes: list[subprocess.Popen] = []
        self.url = ""
        ready = threading.Event()
        for rank in range(num_processes):
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            if num_processes > 1:
                env.update(SCALELLM_COORDINATOR=coordinator, SCALELLM_NUM_PROCESSES=str(num_processes),
                           SCALELLM_PROCESS_ID=str(rank))
            process = subprocess.Popen([sys.executable, "-m", "scalellm_jax.server", "--port", "0", *flags], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log: list[str] = []
            threading.Thread(target=self._read, args=(process, log, ready if rank == 0 else None), daemon=True).start()
            self.processes.append(process)
            self.logs.append(log)
        if not ready.wait(START_S) or not self.url:
            self.kill()
            raise AssertionError(f"the server did not start:\n{self.log_text()}")

    def _read(self, process: subprocess.Popen, log: list[str], ready: threading.Event | None) -> None:
        for line in process.stdout:
            log.append(line)
            found = re.search(r"ready in .*: (http://[\d.]+:\d+)/v1", line)
            if found and ready is not None:
                self.url = found.group(1)
                ready.set()
        if ready is not None:
            ready.set()  # exited before ready

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def wait(self, rank: int, timeout: float = EXIT_S) -> int:
        try:
            return self.processes[rank].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process {rank} still runs after {timeout} s:\n{self.log_text()}") from None

    def log_text(self) -> str:
        return "\n".join(f"--- process {rank}:\n{''.join(log[-40:])}" for rank, log in enumerate(self.logs))

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def group_factory():
    groups: list[ServerGroup] = []

    def start(num_processes: int, devices: int, *flags: str) -> ServerGroup:
        groups.append(ServerGroup(num_processes, devices, *flags))
        return groups[-1]

    yield start
    for group in groups:
        group.kill()


def greedy_answers(group: ServerGroup) -> dict:
    """Greedy completions of ``PROMPTS``, four at once (they preempt each other), plus one streamed."""
    client = group.client()

    def complete(prompt: str) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=90, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = dict(zip(PROMPTS, pool.map(complete, PROMPTS), strict=True))
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=16, temperature=0, stream=True)
    answers["chat"] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return answers


def disconnect_mid_stream(group: ServerGroup) -> None:
    """Read a few tokens of a long stream, then drop the connection: the server aborts the request."""
    stream = group.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                               stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_until(lambda: metric(group.url, "scalellm_kv_cache_pages_in_use") == 0
               and metric(group.url, "scalellm_num_requests_running") == 0, timeout=30)


@pytest.mark.slow
def test_two_processes_serve_what_one_serves_and_shut_down_together(group_factory):
    one = group_factory(1, 4, *FLAGS)  # the same mesh (expert=2, tensor=2) in one process
    expected = greedy_answers(one)
    one.kill()

    two = group_factory(2, 2, *FLAGS)
    assert greedy_answers(two) == expected
    assert metric(two.url, "scalellm_num_preemptions_total") > 0  # the case covers preemption
    disconnect_mid_stream(two)
    assert greedy_answers(two) == expected  # nothing of the aborted request lingers on either process
    assert call(two.url + "/health")[0] == 200

    two.processes[0].send_signal(signal.SIGTERM)  # a clean shutdown of process 0 releases process 1
    assert two.wait(0) == 0 and two.wait(1) == 0, two.log_text()
    summary = re.search(r"process 0 closed the engine after (\d+) steps \((\d+) swap-outs, (\d+) swap-ins\)",
                        "".join(two.logs[1]))
    assert summary, two.log_text()
    steps, swap_outs, swap_ins = map(int, summary.groups())
    assert steps > 0 and swap_outs > 0 and swap_ins > 0  # preempted KV went to host memory and back, on both


@pytest.mark.slow
def test_a_killed_follower_stops_the_leader_at_once(group_factory):
    two = group_factory(2, 2, *FLAGS)
    killed = time.monotonic()
    two.processes[1].kill()
    assert two.wait(0) == 1  # idle: its next keepalive finds the follower gone
    assert time.monotonic() - killed < 15
    log = "".join(two.logs[0])
    assert "error: the engine failed (lost another process of this engine" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_killed_leader_stops_the_follower(group_factory):
    two = group_factory(2, 2, *FLAGS)
    two.processes[0].kill()
    assert two.wait(1) == 1
    log = "".join(two.logs[1])
    assert "error: process 1: lost another process of this engine" in log
    assert "Traceback" not in log


def test_a_simulated_device_spans_processes_as_a_real_one_does(group_factory):
    """Two processes on simulated H200s with tensor=2 across them (what ``benchmarks.scale_out`` measures):
    process 0 sends every step over the real lockstep channel, process 1 runs each one."""
    two = group_factory(2, 1, "--simulate-device", "h200", "--tensor-parallel-size", "2", "--max-num-seqs", "8")
    completion = two.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12)
    assert completion.usage.completion_tokens == 12  # a simulated answer has no EOS unless a workload gives one
    two.processes[0].send_signal(signal.SIGTERM)
    assert two.wait(0) == 0 and two.wait(1) == 0, two.log_text()
    assert "tp=2, ep=1 over 2 hosts" in "".join(two.logs[0]), two.log_text()
    steps = re.search(r"process 0 closed the engine after (\d+) steps", "".join(two.logs[1]))
    assert steps and int(steps.group(1)) >= 12, two.log_text()  # a prefill and a decode step per further token

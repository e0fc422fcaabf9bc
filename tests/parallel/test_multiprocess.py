"""Two processes joined by ``jax.distributed`` (CPU, gloo collectives) give the single-process logits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scalellm_jax.config import ConfigError
from scalellm_jax.distributed import DistributedConfig

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ROOT = Path(__file__).resolve().parents[2]
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
TIMEOUT_S = 240
# the offline engine's options in the multi-process case: few step shapes to compile
LLM_OPTIONS = dict(page_size=4, num_pages=32, max_num_seqs=4, max_num_batched_tokens=16, decode_buckets=[4],
                   token_buckets=[16])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 2500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def run_workers(spec: dict, out: Path) -> None:
    """Launch the workers on ``spec``, wait for all of them (bounded), fail with their stderr tails."""
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(spec))
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    try:
        for rank in range(NUM_PROCESSES):
            env = dict(
                os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
                SCALELLM_COORDINATOR=coordinator, SCALELLM_NUM_PROCESSES=str(NUM_PROCESSES),
                SCALELLM_PROCESS_ID=str(rank),
            )
            with open(out / f"stderr-{rank}.txt", "w") as err:
                procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out / "spec.json"), str(out)],
                                              env=env, stdout=subprocess.DEVNULL, stderr=err))
        deadline = time.monotonic() + TIMEOUT_S
        # A failed worker leaves the others waiting on the coordinator: stop at the first failure.
        while time.monotonic() < deadline:
            running = [p for p in procs if p.poll() is None]
            if not running or any(p.returncode for p in procs):
                break
            try:
                running[0].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * NUM_PROCESSES:
        logs = "\n".join(f"--- worker {r} (exit {c}) stderr tail:\n{tail(out / f'stderr-{r}.txt')}"
                         for r, c in enumerate(codes))
        pytest.fail(f"workers exited {codes} (negative: killed after {TIMEOUT_S} s or a peer failed)\n{logs}")


@pytest.mark.slow
def test_two_process_sharded_model_equals_single_process(make_hf_mixtral, tmp_path):
    """One launch, two meshes over 2 processes × 2 CPU devices:
    ``tp4``: tensor=4 spans both processes (HF checkpoint, also via ``Model.sharded``);
    ``ep2_tp2``: experts across the processes, tensor within each (converted checkpoint, also ``generate`` and
    the offline ``LLM`` engine, process 0 leading).
    """
    import scalellm_jax
    from checkpoints_tools.convert import convert_checkpoint

    hf, _ = make_hf_mixtral(num_key_value_heads=4)  # 4 heads, 4 kv heads, 4 experts, intermediate 48
    converted = convert_checkpoint(hf, tmp_path / "converted", "float32", progress=False)
    tokens = np.random.default_rng(0).integers(0, 96, (3, 9))
    prompts = [row[: 2 + i].tolist() for i, row in enumerate(tokens)]  # ragged: 2, 3, 4 tokens
    single = scalellm_jax.load(hf, dtype="float32")
    expected = np.asarray(single.logits(tokens))
    cases = [
        dict(name="tp4", folder=str(hf), ep=1, tp=4, resharded=True, generate=False, llm=False),
        dict(name="ep2_tp2", folder=str(converted), ep=2, tp=2, resharded=False, generate=True, llm=True),
    ]
    out = tmp_path / "out"
    run_workers({"tokens": tokens.tolist(), "prompts": prompts, "cases": cases, "llm_options": LLM_OPTIONS}, out)
    llm = scalellm_jax.LLM(single, **LLM_OPTIONS)
    expected_llm = [o.token_ids for o in llm.generate(
        prompt_token_ids=prompts, sampling_params=scalellm_jax.SamplingParams(max_tokens=6, temperature=0))]

    scale = np.abs(expected).max()
    expected_generated = scalellm_jax.generate(single, prompts, max_new_tokens=4)
    for case in cases:
        name, ep, tp = case["name"], case["ep"], case["tp"]
        for rank in range(NUM_PROCESSES):
            for kind in ("logits", "resharded") if case["resharded"] else ("logits",):
                got = np.load(out / f"{name}-{kind}-{rank}.npy")
                assert got.shape == expected.shape
                assert np.abs(got - expected).max() / scale < 1e-5, (name, kind, rank)
            report = json.loads((out / f"{name}-report-{rank}.json").read_text())
            assert report["process_index"] == rank
            assert report["process_count"] == NUM_PROCESSES
            assert report["device_count"] == NUM_PROCESSES * LOCAL_DEVICES
            assert report["local_device_count"] == LOCAL_DEVICES
            assert report["mesh_shape"] == {"expert": ep, "tensor": tp}
            # Devices are ordered process by process and tensor is the inner axis: it spans both
            # processes only when it is wider than one process's devices; experts split across them.
            assert report["mesh_process_grid"] == {"tp4": [[0, 0, 1, 1]], "ep2_tp2": [[0, 0], [1, 1]]}[name]
            # Each process holds only its own devices' shards: heads over tensor, experts over expert.
            assert report["wq_local_shards"] == [[32, 4 // tp, 8]] * LOCAL_DEVICES
            assert report["w_gate_local_shards"] == [[4 // ep, 32, 48 // tp]] * LOCAL_DEVICES
            if case["generate"]:
                assert report["generated"] == expected_generated
            if case["llm"] and rank == 0:
                assert report["llm_generated"] == expected_llm
            elif case["llm"]:
                assert report["llm_steps_followed"] >= 6  # every step ran on the follower too


def test_mesh_must_include_every_process():
    from types import SimpleNamespace

    from scalellm_jax.parallel import ParallelConfig, build_mesh

    devices = [SimpleNamespace(process_index=p) for p in (0, 0, 1, 1)]  # 2 processes × 2 devices
    with pytest.raises(ConfigError, match=r"leaves process\(es\) \[1\] out of the mesh"):
        build_mesh(ParallelConfig(tensor_parallel_size=2), devices)


def test_distributed_config_from_env():
    assert DistributedConfig.from_env({}) is None
    assert DistributedConfig.from_env({"SCALELLM_COORDINATOR": "auto"}) == DistributedConfig("auto")
    env = {"SCALELLM_COORDINATOR": "10.0.0.1:1234", "SCALELLM_NUM_PROCESSES": "4", "SCALELLM_PROCESS_ID": "3"}
    assert DistributedConfig.from_env(env) == DistributedConfig("10.0.0.1:1234", 4, 3)


@pytest.mark.parametrize("env, message", [
    ({"SCALELLM_COORDINATOR": "10.0.0.1"}, "host:port"),
    ({"SCALELLM_COORDINATOR": "h:1", "SCALELLM_PROCESS_ID": "0"}, "SCALELLM_NUM_PROCESSES must be set"),
    ({"SCALELLM_COORDINATOR": "h:1", "SCALELLM_NUM_PROCESSES": "two", "SCALELLM_PROCESS_ID": "0"}, "integer"),
    ({"SCALELLM_COORDINATOR": "h:1", "SCALELLM_NUM_PROCESSES": "2", "SCALELLM_PROCESS_ID": "2"}, "below"),
    ({"SCALELLM_COORDINATOR": "h:1", "SCALELLM_NUM_PROCESSES": "2", "SCALELLM_PROCESS_ID": "-1"}, "at least 0"),
])
def test_distributed_config_rejects_bad_env(env, message):
    with pytest.raises(ConfigError, match=message):
        DistributedConfig.from_env(env)

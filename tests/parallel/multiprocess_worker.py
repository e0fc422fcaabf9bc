"""One of several processes of a multi-process (``jax.distributed``) sharded forward.

Usage: python tests/parallel/multiprocess_worker.py SPEC.json OUT_DIR
with SCALELLM_COORDINATOR / SCALELLM_NUM_PROCESSES / SCALELLM_PROCESS_ID set (see
``scalellm_jax.distributed``) and XLA_FLAGS giving each process its local CPU devices.

SPEC: ``{"tokens": [[...]], "prompts": [[...]], "cases": [{"name", "folder", "ep", "tp",
"resharded", "generate", "llm"}]}``. Per case every process loads the checkpoint onto the global
(expert, tensor) mesh and runs the same forward; with ``resharded`` also through
``Model.sharded`` (params loaded on this process's first device, then spread over the mesh);
with ``generate`` also a greedy ``generate``; with ``llm`` also the offline engine over the processes
(``LLM`` built on every process: process 0 generates and closes, the others follow). Logits are
gathered to every host. Each process writes OUT_DIR/<name>-logits-<rank>.npy (and -resharded-) and
OUT_DIR/<name>-report-<rank>.json.
Several cases share one launch because process start-up and ``initialize`` dominate the cost.
"""

import json
import sys
from pathlib import Path

from scalellm_jax import distributed


def main() -> None:
    if not distributed.initialize_from_env(timeout_s=60):
        sys.exit("SCALELLM_COORDINATOR is not set")
    # Imported after initialize: nothing may touch a JAX backend before it.
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import scalellm_jax
    from scalellm_jax.parallel import ParallelConfig

    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    tokens = np.asarray(spec["tokens"])
    rank = jax.process_index()

    def gathered(logits) -> np.ndarray:  # the vocabulary is split over tensor: no process holds all of it
        return np.asarray(multihost_utils.process_allgather(logits, tiled=True))

    for case in spec["cases"]:
        name, folder = case["name"], case["folder"]
        parallel = ParallelConfig(tensor_parallel_size=case["tp"], expert_parallel_size=case["ep"])
        model = scalellm_jax.load(folder, dtype="float32", parallel=parallel)
        np.save(out / f"{name}-logits-{rank}.npy", gathered(model.logits(tokens)))
        if case["resharded"]:
            resharded = scalellm_jax.load(folder, dtype="float32").sharded(parallel)
            np.save(out / f"{name}-resharded-{rank}.npy", gathered(resharded.logits(tokens)))
        wq = model.params["layers_0"]["attn"]["wq"]
        w_gate = model.params["layers_0"]["moe"]["w_gate"]
        report = {
            "process_index": rank,
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "mesh_shape": dict(model.mesh.shape),
            "mesh_process_grid": [[d.process_index for d in row] for row in model.mesh.devices],
            "wq_local_shards": [list(s.data.shape) for s in wq.addressable_shards],
            "w_gate_local_shards": [list(s.data.shape) for s in w_gate.addressable_shards],
        }
        if case["generate"]:
            report["generated"] = scalellm_jax.generate(model, spec["prompts"], max_new_tokens=4)
        if case["llm"]:
            from scalellm_jax import LLM, SamplingParams

            llm = LLM(model, **spec["llm_options"])  # every process; the warmup runs on all of them
            if rank == 0:
                try:
                    outputs = llm.generate(prompt_token_ids=spec["prompts"],
                                           sampling_params=SamplingParams(max_tokens=6, temperature=0))
                    report["llm_generated"] = [o.token_ids for o in outputs]
                finally:  # releases the followers even when this process fails (else they wait for it)
                    llm.engine.close()
            else:
                report["llm_steps_followed"] = llm.engine.follow()
        (out / f"{name}-report-{rank}.json").write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""The scheduler simulator: the real scheduler, policies and KV manager replayed on a virtual clock.

    python -m benchmarks.simulator --help                 # the simulator (scheduler_sim)
    python -m benchmarks.simulator.engine_check --help    # the real engine against the simulator's forecast

- ``scheduler_sim``: the CLI: workload, step costs, the sweep over policies and loads, the SLO analysis.
- ``workload``: the simulator's requests from the shared workload files (``scalellm_jax.workloads``):
  train/replay split, synthetic and predicted lengths, arrival streams.
- ``replay``: the scheduler stepped on a virtual clock, and its latency summary.
- ``calibration``: step times measured on this CPU (the CPU-calibrated regime).
- ``device``: step times from ``device_models``' cost model (a modelled GPU).
- ``engine_check``: the real engine on the same streams, to check the simulator's forecast.
"""

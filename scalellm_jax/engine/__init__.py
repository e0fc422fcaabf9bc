"""The serving engine: scheduler, KV manager, runner, sampling and the step loop."""

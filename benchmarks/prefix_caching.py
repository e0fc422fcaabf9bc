"""Prefix caching on against off, side by side: ``python -m benchmarks.prefix_caching`` (JSON to benchmarks/runs/).

    python -m benchmarks.prefix_caching                          # CPU: the bench "medium" model
    python -m benchmarks.prefix_caching --simulate-device h200   # the GPU regime, simulated (Mixtral-8x7B)

Two chat workloads, built with Mixtral's chat template from AlpacaEval instructions (``../shared/data``):

- ``system-prompt``: every request is one shared system prompt of ``--system-tokens`` tokens (example
  questions and answers from the data) followed by a different short question; ``--concurrency``
  clients in closed loops send ``--num-prompts`` of them.
- ``multi-turn``: ``--conversations`` conversations at once, each of ``--turns`` turns; every turn
  re-sends the whole conversation so far: the earlier prompts, the answers the engine generated (their
  token ids, as a client re-sending the model's text gets back when it re-tokenizes the same) and the
  next question.

Each request asks for as many tokens as Mixtral-8x7B-Instruct's real answer had, capped by ``--max-tokens``,
with ``ignore_eos``. The two engines share the model, weights and options; only
``enable_prefix_caching`` differs. Both run in this process behind ``AsyncEngine`` (what the server
drives; HTTP adds the same to both), alternating which goes first over ``--repeats``; each repeat
puts a different first line in every prompt, so no run starts with an earlier run's pages cached.

Reported per workload and engine: TTFT, end-to-end latency, output tokens/s and requests/s, prompt
tokens, the prefix cache's hit rate; then the paired ratios (TTFT p50 and p99 off/on, throughput on/off)
per repeat and their median. ``--simulate-device`` runs the real engine on a simulated GPU (every
step sleeps the device cost model's time and returns random tokens; see ``simulated_device``): the
result says so.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import pathlib
import shlex
import statistics
import sys
import tempfile

from benchmarks.engine_flags import add_engine_flags, resolve_engine_flags, served_device
from benchmarks.provenance import cpu_description, git_state, write_result
from benchmarks.random_checkpoint import write_bench_model
from benchmarks.serving import Result, engine_request, run_closed, summarize
from benchmarks.workload_files import ALPACA_EVAL
from scalellm_jax.workloads import TextRow, answer_len, read_rows

CPU_ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=4096)
SIMULATED_ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=8192)
CPU_DEFAULTS = dict(num_prompts=64, concurrency=16, conversations=8, turns=4)
SIMULATED_DEFAULTS = dict(num_prompts=512, concurrency=128, conversations=64, turns=6)
EXAMPLE_ROWS = 100  # the data's last rows: the system prompt's examples, never asked as questions


@dataclasses.dataclass
class Turn:
    """One request: its token ids and output length (``prompt_ids`` is all the workload ``Work`` needs)."""

    prompt_ids: list[int]
    max_tokens: int


class Chat:
    """Mixtral's chat template at the token level (a turn's ids extend the previous turn's, as the
    template makes them: ``<s>[INST] q1 [/INST] a1</s>[INST] q2 [/INST]``)."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def answer_tokens(self, row: TextRow) -> int:
        return min(answer_len(self.tokenizer, row.output), self.max_tokens)

    def first(self, question: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages)

    def next(self, conversation: list[int], answer: list[int], question: str) -> list[int]:
        user = self.tokenizer.apply_chat_template([{"role": "user", "content": question}])[1:]  # without BOS
        return conversation + answer + [self.tokenizer.eos_id] + user


def system_prompt(tokenizer, rows: list[TextRow], num_tokens: int, session: int) -> str:
    """A system prompt of about ``num_tokens`` tokens: instructions, then example answers from the data."""
    text = (f"Session {session}. You are a helpful assistant. Answer the user's question accurately and "
            "concisely, in the style of these examples.\n")
    for row in rows:
        example = f"\nQuestion: {row.instruction}\nAnswer: {row.output}\n"
        if len(tokenizer.encode(text + example, add_bos=False)) > num_tokens:
            words = example.split(" ")
            while words and len(tokenizer.encode(text + " ".join(words), add_bos=False)) > num_tokens:
                words = words[: len(words) * 9 // 10]
            return text + " ".join(words)
        text += example
    return text


def system_prompt_workload(chat: Chat, rows: list[TextRow], args, session: int) -> list[Turn]:
    questions = rows[: len(rows) - EXAMPLE_ROWS]
    system = system_prompt(chat.tokenizer, rows[len(rows) - EXAMPLE_ROWS:], args.system_tokens, session)
    return [Turn(chat.first(row.instruction, system), chat.answer_tokens(row))
            for row in (questions[i % len(questions)] for i in range(args.num_prompts))]


async def run_conversations(engine, chat: Chat, rows: list[TextRow], args, session: int) -> tuple[list[Result], float]:
    """``--conversations`` clients at once, each sending its turns one after another."""
    loop = asyncio.get_running_loop()
    results: list[Result] = []

    async def converse(c: int):
        turns = [rows[(c * args.turns + t) % len(rows)] for t in range(args.turns)]
        ids = chat.first(f"(conversation {c}, session {session}) {turns[0].instruction}")
        for t, row in enumerate(turns):
            result = await engine_request(engine, Turn(ids, chat.answer_tokens(row)))
            results.append(result)
            if not result.ok or t + 1 == len(turns):
                return
            ids = chat.next(ids, result.token_ids, turns[t + 1].instruction)

    start = loop.time()
    await asyncio.gather(*(converse(c) for c in range(args.conversations)))
    return results, loop.time() - start


async def measure(engines: dict, chat: Chat, rows: list[TextRow], args) -> list[dict]:
    runs = []
    names = list(engines)
    for workload in args.workloads:
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                served = engines[name]
                before = served.engine.engine.stats()
                session = repeat + 1  # session 0 was the warm-up's
                if workload == "system-prompt":
                    work = system_prompt_workload(chat, rows, args, session)
                    results, duration = await run_closed(lambda w, s=served: engine_request(s.engine, w),
                                                         work, args.concurrency)
                else:
                    results, duration = await run_conversations(served.engine, chat, rows, args, session)
                after = served.engine.engine.stats()
                summary = summarize(results, duration, slo_ttft_ms=float("inf"), slo_tpot_ms=float("inf"))
                queries = after.prefix_cache_queries - before.prefix_cache_queries
                hits = after.prefix_cache_hits - before.prefix_cache_hits
                summary.update(prompt_tokens=sum(r.prompt_tokens for r in results),
                               prefix_cache_hit_rate=hits / queries if queries else 0.0)
                print(f"{workload:>13} {name:>14} repeat {repeat}: TTFT p50 {summary['ttft_ms']['p50']:8.1f} ms "
                      f"p99 {summary['ttft_ms']['p99']:8.1f} ms, {summary['output_tokens_per_s']:8.1f} tok/s, "
                      f"{summary['request_throughput']:6.2f} req/s, hit rate {summary['prefix_cache_hit_rate']:.2f}"
                      f", {summary['failed']} failed", flush=True)
                runs.append({"workload": workload, "engine": name, "repeat": repeat, "summary": summary})
    return runs


def paired_report(runs: list[dict]) -> dict:
    """Per workload: off/on TTFT and on/off throughput ratios of each repeat (both engines ran back to
    back, so drift between repeats cancels), their median, and each engine's median figures."""
    report = {}
    for workload in sorted({r["workload"] for r in runs}):
        by = {(r["engine"], r["repeat"]): r["summary"] for r in runs if r["workload"] == workload}
        repeats = sorted({rep for _, rep in by})
        pairs = [(by["caching-on", rep], by["caching-off", rep]) for rep in repeats]
        ratio = {
            "ttft_p50_off_over_on": [off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"] for on, off in pairs],
            "ttft_p99_off_over_on": [off["ttft_ms"]["p99"] / on["ttft_ms"]["p99"] for on, off in pairs],
            "throughput_on_over_off": [on["output_tokens_per_s"] / off["output_tokens_per_s"] for on, off in pairs],
        }

        def median(engine, key, by=by, repeats=repeats):
            return statistics.median(key(by[engine, rep]) for rep in repeats)

        report[workload] = {
            **{f"median_{k}": statistics.median(v) for k, v in ratio.items()},
            "paired": ratio,
            **{f"{e}_median": {"ttft_p50_ms": median(e, lambda s: s["ttft_ms"]["p50"]),
                               "ttft_p99_ms": median(e, lambda s: s["ttft_ms"]["p99"]),
                               "output_tokens_per_s": median(e, lambda s: s["output_tokens_per_s"]),
                               "request_throughput": median(e, lambda s: s["request_throughput"]),
                               "prefix_cache_hit_rate": median(e, lambda s: s["prefix_cache_hit_rate"])}
               for e in ("caching-on", "caching-off")},
        }
    return report


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefix_caching", description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="system-prompt,multi-turn",
                   help="comma-separated: system-prompt, multi-turn")
    p.add_argument("--system-tokens", type=int, default=1000, help="the shared system prompt's length")
    p.add_argument("--num-prompts", type=int, default=None, help="system-prompt requests per run "
                   f"(default {CPU_DEFAULTS['num_prompts']}; simulated {SIMULATED_DEFAULTS['num_prompts']})")
    p.add_argument("--concurrency", type=int, default=None, help="system-prompt clients "
                   f"(default {CPU_DEFAULTS['concurrency']}; simulated {SIMULATED_DEFAULTS['concurrency']})")
    p.add_argument("--conversations", type=int, default=None, help="multi-turn conversations at once "
                   f"(default {CPU_DEFAULTS['conversations']}; simulated {SIMULATED_DEFAULTS['conversations']})")
    p.add_argument("--turns", type=int, default=None, help="turns per conversation "
                   f"(default {CPU_DEFAULTS['turns']}; simulated {SIMULATED_DEFAULTS['turns']})")
    p.add_argument("--max-tokens", type=int, default=64, help="cap on each answer's length")
    p.add_argument("--repeats", type=int, default=3, help="runs per workload and engine (alternating)")
    p.add_argument("--model", default="bench:medium",
                   help="bench:medium / bench:tiny (random weights), a preset or a checkpoint folder "
                   "(default with --simulate-device: mixtral-8x7b)")
    add_engine_flags(p, CPU_ENGINE, SIMULATED_ENGINE)
    p.add_argument("--dataset", type=pathlib.Path, default=ALPACA_EVAL)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in ("system-prompt", "multi-turn")]
    if unknown or not args.workloads:
        p.error(f"--workloads: unknown {unknown or args.workloads!r}; choose system-prompt, multi-turn")
    simulated = resolve_engine_flags(p, args, CPU_ENGINE, SIMULATED_ENGINE)
    if simulated and args.model == "bench:medium":
        args.model = "mixtral-8x7b"
    for name, value in (SIMULATED_DEFAULTS if simulated else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("system_tokens", "num_prompts", "concurrency", "conversations", "turns", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.dataset.is_file():
        p.error(f"--dataset: {args.dataset} not found")
    return args


async def _run(args, rows, folder: str) -> tuple[dict, list[dict]]:

    from scalellm_jax.server.loading import build_served_model

    model = args.model
    if model.startswith("bench:"):
        model = str(write_bench_model(model.removeprefix("bench:"), folder))
    engines = {name: build_served_model("bench", model, dtype=args.dtype, simulate_device=args.simulate_device,
                                        enable_prefix_caching=on, **args.engine_options)
               for name, on in (("caching-on", True), ("caching-off", False))}
    chat = Chat(engines["caching-on"].tokenizer, args.max_tokens)
    device, simulated = served_device(engines["caching-on"])
    setup = {"model": args.model, "dtype": args.dtype, "engine_options": args.engine_options, "device": device}
    if simulated is not None:
        setup["simulated_device"] = simulated
    try:
        for served in engines.values():  # first-use paths, with a session no run uses
            warm = Chat(served.tokenizer, 4)
            await run_closed(lambda w, s=served: engine_request(s.engine, w),
                             [Turn(warm.first(r.instruction, "Session 0."), 4) for r in rows[:4]], 4)
        return setup, await measure(engines, chat, rows, args)
    finally:
        for served in engines.values():
            served.engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    rows = read_rows(args.dataset)  # each row's text, also as the system prompt's examples
    with tempfile.TemporaryDirectory(prefix="prefix-caching-bench-") as folder:
        setup, runs = asyncio.run(_run(args, rows, folder))
    report = paired_report(runs)
    for workload, r in report.items():
        print(f"{workload}: TTFT p50 off/on {r['median_ttft_p50_off_over_on']:.2f}x "
              f"(paired {', '.join(f'{x:.2f}' for x in r['paired']['ttft_p50_off_over_on'])}), "
              f"p99 {r['median_ttft_p99_off_over_on']:.2f}x, throughput on/off "
              f"{r['median_throughput_on_over_off']:.2f}x "
              f"(paired {', '.join(f'{x:.2f}' for x in r['paired']['throughput_on_over_off'])})")
    result = {
        "benchmark": "prefix_caching", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_state(), "command": "python -m benchmarks.prefix_caching " + shlex.join(raw_argv),
        "host": cpu_description(), "setup": setup,
        "workload": {k: getattr(args, k) for k in ("workloads", "system_tokens", "num_prompts", "concurrency",
                                                   "conversations", "turns", "max_tokens", "repeats")}
        | {"dataset": str(args.dataset)},
        "report": report, "runs": runs,
    }
    write_result("prefix_caching" + ("-simulated" if args.simulate_device else ""), result, args.out)
    return 0 if all(r["summary"]["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

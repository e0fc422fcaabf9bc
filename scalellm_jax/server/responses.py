"""OpenAI response bodies: whole responses (through the pydantic models) and Server-Sent Event chunks.

Chunks are the hot path (one per choice per engine step), so they are written as JSON by hand
around a precomputed prefix rather than through pydantic; ``protocol.ChatCompletionChunk`` and
``protocol.CompletionResponse`` describe them and the tests hold the two together.
"""

from __future__ import annotations

import json

from scalellm_jax.server import protocol
from scalellm_jax.server.job import Choice, Job
from scalellm_jax.tokenizer import Tokenizer

DONE = b"data: [DONE]\n\n"
_json_str = json.JSONEncoder(ensure_ascii=False).encode
_FINISH_JSON = {None: "null", "stop": '"stop"', "length": '"length"'}
_PLAIN = {  # (chat, first chunk of its choice) → one choice without logprobs
    (False, False): '{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}',
    (False, True): '{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}',  # same: no role in completions
    (True, False): '{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":%s}',
    (True, True): '{"index":%d,"delta":{"role":"assistant","content":%s},"logprobs":null,"finish_reason":%s}',
}
FINISH_REASONS = ("stop", "length")  # the others ("abort", "error") never reach a client as a success


def usage(job: Job, choices: list[Choice]) -> protocol.Usage:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them, and so do their cached
    tokens (as the prompt's first choice with output found them); choices with no output yet (mid-stream)
    count nothing."""
    per_prompt: dict[int, tuple[int, int]] = {}
    for (p, _), c in zip(job.choices, choices, strict=True):
        if c.output is not None and p not in per_prompt:
            per_prompt[p] = (len(c.output.prompt_token_ids), c.output.num_cached_tokens)
    prompt = sum(n for n, _ in per_prompt.values())
    completion = sum(len(c.output.token_ids) for c in choices if c.output is not None)
    return protocol.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                          prompt_tokens_details=protocol.PromptTokensDetails(
                              cached_tokens=sum(cached for _, cached in per_prompt.values())))


def full_response(job: Job, choices: list[Choice], tokenizer: Tokenizer) -> str:
    """The non-streaming response body (JSON)."""
    if job.chat:
        return protocol.ChatCompletionResponse(
            id=job.request_id, created=job.created, model=job.model, usage=usage(job, choices),
            choices=[protocol.ChatChoice(index=c.index, message=protocol.AssistantMessage(content=c.output.text),
                                         logprobs=_chat_logprobs(c, 0, tokenizer) if job.logprobs else None,
                                         prompt_logprobs=_prompt_logprobs(job, c, tokenizer),
                                         finish_reason=c.output.finish_reason) for c in choices],
        ).model_dump_json()
    return protocol.CompletionResponse(
        id=job.request_id, created=job.created, model=job.model, usage=usage(job, choices),
        choices=[protocol.CompletionChoice(index=c.index, text=_echoed(job, c, tokenizer) + c.output.text,
                                           logprobs=_completion_logprobs(job, c, 0, 0, tokenizer, job.echo)
                                           if job.logprobs else None,
                                           prompt_logprobs=_prompt_logprobs(job, c, tokenizer),
                                           finish_reason=c.output.finish_reason) for c in choices],
    ).model_dump_json()


class ChunkEncoder:
    """``data: {...}\\n\\n`` events for one streamed request."""

    def __init__(self, job: Job, tokenizer: Tokenizer, choices: list[Choice]):
        self._job = job
        self._tokenizer = tokenizer
        self._choices = choices
        self._continuous_usage = job.include_usage and job.continuous_usage  # as vLLM: only with include_usage
        self._echo_length: dict[int, int] = {}  # choice index -> length of its echoed prompt text
        head = json.dumps({"id": job.request_id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                           "created": job.created, "model": job.model}, separators=(",", ":"))
        self._prefix = ("data: " + head[:-1] + ',"choices":[').encode()
        self._suffix = b'],"usage":null}\n\n' if job.include_usage else b"]}\n\n"

    def chunk(self, choice: Choice, text: str) -> bytes | None:
        """The event for what ``choice`` gained since the last one (``text``: its delta's new text, already
        folded into ``choice.output``), or None when nothing is new."""
        out = choice.output
        text_start, token_start = choice.text_sent, choice.tokens_sent
        if not text and not out.finished:
            return None  # e.g. tokens held back for a possible stop string: send them with the next text
        choice.text_sent, choice.tokens_sent = text_start + len(text), out.num_tokens
        finish = out.finish_reason if out.finished and out.finish_reason in FINISH_REASONS else None
        first = text_start == 0 and token_start == 0
        job = self._job
        echo = _echoed(job, choice, self._tokenizer) if first and job.echo else ""
        if echo:
            self._echo_length[choice.index] = len(echo)
        if not job.logprobs and (job.prompt_logprobs is None or not first):
            # the hot path: string formatting, ~10x faster than json.dumps(dict)
            body = _PLAIN[job.chat, first] % (choice.index, _json_str(echo + text), _FINISH_JSON[finish])
        else:
            fields: dict = {"index": choice.index}
            if job.chat:
                fields["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
                logprobs = _chat_logprobs(choice, token_start, self._tokenizer) if job.logprobs else None
            else:
                fields["text"] = echo + text
                offset = text_start + (0 if first else self._echo_length.get(choice.index, 0))
                logprobs = (_completion_logprobs(job, choice, token_start, offset, self._tokenizer,
                                                 first and job.echo) if job.logprobs else None)
            fields["logprobs"] = logprobs.model_dump() if logprobs is not None else None
            if first and job.prompt_logprobs is not None:
                fields["prompt_logprobs"] = [None if e is None else {k: v.model_dump() for k, v in e.items()}
                                             for e in _prompt_logprobs(job, choice, self._tokenizer)]
            fields["finish_reason"] = finish
            body = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        if self._continuous_usage:
            return self._prefix + body.encode() + self._usage_suffix()
        return self._prefix + body.encode() + self._suffix

    def _usage_suffix(self) -> bytes:
        return b'],"usage":' + usage(self._job, self._choices).model_dump_json().encode() + b"}\n\n"

    def usage(self) -> bytes:
        """The last event before ``[DONE]`` with ``stream_options.include_usage``: no choices, the counts."""
        return self._prefix + self._usage_suffix()


def _echoed(job: Job, choice: Choice, tokenizer: Tokenizer) -> str:
    """The prompt text a completion with ``echo`` starts with: as sent, or the token ids' text."""
    if not job.echo:
        return ""
    text = job.prompt_texts[job.choices[choice.index][0]] if job.prompt_texts else None
    return text if text is not None else tokenizer.decode(choice.output.prompt_token_ids)


def _top(token: int, logprob: float, alternatives, tokenizer: Tokenizer) -> dict[str, float]:
    """OpenAI's ``top_logprobs`` entry: the most likely tokens' texts → logprobs, and the chosen token (vLLM)."""
    top = {tokenizer.decode([t]): lp for t, lp in alternatives or ()}
    top.setdefault(tokenizer.decode([token]), logprob)
    return top


def _completion_logprobs(job: Job, choice: Choice, start: int, text_offset: int, tokenizer: Tokenizer,
                         with_prompt: bool) -> protocol.CompletionLogprobs:
    """Completions' logprobs for the output tokens from ``start`` (text starting at ``text_offset``), after the
    prompt's own (the first null) when ``with_prompt`` (echo)."""
    out = choice.output
    ids, logprobs, tops = [], [], []
    if with_prompt:
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        for token, entry in zip(out.prompt_token_ids, entries, strict=True):
            ids.append(token)
            logprobs.append(None if entry is None else entry[0])
            tops.append(None if entry is None else _top(token, entry[0], entry[1][:job.top_logprobs], tokenizer))
    end = len(out.token_ids)
    alternatives = out.top_logprobs[start:end] if out.top_logprobs is not None else [()] * (end - start)
    for token, lp, alt in zip(out.token_ids[start:end], out.logprobs[start:end], alternatives, strict=True):
        ids.append(token)
        logprobs.append(lp)
        tops.append(_top(token, lp, alt, tokenizer))
    tokens, offsets = [tokenizer.decode([t]) for t in ids], []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return protocol.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def _chat_logprobs(choice: Choice, start: int, tokenizer: Tokenizer) -> protocol.ChoiceLogprobs:
    out = choice.output
    end = len(out.token_ids)
    alternatives = out.top_logprobs[start:end] if out.top_logprobs is not None else [()] * (end - start)
    content = []
    for token, lp, alt in zip(out.token_ids[start:end], out.logprobs[start:end], alternatives, strict=True):
        text = tokenizer.decode([token])
        top = [protocol.TopLogprob(token=s, logprob=v, bytes=list(s.encode()))
               for s, v in ((tokenizer.decode([t]), v) for t, v in alt)]
        content.append(protocol.TokenLogprob(token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=top))
    return protocol.ChoiceLogprobs(content=content)


def _prompt_logprobs(job: Job, choice: Choice, tokenizer: Tokenizer) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt token (the first None), token id → logprob, rank, text, for the
    prompt token and the ``prompt_logprobs`` most likely."""
    if job.prompt_logprobs is None:
        return None
    out = choice.output
    result: list = []
    for token, entry in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
        if entry is None:
            result.append(None)
            continue
        logprob, alternatives = entry
        ranks = {t: rank for rank, (t, _) in enumerate(alternatives, 1)}
        here = {str(t): protocol.PromptLogprob(logprob=v, rank=rank, decoded_token=tokenizer.decode([t]))
                for rank, (t, v) in enumerate(alternatives[:job.prompt_logprobs], 1)}
        here.setdefault(str(token), protocol.PromptLogprob(logprob=logprob, rank=ranks.get(token),
                                                           decoded_token=tokenizer.decode([token])))
        result.append(here)
    return result

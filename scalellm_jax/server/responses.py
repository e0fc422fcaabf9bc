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
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them; choices with no output
    yet (mid-stream) count nothing."""
    per_prompt = {p: len(c.output.prompt_token_ids) for (p, _), c in zip(job.choices, choices, strict=True)
                  if c.output is not None}
    prompt = sum(per_prompt.values())
    completion = sum(len(c.output.token_ids) for c in choices if c.output is not None)
    return protocol.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def full_response(job: Job, choices: list[Choice], tokenizer: Tokenizer) -> str:
    """The non-streaming response body (JSON)."""
    if job.chat:
        return protocol.ChatCompletionResponse(
            id=job.request_id, created=job.created, model=job.model, usage=usage(job, choices),
            choices=[protocol.ChatChoice(index=c.index, message=protocol.AssistantMessage(content=c.output.text),
                                         logprobs=_chat_logprobs(c, 0, tokenizer) if job.logprobs else None,
                                         finish_reason=c.output.finish_reason) for c in choices],
        ).model_dump_json()
    return protocol.CompletionResponse(
        id=job.request_id, created=job.created, model=job.model, usage=usage(job, choices),
        choices=[protocol.CompletionChoice(index=c.index, text=c.output.text,
                                           logprobs=_completion_logprobs(c, 0, 0, tokenizer) if job.logprobs else None,
                                           finish_reason=c.output.finish_reason) for c in choices],
    ).model_dump_json()


class ChunkEncoder:
    """``data: {...}\\n\\n`` events for one streamed request."""

    def __init__(self, job: Job, tokenizer: Tokenizer, choices: list[Choice]):
        self._job = job
        self._tokenizer = tokenizer
        self._choices = choices
        self._continuous_usage = job.include_usage and job.continuous_usage  # as vLLM: only with include_usage
        head = json.dumps({"id": job.request_id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                           "created": job.created, "model": job.model}, separators=(",", ":"))
        self._prefix = ("data: " + head[:-1] + ',"choices":[').encode()
        self._suffix = b'],"usage":null}\n\n' if job.include_usage else b"]}\n\n"

    def chunk(self, choice: Choice) -> bytes | None:
        """The event for what ``choice`` gained since the last one, or None when nothing is new."""
        out = choice.output
        text_start, token_start = choice.text_sent, choice.tokens_sent
        text = out.text[text_start:]
        if not text and not out.finished:
            return None  # e.g. tokens held back for a possible stop string: send them with the next text
        choice.text_sent, choice.tokens_sent = len(out.text), len(out.token_ids)
        finish = out.finish_reason if out.finished and out.finish_reason in FINISH_REASONS else None
        first = text_start == 0 and token_start == 0
        if not self._job.logprobs:  # the hot path: string formatting, ~10x faster than json.dumps(dict)
            body = _PLAIN[self._job.chat, first] % (choice.index, _json_str(text), _FINISH_JSON[finish])
        elif self._job.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            logprobs = _chat_logprobs(choice, token_start, self._tokenizer)
            body = json.dumps({"index": choice.index, "delta": delta, "logprobs": logprobs.model_dump(),
                               "finish_reason": finish}, ensure_ascii=False, separators=(",", ":"))
        else:
            logprobs = _completion_logprobs(choice, token_start, text_start, self._tokenizer)
            body = json.dumps({"index": choice.index, "text": text, "logprobs": logprobs.model_dump(),
                               "finish_reason": finish}, ensure_ascii=False, separators=(",", ":"))
        if self._continuous_usage:
            return self._prefix + body.encode() + self._usage_suffix()
        return self._prefix + body.encode() + self._suffix

    def _usage_suffix(self) -> bytes:
        return b'],"usage":' + usage(self._job, self._choices).model_dump_json().encode() + b"}\n\n"

    def usage(self) -> bytes:
        """The last event before ``[DONE]`` with ``stream_options.include_usage``: no choices, the counts."""
        return self._prefix + self._usage_suffix()


def _token_texts(choice: Choice, start: int, tokenizer: Tokenizer) -> tuple[list[str], list[float]]:
    out = choice.output
    ids = out.token_ids[start:]
    return [tokenizer.decode([t]) for t in ids], list(out.logprobs[start:len(out.token_ids)])


def _completion_logprobs(choice: Choice, start: int, text_offset: int, tokenizer: Tokenizer):
    tokens, logprobs = _token_texts(choice, start, tokenizer)
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return protocol.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, text_offset=offsets)


def _chat_logprobs(choice: Choice, start: int, tokenizer: Tokenizer):
    tokens, logprobs = _token_texts(choice, start, tokenizer)
    return protocol.ChoiceLogprobs(content=[
        protocol.TokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
        for t, lp in zip(tokens, logprobs, strict=True)
    ])

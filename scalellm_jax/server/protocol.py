"""OpenAI request and response schemas (pydantic), the subset this server implements.

Requests are validated strictly (no "10" for 10) and reject unknown fields, so a client learns
at once which field was wrong instead of getting a silently different request. The response
models document the API in ``/openapi.json``; non-streaming responses are built through them.
Non-OpenAI fields, as in vLLM: ``top_k``, ``priority``, ``ignore_eos``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from scalellm_jax.engine.request import SEED_LIMIT

MAX_N = 16  # choices per request: each is a full engine request
MAX_STOP = 16

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by both endpoints (they become a ``SamplingParams`` per choice)."""

    model: str = Field(description="The served model's name, as listed by GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Output token limit (default: 16 for completions, "
                                                          "the rest of the context for chat).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="Non-OpenAI. 0 or -1: off.")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="Choice i of n uses seed + i.")
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Stop strings; the text ends right before the first one generated.")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = Field(0, ge=-(2**31), lt=2**31, description="Non-OpenAI. Lower runs first under "
                                                                "--scheduling-policy priority.")
    user: str | None = None
    ignore_eos: bool = Field(False, description="Non-OpenAI. Generate max_tokens tokens even past EOS.")


class CompletionRequest(_SamplingFields):
    prompt: NonEmptyStr | TokenIds | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_N)] | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_N)
    ] = Field(description="Text, token ids, or a list of either (one choice group per prompt).")
    logprobs: int | None = Field(None, ge=0, le=5, description="0: the sampled tokens' logprobs. Top "
                                                              "alternatives (> 0) are not computed.")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: a lone text or token-id list is one prompt."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def num_engine_requests(self) -> int:
        return len(self.prompts()) * self.n


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer clients).")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Only 0: alternatives are not computed.")

    def num_engine_requests(self) -> int:
        return self.n


# ---------------------------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class _Envelope(BaseModel):
    """What every response object (and stream chunk) carries besides its choices."""

    id: str
    created: int = Field(description="Unix time")
    model: str


class _Choice(BaseModel):
    index: int = Field(description="Prompt index × n + choice number")
    finish_reason: Literal["stop", "length"] | None = Field(description="null until the choice's last chunk")


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Envelope):
    """A completion; streamed, each chunk has this shape too (``finish_reason`` null until the last)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[dict] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Envelope):
    """One Server-Sent Event of a streamed chat completion (``data: {...}``; the last is ``data: [DONE]``)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "scalellm-jax"
    max_model_len: int
    simulated_device: str | None = None  # set when no model runs: the engine's device is simulated


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

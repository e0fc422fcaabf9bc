"""``GET /openapi.json``: the API description, generated from the pydantic schemas the server validates with."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from scalellm_jax.server import protocol
from scalellm_jax.server.live_state import ServerStateView
from scalellm_jax.server.playground import ASSETS

_REQUESTS = (protocol.CompletionRequest, protocol.ChatCompletionRequest)
_OPTIONAL_MODEL = (protocol.TokenizeRequest, protocol.DetokenizeRequest)  # vLLM's: the model may be left out
_RESPONSES = (protocol.CompletionResponse, protocol.ChatCompletionResponse, protocol.ChatCompletionChunk,
              protocol.ModelList, protocol.ModelCard, protocol.TokenizeResponse, protocol.DetokenizeResponse,
              protocol.ErrorResponse, ServerStateView)


_TOKENIZER_INFO = {
    "type": "object", "required": ["tokenizer_class", "vocab_size", "model_max_length"],
    "properties": {"tokenizer_class": {"type": "string"}, "vocab_size": {"type": "integer"},
                   "model_max_length": {"type": "integer"},
                   **{name: {"type": ["string", "null"]}
                      for name in ("bos_token", "eos_token", "pad_token", "chat_template")}},
}


def _ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*statuses: int) -> dict:
    reasons = {400: "Invalid request (the error's param names the field)", 401: "Missing or wrong API key",
               404: "No such model (or file)",
               429: "Queue full; retry after the Retry-After header's seconds", 500: "The engine failed this request",
               503: "The model is still loading, or the engine stopped"}
    return {str(s): _content(reasons[s], protocol.ErrorResponse) for s in statuses}


def _content(description: str, model=None, media: str = "application/json", schema: dict | None = None) -> dict:
    return {"description": description, "content": {media: {"schema": schema or _ref(model)}}}


def _sse_event(response) -> dict:
    """One event of a stream (before OpenAPI 3.2's itemSchema, ``schema`` describes each event)."""
    chunk = protocol.ChatCompletionChunk if response is protocol.ChatCompletionResponse else response
    return {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": f"a {chunk.__name__} as JSON, an error body, or the final [DONE]"},
        "event": {"type": "string"}}}


def _generation(summary: str, request, response) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "The completion, or with stream=true Server-Sent Events ending in data: [DONE]",
                    "content": {"application/json": {"schema": _ref(response)},
                                "text/event-stream": {"schema": _sse_event(response)}}},
            **_errors(400, 401, 429, 500, 503),
        },
    }}


def _post(summary: str, request, response) -> dict:
    return {"post": {"summary": summary,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
                     "responses": {"200": _content(summary, response), **_errors(400, 401, 503)}}}


def openapi_document(model_name: str, secured: bool) -> dict:
    _, top = models_json_schema(
        [(m, "validation") for m in _REQUESTS + _OPTIONAL_MODEL] + [(m, "serialization") for m in _RESPONSES],
        ref_template="#/components/schemas/{model}",
    )
    for request in _REQUESTS:  # the one served model is the only valid value
        top["$defs"][request.__name__]["properties"]["model"]["enum"] = [model_name]
    for request in _OPTIONAL_MODEL:
        top["$defs"][request.__name__]["properties"]["model"] = {"anyOf": [{"enum": [model_name]}, {"type": "null"}]}
    status = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "ScaleLLM-JAX OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/completions": _generation("Text completion", protocol.CompletionRequest,
                                           protocol.CompletionResponse),
            "/v1/chat/completions": _generation("Chat completion", protocol.ChatCompletionRequest,
                                                protocol.ChatCompletionResponse),
            "/v1/models": {"get": {"summary": "The served model", "responses": {
                "200": _content("One model", protocol.ModelList),
                **_errors(401, 503)}}},
            "/v1/models/{model_id}": {"get": {
                "summary": "One model by its id",
                "parameters": [{"name": "model_id", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": [model_name]}}],
                "responses": {"200": _content("The model", protocol.ModelCard), **_errors(401, 404, 503)}}},
            "/tokenize": _post("Token ids of a prompt, or of chat messages through the chat template (vLLM)",
                               protocol.TokenizeRequest, protocol.TokenizeResponse),
            "/detokenize": _post("The text of token ids (vLLM)", protocol.DetokenizeRequest,
                                 protocol.DetokenizeResponse),
            "/tokenizer_info": {"get": {"summary": "The tokenizer's class, vocabulary size and context (vLLM)",
                                        "responses": {"200": _content("Tokenizer", schema=_TOKENIZER_INFO),
                                                      **_errors(401, 503)}}},
            "/version": {"get": {"summary": "The server's version", "security": [], "responses": {
                "200": _content("Version", schema={"type": "object", "required": ["version"],
                                                   "properties": {"version": {"type": "string"}}})}}},
            "/health": {"get": {"summary": "200 when ready to serve", "security": [], "responses": {
                "200": _content("Ready", schema=status),
                "503": _content("Loading, or the engine stopped", schema=status)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {
                "200": _content("Text exposition format", media="text/plain", schema={"type": "string"})}}},
            "/state": {"get": {"summary": "The server's state now: queues, KV cache, prefix cache, tokens generated "
                                          "(what the playground's live panel polls; the numbers of /metrics)",
                               "security": [], "responses": {"200": _content("State", ServerStateView)}}},
            "/": {"get": {"summary": "The playground: a chat and completion page (the API key, when the server "
                                     "needs one, is typed into the page and sent to /v1/* by the browser)",
                          "security": [], "responses": {
                              "200": _content("HTML page", media="text/html", schema={"type": "string"})}}},
            "/playground/{name}": {"get": {
                "summary": "The playground page's script and style sheet", "security": [],
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": sorted(ASSETS)}}],
                "responses": {"200": {"description": "The file", "content": {
                    kind: {"schema": {"type": "string"}} for kind in sorted(set(ASSETS.values()))}},
                    **_errors(404)}}},
        },
        "components": {"schemas": top["$defs"]},
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc

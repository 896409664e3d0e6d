"""OpenAI-compatible handlers: chat and text completions (JSON or SSE), models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gpuproxy_proxy.simulator.config import SimulatorConfig
from gpuproxy_proxy.simulator.driver import EngineDriver
from gpuproxy_proxy.simulator.engine import RequestTooLarge, SequenceRequest, TokenEvent
from gpuproxy_proxy.simulator.metrics import SimulatorMetrics
from gpuproxy_proxy.simulator.tokens import output_piece, render_chat, tokenize

CONFIG = web.AppKey("simulator_config", SimulatorConfig)
DRIVER = web.AppKey("simulator_driver", EngineDriver)
METRICS = web.AppKey("simulator_metrics", SimulatorMetrics)


class BadRequest(Exception):
    """A client error, answered in OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, error_type: str = "BadRequestError"):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


@dataclass(frozen=True)
class ParsedRequest:
    """What one completion request asks for, after validation."""

    chat: bool
    model: str
    request: SequenceRequest
    stream: bool
    include_usage: bool


def error_response(error: BadRequest) -> web.Response:
    return web.json_response({"error": {"message": str(error), "type": error.error_type,
                                        "param": None, "code": error.status}},
                             status=error.status)


def _positive_int(body: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadRequest(f"`{key}` must be a positive integer")
            return value
    return None


def parse_request(body: Any, config: SimulatorConfig, chat: bool) -> ParsedRequest:
    """Validates the body and turns it into an engine request."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model", config.model_name)
    if model not in (*config.served_model_names, *config.lora_adapters):
        raise BadRequest(f"The model `{model}` does not exist.", 404, "NotFoundError")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("`messages` must be a non-empty list")
        try:
            prompt_ids = tokenize(render_chat(messages), config.chars_per_token)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = tokenize(prompt, config.chars_per_token)
        elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt_ids = list(prompt)  # already token ids
        else:
            raise BadRequest("`prompt` must be a string, one string in a list, or token ids")
    max_tokens = _positive_int(body, "max_completion_tokens", "max_tokens") if chat else \
        _positive_int(body, "max_tokens")
    stream_options = body.get("stream_options") or {}
    return ParsedRequest(
        chat=chat, model=str(model), stream=body.get("stream") is True,
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
        request=SequenceRequest(
            request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            prompt_token_ids=tuple(prompt_ids),
            max_tokens=max_tokens or config.default_max_tokens,
            # An explicit limit is what stops the text ("length"); without one the simulated
            # model "ends its answer" after default_max_tokens ("stop").
            finish_reason="length" if max_tokens else "stop", cache_salt=str(model)))


def usage(parsed: ParsedRequest, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    prompt_tokens = len(parsed.request.prompt_token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _choice(parsed: ParsedRequest, text: str, finish_reason: str | None,
            streamed: bool, first: bool = False) -> dict[str, Any]:
    if not parsed.chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if streamed:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else \
            ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def _envelope(parsed: ParsedRequest, created: int, streamed: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if streamed else "chat.completion") if parsed.chat \
        else "text_completion"
    return {"id": parsed.request.request_id, "object": kind, "created": created,
            "model": parsed.model}


async def completion(request: web.Request, chat: bool) -> web.StreamResponse:
    driver = request.app[DRIVER]
    try:
        body = await request.json()
    except ValueError:  # bad JSON or bad UTF-8
        return error_response(BadRequest("the body is not valid JSON"))
    try:
        parsed = parse_request(body, request.app[CONFIG], chat)
        stream = driver.submit(parsed.request)
    except RequestTooLarge as exc:
        return error_response(BadRequest(str(exc)))
    except BadRequest as exc:
        return error_response(exc)
    try:
        if parsed.stream:
            return await _stream(request, parsed, stream)
        return await _collect(parsed, stream)
    finally:
        driver.release(parsed.request.request_id)


async def _collect(parsed: ParsedRequest, stream: asyncio.Queue[TokenEvent]) -> web.Response:
    created = int(time.time())
    pieces = []
    while True:
        event = await stream.get()
        pieces.append(output_piece(event.index))
        if event.finished:
            break
    body = _envelope(parsed, created, streamed=False)
    body["choices"] = [_choice(parsed, "".join(pieces), parsed.request.finish_reason, False)]
    body["usage"] = usage(parsed, len(pieces), event.cached_tokens)
    return web.json_response(body)


async def _stream(request: web.Request, parsed: ParsedRequest,
                  stream: asyncio.Queue[TokenEvent]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    created = int(time.time())

    async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        # As vLLM (unlike OpenAI, no `"usage": null` on the others): with
        # stream_options.include_usage only the final chunk, without choices, has usage.
        chunk = _envelope(parsed, created, streamed=True)
        chunk["choices"] = choices
        chunk.update(extra or {})
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

    generated = 0
    while True:
        event = await stream.get()
        generated += 1
        await send([_choice(parsed, output_piece(event.index), None, True, event.index == 0)])
        if event.finished:
            break
    await send([_choice(parsed, "", parsed.request.finish_reason, True)])
    if parsed.include_usage:
        await send([], {"usage": usage(parsed, generated, event.cached_tokens)})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await completion(request, chat=False)


async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    created = int(time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "vllm",
             "root": name, "parent": None, "max_model_len": config.engine.max_model_len}
            for name in config.served_model_names]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "vllm",
              "root": name, "parent": config.model_name, "max_model_len": None}
             for name in config.lora_adapters]
    return web.json_response({"object": "list", "data": data})


async def health(_: web.Request) -> web.Response:
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

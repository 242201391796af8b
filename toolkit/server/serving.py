"""Serving logic of /v1/chat/completions: request -> engine requests -> response or SSE chunks. No routes here.

Messages are checked by the same schema module as training data and encoded by the same chat module, so
a served prompt is token for token the prompt part of a training row.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import chat
from toolkit import constants as C
from toolkit.engine import Engine, QueueFull, Request, SamplingParams
from toolkit.errors import ToolkitError
from toolkit.images import ImagePolicy
from toolkit.schema import check_messages
from toolkit.server.errors import APIError
from toolkit.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
    completion_id,
)

DEFAULT_MAX_TOKENS = 1024  # when a request names none: this, or what the context has left


@dataclass
class ServerState:
    base: Any
    engine: Engine
    served_name: str
    adapters: dict[str, Path] = field(default_factory=dict)
    image_policy: ImagePolicy = field(default_factory=lambda: ImagePolicy(allow_local_files=False))
    context_length: int = 0
    api_key: str | None = None
    max_tokens_limit: int | None = None  # most tokens one choice may ask for (default: what the context allows)
    max_body_bytes: int = 32 * 2**20
    max_images: int = C.MAX_IMAGES_PER_REQUEST
    started: int = field(default_factory=lambda: int(time.time()))

    def models(self) -> ModelList:
        cards = [ModelCard(id=self.served_name, created=self.started, root=str(self.base.path))]
        cards += [
            ModelCard(id=name, created=self.started, root=str(path), parent=self.served_name)
            for name, path in self.adapters.items()
        ]
        return ModelList(data=cards)


def _select_adapter(state: ServerState, model: str | None) -> str | None:
    if model is None or model == state.served_name:
        return None
    if model in state.adapters:
        return model
    raise APIError(
        404,
        f"The model {model!r} does not exist; see GET /v1/models",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


def _prepare(state: ServerState, req: ChatCompletionRequest) -> tuple[chat.Encoded, int]:
    """Check messages, load images, encode the prompt, and fit max_tokens into the context (blocking: a thread)."""
    raw = [m.model_dump(exclude_none=True) for m in req.messages]
    messages, problems = check_messages(raw, purpose="request", max_images=state.max_images)
    if problems:
        raise APIError(400, "; ".join(map(str, problems)), param=problems[0].path)
    try:
        images = chat.load_images(messages, base_dir=None, policy=state.image_policy)
    except ToolkitError as err:
        raise APIError(400, f"{err.where}: {err.what}", param=err.where, code="invalid_image") from None
    prompt = chat.encode_prompt(state.base.processor, messages, images)
    n_prompt = len(prompt.input_ids)
    asked = req.max_completion_tokens or req.max_tokens
    room = state.context_length - n_prompt
    limit = state.max_tokens_limit
    if asked is not None and limit is not None and asked > limit:
        raise APIError(
            400, f"max_tokens is {asked}; this server allows at most {limit}", param="max_tokens", code="max_tokens"
        )
    if asked is not None and n_prompt + asked > state.context_length:
        raise APIError(
            400,
            f"This model's maximum context length is {state.context_length} tokens; the messages take "
            f"{n_prompt} tokens and max_tokens asks for {asked} more ({n_prompt + asked} in all)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if room < 1:
        raise APIError(
            400,
            f"The messages take {n_prompt} tokens, the whole context of {state.context_length}",
            param="messages",
            code="context_length_exceeded",
        )
    return prompt, asked or min(DEFAULT_MAX_TOKENS, room, limit or room)


class _Stream:
    """One choice: tokens arrive from the engine thread; text is decoded incrementally (never half a UTF-8
    character) and cut at the first stop string."""

    def __init__(
        self, index: int, tokenizer: Any, stops: list[str], loop: asyncio.AbstractEventLoop, incremental: bool
    ) -> None:
        self.index, self.tokenizer, self.stops = index, tokenizer, stops
        self.incremental = incremental or bool(stops)  # else text is decoded once, at the end
        self.queue: asyncio.Queue = asyncio.Queue()  # lists of events
        self.loop = loop
        self.ids: list[int] = []
        self.emitted = ""
        self.finish: tuple[str, Any] | None = None
        self.request: Request | None = None
        self.generated = 0
        self._buffer: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def on_event(self, kind: str, value: Any) -> None:  # engine thread
        # Events are buffered and the event loop woken once per batch of them: a wake-up per token per row
        # costs the model CPU time on small machines.
        with self._lock:
            self._buffer.append((kind, value))
            wake = len(self._buffer) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # event loop
        with self._lock:
            events, self._buffer = self._buffer, []
        if events:
            self.queue.put_nowait(events)

    def feed_all(self, events: list[tuple[str, Any]]) -> str:
        """Apply a batch of engine events; return the new text that may be shown."""
        return "".join(self.feed(kind, value) for kind, value in events if not self.done)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def feed(self, kind: str, value: Any) -> str:
        """Apply one engine event; return the new text that may be shown."""
        if kind == "error":
            raise value
        if kind == "token":
            self.generated += 1
            self.ids.append(value)
            if not self.incremental:
                return ""
        text = self._text()
        for s in self.stops:
            at = text.find(s, max(0, len(self.emitted) - len(s)))
            if at != -1:
                self.finish = ("stop", s)
                if self.request is not None:
                    self.request.cancel()
                text = text[:at]
                break
        if kind == "done" and self.finish is None:
            reason, _token = value
            self.generated += 1 if reason == "stop" else 0  # the stop token was generated too
            self.finish = ("length" if reason == "length" else "stop", None)
        if self.finish is None:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                return ""
            hold = max((len(s) - 1 for s in self.stops if s), default=0)  # a stop string may be starting
            for k in range(min(hold, len(text) - len(self.emitted)), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.stops):
                    text = text[:-k]
                    break
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta

    @property
    def done(self) -> bool:
        return self.finish is not None


def _sampling(req: ChatCompletionRequest, max_tokens: int, i: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=None if req.seed is None else req.seed + i,  # n choices: independent but reproducible
        ignore_eos=req.ignore_eos,
    )


async def _start(state: ServerState, req: ChatCompletionRequest) -> tuple[list[_Stream], int]:
    adapter = _select_adapter(state, req.model)
    prompt, max_tokens = await asyncio.to_thread(_prepare, state, req)
    loop = asyncio.get_running_loop()
    streams = [_Stream(i, state.base.tokenizer, req.stop_list(), loop, bool(req.stream)) for i in range(req.n)]
    try:
        for i, s in enumerate(streams):
            s.request = state.engine.submit(
                Request(
                    prompt.input_ids,
                    prompt.token_type_ids,
                    prompt.pixel_values,
                    adapter,
                    _sampling(req, max_tokens, i),
                    s.on_event,
                )
            )
    except QueueFull:
        for s in streams:
            if s.request is not None:
                s.request.cancel()
        raise APIError(
            429,
            "The server is at capacity; retry shortly",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    return streams, len(prompt.input_ids)


def _cancel(streams: list[_Stream]) -> None:
    for s in streams:
        if s.request is not None and not s.done:
            s.request.cancel()


async def _drain(s: _Stream, is_disconnected: Any) -> None:
    while not s.done:
        try:
            events = await asyncio.wait_for(s.queue.get(), timeout=0.5)
        except TimeoutError:
            if await is_disconnected():
                raise asyncio.CancelledError from None
            continue
        s.feed_all(events)


async def complete(state: ServerState, req: ChatCompletionRequest, is_disconnected: Any) -> ChatCompletionResponse:
    streams, n_prompt = await _start(state, req)
    try:
        await asyncio.gather(*(_drain(s, is_disconnected) for s in streams))
    finally:
        _cancel(streams)  # a client that went away frees its rows
    choices = [
        Choice(
            index=s.index,
            message=ResponseMessage(content=s.emitted),
            finish_reason=s.finish[0],
            stop_reason=s.finish[1],
        )
        for s in streams
    ]
    used = sum(s.generated for s in streams)
    return ChatCompletionResponse(
        model=req.model or state.served_name,
        choices=choices,
        usage=Usage(prompt_tokens=n_prompt, completion_tokens=used, total_tokens=n_prompt + used),
    )


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def stream(state: ServerState, req: ChatCompletionRequest, is_disconnected: Any) -> AsyncIterator[str]:
    """Server-sent events: a role delta, content deltas, a finish chunk per choice, usage if asked, [DONE].

    Called before the response starts, so admission errors (404, 400, 429) are still plain HTTP errors.
    """
    streams, n_prompt = await _start(state, req)
    cid, created, model = completion_id(), int(time.time()), req.model or state.served_name

    def chunk(choices: list, usage: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    async def events() -> AsyncIterator[str]:
        try:
            for s in streams:
                yield chunk(
                    [
                        {
                            "index": s.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            pending = {asyncio.ensure_future(s.queue.get()): s for s in streams}
            while pending:
                done, _ = await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                if not done and await is_disconnected():
                    break
                for fut in done:
                    s = pending.pop(fut)
                    delta = s.feed_all(fut.result())
                    if delta:
                        yield chunk(
                            [{"index": s.index, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}]
                        )
                    if s.done:
                        yield chunk(
                            [
                                {
                                    "index": s.index,
                                    "delta": {},
                                    "logprobs": None,
                                    "finish_reason": s.finish[0],
                                    "stop_reason": s.finish[1],
                                }
                            ]
                        )
                    else:
                        pending[asyncio.ensure_future(s.queue.get())] = s
            for fut in pending:
                fut.cancel()
            if req.stream_options and req.stream_options.include_usage:
                used = sum(s.generated for s in streams)
                yield chunk(
                    [],
                    {
                        "prompt_tokens": n_prompt,
                        "completion_tokens": used,
                        "total_tokens": n_prompt + used,
                        "prompt_tokens_details": None,
                    },
                )
            yield "data: [DONE]\n\n"
        finally:
            _cancel(streams)  # disconnect or error: stop generating for this client

    return events()

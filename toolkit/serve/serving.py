"""Serving core shared by every endpoint, and /v1/chat/completions: request -> engine rows -> body or SSE chunks.

A door (chat here, completions.py, later responses) turns its request into prompt token ids and one
`SamplingParams` per choice, then `submit()` hands the rows to the engine and returns one `ChoiceStream` per
choice. A ChoiceStream applies the engine's events (prompt_logprobs, logprobs, token, done, error): text is
decoded incrementally (never half a UTF-8 character), cut at the first stop string, and log probabilities are
kept beside the tokens. No routes here (app.py).

Messages are checked by the same schema module as training data and encoded by the same chat module, so
a served prompt is token for token the prompt part of a training row.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import constants as C
from toolkit.data import template as chat
from toolkit.data.images import ImagePolicy
from toolkit.data.schema import check_messages
from toolkit.engine.engine import Engine, QueueFull, Request, RequestTooLarge
from toolkit.engine.sampling import SamplingParams
from toolkit.errors import ToolkitError
from toolkit.serve import logprobs as lp
from toolkit.serve import structured
from toolkit.serve.engine_process import EngineGone
from toolkit.serve.errors import APIError
from toolkit.serve.field_names import CHAT_NAMES, FieldNames
from toolkit.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ModelCard,
    ModelList,
    ResponseMessage,
    SamplingFields,
    Usage,
    completion_id,
)

DEFAULT_MAX_TOKENS = 1024  # when a chat request names none: this, or what the context has left
# A streamed choice wakes the event loop at most once per STREAM_INTERVAL_S for its tokens (its first token and
# its end at once): each wake costs the loop's Python (decode, stop strings, JSON, HTTP framing), which holds the
# GIL the engine's thread needs between ops. Where the model decodes faster than this (the tiny base: ~2 ms a
# token on 2 cores), an SSE chunk carries the few tokens decoded since the last one; a token waits at most this
# plus one engine pass. (vLLM's `--stream-interval` does the same, counted in tokens.)
STREAM_INTERVAL_S = 0.005


@dataclass
class ServerState:
    base: Any
    engine: Engine
    served_name: str
    adapters: dict[str, Path] = field(default_factory=dict)  # served adapter name -> folder (GET /v1/models)
    image_policy: ImagePolicy = field(default_factory=lambda: ImagePolicy(allow_local_files=False))
    context_length: int = 0
    api_key: str | None = None
    max_tokens_limit: int | None = None  # most tokens one choice may ask for (default: what the context allows)
    max_body_bytes: int = 32 * 2**20
    max_images: int = C.MAX_IMAGES_PER_REQUEST
    started: int = field(default_factory=lambda: int(time.time()))
    adapters_dir: Path | None = None  # runtime loading reads only below this folder
    runtime: Any = None  # adapters.AdapterSet: served names -> engine adapter names, in-flight counts
    metrics: Any = None  # metrics.Metrics
    responses: Any = None  # responses.ResponseStore: stored Responses (GET /v1/responses/{id}, previous_response_id)
    token_text: Any = None  # logprobs.TokenText, made on first use
    playground: bool = True  # /playground and its read-only routes (serve/playground.py)
    eval_dir: Path | None = None  # where the playground finds eval reports (`toolkit eval`'s folders)

    def models(self) -> ModelList:
        cards = [ModelCard(id=self.served_name, created=self.started, root=str(self.base.path))]
        cards += [
            ModelCard(id=name, created=self.started, root=str(path), parent=self.served_name)
            for name, path in list(self.adapters.items())
        ]
        return ModelList(data=cards)

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.engine.stop_ids)

    def texts(self) -> lp.TokenText:
        if self.token_text is None:
            self.token_text = lp.TokenText(self.base.tokenizer)
        return self.token_text


# ------------------------------------------------------------------------------------------------ the core
def check_model(state: ServerState, model: str | None) -> None:
    if model is None or model == state.served_name or model in state.adapters:
        return
    raise APIError(
        404,
        f"The model {model!r} does not exist; see GET /v1/models",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


def fit_max_tokens(
    state: ServerState, n_prompt: int, asked: int | None, default: int | None, what: str, param: str = "max_tokens"
) -> int:
    """The tokens a choice may generate: `asked` if it fits the context (and --max-tokens-limit), else a 400.
    `what`: the request field the prompt came from; `param`: the one that asked for `asked` tokens."""
    room = state.context_length - n_prompt
    limit = state.max_tokens_limit
    prompt = "the prompt" if what == "prompt" else f"the prompt ({what})"
    if asked is not None and limit is not None and asked > limit:
        raise APIError(400, f"{param} is {asked}; this server allows at most {limit}", param=param, code="max_tokens")
    if asked is not None and n_prompt + asked > state.context_length:
        raise APIError(
            400,
            f"This model's maximum context length is {state.context_length} tokens; {prompt} takes "
            f"{n_prompt} tokens and {param} asks for {asked} more ({n_prompt + asked} in all)",
            param=param,
            code="context_length_exceeded",
        )
    if room < 1 and asked != 0:
        raise APIError(
            400,
            f"{prompt[0].upper()}{prompt[1:]} takes {n_prompt} tokens, the whole context of {state.context_length}",
            param=what,
            code="context_length_exceeded",
        )
    if asked is not None:
        return asked
    default = default if default is not None else DEFAULT_MAX_TOKENS
    return min(default, room, limit or room)


def _check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    if not ids:  # (most requests: len() of the 262k tokenizer costs ~0.3 ms a call)
        return
    vocab = len(state.base.tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=param)


def sampling_params(
    state: ServerState,
    fields: SamplingFields,
    max_tokens: int,
    n: int,
    *,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    names: FieldNames = CHAT_NAMES,
) -> list[SamplingParams]:
    """One SamplingParams per choice: the request's sampling fields, seeds offset per choice (independent but
    reproducible), and a fresh grammar constraint per choice for structured output."""
    bias = {int(k): v for k, v in (fields.logit_bias or {}).items()}
    _check_token_ids(state, list(bias), "logit_bias")
    _check_token_ids(state, fields.stop_token_ids or [], "stop_token_ids")
    grammars = structured.constraints(fields, state.base.tokenizer, state.stop_ids, n, names)
    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if fields.temperature is None else fields.temperature,
            top_p=fields.top_p,
            top_k=fields.top_k,
            min_p=fields.min_p,
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            repetition_penalty=fields.repetition_penalty,
            seed=None if fields.seed is None else fields.seed + i,
            ignore_eos=fields.ignore_eos,
            min_tokens=fields.min_tokens,
            stop_token_ids=list(fields.stop_token_ids or []),
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=grammars[i] if grammars else None,
        )
        for i in range(n)
    ]


class ChoiceStream:
    """One choice: the engine thread reports events; the event loop applies them in batches."""

    def __init__(
        self,
        index: int,
        state: ServerState,
        fields: SamplingFields,
        loop: asyncio.AbstractEventLoop,
        incremental: bool,
    ) -> None:
        self.index, self.state, self.loop = index, state, loop
        self.tokenizer = state.base.tokenizer
        self.stops = fields.stop_list()
        self.include_stop = fields.include_stop_str_in_output
        self.skip_special = fields.skip_special_tokens
        self.min_tokens = fields.min_tokens
        self.stop_token_ids = set(fields.stop_token_ids or [])
        self.incremental = incremental or bool(self.stops)  # else text is decoded once, at the end
        self.queue: asyncio.Queue = asyncio.Queue()  # lists of events
        self.ids: list[int] = []
        self.logprobs: list[Any] = []  # TokenLogprob per token in logprob_ids() (when asked)
        self.prompt_logprobs: list[Any] | None = None
        self.emitted = ""
        self.finish: tuple[str, Any] | None = None
        self.request: Request | None = None
        self.generated = 0
        self.model = "?"
        self.times: list[float] = []  # engine-thread arrival time of each token (metrics)
        self.submitted = time.monotonic()
        self._pending_logprob: Any = None
        # The stop token that ended the choice: generated (counted in usage) and scored (its logprob ends
        # self.logprobs, as vLLM lists it), but not text. None when no stop token ended it.
        self.stop_token: int | None = None
        self._buffer: list[tuple[str, Any]] = []
        self._scheduled = False  # a _flush is on its way to the event loop
        self._woken = 0.0  # when the engine's thread last woke the loop for this choice
        self._lock = threading.Lock()
        self.on_finish: Callable[[ChoiceStream], None] | None = None

    def on_event(self, kind: str, value: Any) -> None:  # engine thread
        # Events are buffered and the event loop woken once per batch of them: a wake-up per token per row
        # costs the model CPU time on small machines. A choice whose text is decoded once at the end (not
        # streamed, no stop strings) needs no wake-up before its last event.
        now = time.monotonic()
        if kind == "token" or (kind == "done" and value[0] == "stop" and value[1] is not None):
            self.times.append(now)  # a stop token was generated too (usage and the metrics count it)
        urgent = self.incremental or kind in ("done", "error")
        recent = now - self._woken < STREAM_INTERVAL_S
        if urgent and kind in ("token", "logprobs") and len(self.times) > 1 and recent:
            urgent = False  # coalesced: goes with the next wake (STREAM_INTERVAL_S)
        with self._lock:
            self._buffer.append((kind, value))
            wake = urgent and not self._scheduled
            self._scheduled = self._scheduled or wake
        if wake:
            self._woken = now
            self.loop.call_soon_threadsafe(self._flush)
        if kind in ("done", "error"):  # the engine is finished with the row: its adapter may go, metrics count it
            self._finished()

    def _flush(self) -> None:  # event loop
        with self._lock:
            events, self._buffer = self._buffer, []
            self._scheduled = False
        if events:
            self.queue.put_nowait(events)

    def feed_all(self, events: list[tuple[str, Any]]) -> str:
        """Apply a batch of engine events; return the new text that may be shown."""
        return "".join(self.feed(kind, value) for kind, value in events if not self.done)

    def _text(self) -> str:
        # Called once per streamed token: the Rust tokenizer directly (transformers' decode first converts every
        # id through `to_py_obj`, a Python call per token) where it does nothing more (no space clean-up).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return backend.decode(self.ids, skip_special_tokens=self.skip_special)
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special)

    def feed(self, kind: str, value: Any) -> str:
        """Apply one engine event; return the new text that may be shown."""
        if kind == "error":
            raise value
        if kind == "prompt_logprobs":
            self.prompt_logprobs = value
            return ""
        if kind == "logprobs":
            self._pending_logprob = value
            return ""
        if kind == "token":
            self.generated += 1
            self.ids.append(value)
            if self._pending_logprob is not None:
                self.logprobs.append(self._pending_logprob)
                self._pending_logprob = None
            if not self.incremental:
                return ""
        text = self._text()
        if self.generated >= self.min_tokens:  # vLLM: stop strings wait for min_tokens too
            for s in self.stops:
                at = text.find(s, max(0, len(self.emitted) - len(s)))
                if at != -1:
                    self.finish = ("stop", s)
                    if self.request is not None:
                        self.request.cancel()
                    text = text[: at + len(s)] if self.include_stop else text[:at]
                    break
        if kind == "done" and self.finish is None:
            reason, token = value
            if reason == "stop" and token is not None:  # the stop token was generated
                self.generated += 1
                self.stop_token = token
                if self._pending_logprob is not None:  # the engine reports its log probability when asked
                    self.logprobs.append(self._pending_logprob)
                    self._pending_logprob = None
            stop_reason = token if token is not None and token in self.stop_token_ids else None
            self.finish = ("length" if reason == "length" else "stop", stop_reason)
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

    def logprob_ids(self) -> list[int]:
        """The token ids self.logprobs scores: the text's tokens, then the stop token that ended the choice."""
        return self.ids if self.stop_token is None else [*self.ids, self.stop_token]

    def _finished(self) -> None:
        callback, self.on_finish = self.on_finish, None
        if callback is not None:
            callback(self)

    @property
    def done(self) -> bool:
        return self.finish is not None


@dataclass
class Row:
    """One engine row to submit: a prompt and the sampling of one choice."""

    input_ids: list[int]
    params: SamplingParams
    token_type_ids: list[int] | None = None
    pixel_values: Any = None


def submit(
    state: ServerState,
    model: str | None,
    rows: list[Row],
    streams: list[ChoiceStream],
    max_tokens_param: str = "max_tokens",
) -> None:
    """Hand every row to the engine (all or none: on a full queue the ones taken are cancelled -> 429)."""
    if len(rows) > state.engine.max_queue:  # no retry can succeed (a 429 would say "retry shortly")
        raise APIError(
            400,
            f"the request asks for {len(rows)} choices (n per prompt); this server queues at most "
            f"{state.engine.max_queue} (--max-queue)",
            param="n",
            code="too_many_choices",
        )
    served = model or state.served_name
    engine_name = state.runtime.acquire(model, len(rows)) if model and model != state.served_name else None
    released = [False] * len(rows)

    def release(i: int) -> Callable[[ChoiceStream], None]:
        def done(s: ChoiceStream) -> None:
            if not released[i]:
                released[i] = True
                if engine_name is not None:
                    state.runtime.release(engine_name)
                if state.metrics is not None:
                    state.metrics.choice_finished(s)

        return done

    try:
        for i, (row, s) in enumerate(zip(rows, streams, strict=True)):
            s.model, s.on_finish = served, release(i)
            types = row.token_type_ids if row.token_type_ids is not None else [0] * len(row.input_ids)
            s.request = state.engine.submit(
                Request(row.input_ids, types, row.pixel_values, engine_name, row.params, s.on_event)
            )
    except QueueFull:
        _abandon(streams)
        raise APIError(
            429,
            "The server is at capacity; retry shortly",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except RequestTooLarge as err:  # the engine's KV budget can never hold this request
        _abandon(streams)
        message = f"{err.what}; {err.fix}" if err.fix else err.what
        raise APIError(400, message, param=max_tokens_param, code="request_too_large") from None


def _abandon(streams: list[ChoiceStream]) -> None:
    for s in streams:
        if s.request is not None:
            s.request.cancel()  # the engine reports it done (cancelled), which releases it
        else:
            s._finished()


def cancel(streams: list[ChoiceStream]) -> None:
    for s in streams:
        if s.request is not None and not s.done:
            s.request.cancel()


async def drain(s: ChoiceStream, is_disconnected: Any) -> None:
    while not s.done:
        try:
            events = await asyncio.wait_for(s.queue.get(), timeout=0.5)
        except TimeoutError:
            if await is_disconnected():
                raise asyncio.CancelledError from None
            continue
        s.feed_all(events)


async def run_all(streams: list[ChoiceStream], is_disconnected: Any) -> None:
    """Wait until every choice is finished (non-streaming responses)."""
    try:
        await asyncio.gather(*(drain(s, is_disconnected) for s in streams))
    finally:
        cancel(streams)  # a client that went away frees its rows


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def generation_error(exc: Exception) -> APIError:
    """What a client is told when generation fails: 503 `engine_gone` when the engine's process has exited (killed,
    out of memory: the server needs a restart), else a 500 naming only the exception's type (no traceback)."""
    if isinstance(exc, EngineGone):
        return APIError(503, f"{exc}; restart the server", type="server_error", code="engine_gone")
    return APIError(
        500, f"internal error while generating: {type(exc).__name__}", type="server_error", code="server_error"
    )


def sse_error(exc: Exception) -> str:
    """The last events of a stream whose generation failed mid-way (the status line is long sent): the error
    envelope, as vLLM sends, then [DONE]."""
    return sse(generation_error(exc).body()) + "data: [DONE]\n\n"


async def each_event(streams: list[ChoiceStream], is_disconnected: Any) -> AsyncIterator[tuple[ChoiceStream, str, int]]:
    """(choice, new text, how many tokens it got) as engine events arrive, for streaming responses; ends
    when every choice is finished or the client is gone."""
    if len(streams) == 1:  # the common case, without a task and a wait set per batch of events
        s = streams[0]
        while not s.done:
            try:
                async with asyncio.timeout(0.5):
                    events = await s.queue.get()
            except TimeoutError:
                if await is_disconnected():
                    return
                continue
            before = len(s.ids)
            yield s, s.feed_all(events), before
        return
    pending = {asyncio.ensure_future(s.queue.get()): s for s in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if not done and await is_disconnected():
                break
            for fut in done:
                s = pending.pop(fut)
                before = len(s.ids)
                delta = s.feed_all(fut.result())
                yield s, delta, before
                if not s.done:
                    pending[asyncio.ensure_future(s.queue.get())] = s
    finally:
        for fut in pending:
            fut.cancel()


def usage(n_prompt: int, streams: list[ChoiceStream]) -> Usage:
    used = sum(s.generated for s in streams)
    return Usage(prompt_tokens=n_prompt, completion_tokens=used, total_tokens=n_prompt + used)


# ------------------------------------------------------------------------------------------------ chat
def _max_tokens_field(req: ChatCompletionRequest) -> str:
    return "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"


def _prepare(state: ServerState, req: ChatCompletionRequest, names: FieldNames) -> tuple[chat.Encoded, int]:
    """Check messages, load images, encode the prompt, and fit max_tokens into the context (blocking: a thread)."""
    raw = [m.model_dump(exclude_none=True) for m in req.messages]
    messages, problems = check_messages(raw, purpose="request", max_images=state.max_images)
    if problems:
        text = "; ".join(f"{names(p.path)}: {p.message}" for p in problems)
        raise APIError(400, text, param=names(problems[0].path))
    try:
        images = chat.load_images(messages, base_dir=None, policy=state.image_policy)
    except ToolkitError as err:
        where = names(err.where)
        raise APIError(400, f"{where}: {err.what}", param=where, code="invalid_image") from None
    prompt = chat.encode_prompt(state.base.processor, messages, images)
    what, n = names("messages"), len(prompt.input_ids)
    if req.max_completion_tokens is not None and req.max_tokens is not None:  # the first wins, both must fit
        fit_max_tokens(state, n, req.max_tokens, None, what, names("max_tokens"))
    asked = req.max_completion_tokens or req.max_tokens
    return prompt, fit_max_tokens(state, n, asked, None, what, names(_max_tokens_field(req)))


async def start_chat(
    state: ServerState, req: ChatCompletionRequest, names: FieldNames = CHAT_NAMES
) -> tuple[list[ChoiceStream], int]:
    """The chat door: messages -> prompt -> n engine rows. Reusable by other doors that speak in messages: their
    errors name fields through `names`."""
    check_model(state, req.model)
    k = (req.top_logprobs or 0) if req.logprobs else None

    def prepare() -> tuple[chat.Encoded, list]:  # one hop to a worker thread for both (each hop costs ~0.1 ms)
        prompt, max_tokens = _prepare(state, req, names)
        params = sampling_params(
            state, req, max_tokens, req.n, logprobs=k, prompt_logprobs=req.prompt_logprobs, names=names
        )
        return prompt, params

    prompt, params = await asyncio.to_thread(prepare)
    loop = asyncio.get_running_loop()
    streams = [ChoiceStream(i, state, req, loop, bool(req.stream)) for i in range(req.n)]
    rows = [Row(prompt.input_ids, p, prompt.token_type_ids, prompt.pixel_values) for p in params]
    submit(state, req.model, rows, streams, names(_max_tokens_field(req)))
    if state.metrics is not None:
        state.metrics.prompt(req.model or state.served_name, len(prompt.input_ids))
    return streams, len(prompt.input_ids)


def _prompt_logprobs(state: ServerState, streams: list[ChoiceStream]) -> Any:
    first = streams[0].prompt_logprobs if streams else None
    return None if first is None else lp.prompt_logprobs(state.texts(), first)


async def complete(state: ServerState, req: ChatCompletionRequest, is_disconnected: Any) -> ChatCompletionResponse:
    streams, n_prompt = await start_chat(state, req)
    await run_all(streams, is_disconnected)
    texts = state.texts()
    choices = [
        Choice(
            index=s.index,
            message=ResponseMessage(content=s.emitted),
            logprobs=lp.chat_logprobs(texts, s.logprobs) if req.logprobs else None,
            finish_reason=s.finish[0],
            stop_reason=s.finish[1],
        )
        for s in streams
    ]
    return ChatCompletionResponse(
        model=req.model or state.served_name,
        choices=choices,
        usage=usage(n_prompt, streams),
        prompt_logprobs=_prompt_logprobs(state, streams),
    )


async def stream(state: ServerState, req: ChatCompletionRequest, is_disconnected: Any) -> AsyncIterator[str]:
    """Server-sent events: a role delta, content deltas (with their log probabilities), a finish chunk per
    choice, usage if asked, [DONE].

    Called before the response starts, so admission errors (404, 400, 429) are still plain HTTP errors.
    """
    streams, n_prompt = await start_chat(state, req)
    cid, created, model = completion_id(), int(time.time()), req.model or state.served_name
    texts = state.texts()
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

    def chunk(choices: list, usage_: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        elif continuous:
            body["usage"] = usage(n_prompt, streams).model_dump()
        if streams and streams[0].prompt_logprobs is not None and "prompt_logprobs" not in sent:
            sent.add("prompt_logprobs")
            body["prompt_logprobs"] = [_dump(x) for x in lp.prompt_logprobs(texts, streams[0].prompt_logprobs)]
        return sse(body)

    sent: set[str] = set()

    async def events() -> AsyncIterator[str]:
        try:
            for s in streams:
                delta = {"role": "assistant", "content": ""}
                yield chunk([{"index": s.index, "delta": delta, "logprobs": None, "finish_reason": None}])
            async for s, delta, before in each_event(streams, is_disconnected):
                new = s.logprobs[before:] if req.logprobs else []
                if req.logprobs:
                    logprobs = {"content": [e.model_dump() for e in lp.chat_entries(texts, new)], "refusal": None}
                if delta or new:
                    yield chunk(
                        [
                            {
                                "index": s.index,
                                "delta": {"content": delta},
                                "logprobs": logprobs if req.logprobs else None,
                                "finish_reason": None,
                            }
                        ]
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
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage(n_prompt, streams).model_dump())
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield sse_error(exc)
        finally:
            cancel(streams)  # disconnect or error: stop generating for this client

    return events()


def _dump(x: Any) -> Any:
    return None if x is None else {k: v.model_dump() for k, v in x.items()}

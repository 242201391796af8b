"""The Responses door: POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}.

A Responses request is converted into the one message schema (toolkit/data/schema.py: `instructions` becomes the
system turn, input items become user / assistant / system / developer messages, `input_text` / `input_image`
parts become text / image_url parts) and into a chat request, which runs through the chat door's own path
(serving.start_chat: the same checks, image fetch rules, template, limits, adapters, grammar constraint and
engine). Past this module nothing knows the conversation came from the Responses API. Errors raised on the chat
path name the Responses request's fields: the door hands the chat path a `FieldNames` map (`messages[1]` ->
`input[0]`, `max_tokens` -> `max_output_tokens`). No routes here (app.py).

Stored responses (for GET and `previous_response_id`) live in a bounded in-memory store: the newest
`toolkit serve --responses-store N` responses (256 by default; 0 keeps none) and at most STORE_MAX_BYTES of
conversation, oldest evicted first; an unknown or evicted id is a 404. Nothing survives a restart.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from toolkit import constants as C
from toolkit.data.schema import problems_from_errors
from toolkit.serve import logprobs as lp
from toolkit.serve.errors import APIError
from toolkit.serve.field_names import FieldNames
from toolkit.serve.protocol import ChatCompletionRequest
from toolkit.serve.responses_protocol import LOGPROBS_INCLUDE, MessageItem, ResponsesRequest
from toolkit.serve.serving import ChoiceStream, ServerState, cancel, each_event, run_all, start_chat

STORE_MAX_BYTES = 64 * 2**20  # images sent as data: URIs are kept with the conversation: bound the bytes too
CHAT_FIELDS = (  # chat's fields -> the Responses request's (messages, item by item, come from to_messages)
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------ the store
@dataclass
class Stored:
    body: dict  # the Response object as returned
    conversation: list[dict]  # the messages to continue from (without the instructions' system turn)
    size: int


class ResponseStore:
    """The newest responses, bounded by count and bytes (an OrderedDict as an LRU by insertion)."""

    def __init__(self, size: int = C.RESPONSES_STORE, max_bytes: int = STORE_MAX_BYTES) -> None:
        self.size, self.max_bytes = size, max_bytes
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0

    def put(self, body: dict, conversation: list[dict]) -> None:
        if self.size <= 0:
            return
        size = len(json.dumps(conversation)) + len(json.dumps(body))
        if size > self.max_bytes:
            return
        self.items[body["id"]] = Stored(body, conversation, size)
        self.bytes += size
        while len(self.items) > self.size or self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.size

    def get(self, rid: str) -> Stored | None:
        return self.items.get(rid)

    def delete(self, rid: str) -> bool:
        old = self.items.pop(rid, None)
        if old is not None:
            self.bytes -= old.size
        return old is not None


def not_found(rid: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(
        404,
        f"Response with id {rid!r} not found (unknown, not stored, or evicted from this server's in-memory store)",
        type="invalid_request_error" if param else "not_found_error",
        param=param,
        code=code,
    )


# ------------------------------------------------------------------------------------------------ input -> messages
def _parts(item: MessageItem) -> str | list[dict]:
    if isinstance(item.content, str):
        return item.content
    out = []
    for p in item.content:
        if p.type == "input_image":
            detail = p.detail if p.detail in ("auto", "low", "high") else None
            out.append({"type": "image_url", "image_url": {"url": p.image_url, "detail": detail}})
        else:  # input_text, output_text, refusal: text (the part index stays the same, so errors map back)
            out.append({"type": "text", "text": p.refusal if p.type == "refusal" else p.text})
    return out


def has_instructions(req: ResponsesRequest) -> bool:
    """Empty instructions are no system turn (the Agents SDK sends "" for an agent without instructions)."""
    return bool(req.instructions and req.instructions.strip())


def to_messages(req: ResponsesRequest, history: list[dict]) -> tuple[list[dict], FieldNames]:
    """The chat messages for a request, and how the request names chat's fields (each message by the field it came
    from), for errors."""
    messages: list[dict] = []
    where: list[str] = []
    if has_instructions(req):
        messages.append({"role": "system", "content": req.instructions})
        where.append("instructions")
    messages += history
    where += ["previous_response_id"] * len(history)
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        where.append("input")
    else:
        for i, item in enumerate(req.input):
            messages.append({"role": item.role, "content": _parts(item)})
            where.append(f"input[{i}]")
    return messages, FieldNames(CHAT_FIELDS, tuple(where))


def chat_request(req: ResponsesRequest, messages: list[dict], names: FieldNames) -> ChatCompletionRequest:
    """The chat request that answers a Responses request (same sampling, same grammar, same logprobs)."""
    fmt = req.text.format if req.text is not None else None
    response_format = None
    if fmt is not None and fmt.type == "json_object":
        response_format = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        response_format = {"type": "json_schema", "json_schema": spec}
    want = LOGPROBS_INCLUDE in (req.include or [])
    body = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "stream": req.stream,
        "logprobs": want,
        "top_logprobs": (req.top_logprobs or 0) if want else None,
        "response_format": response_format,
    }
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        problems = problems_from_errors(err.errors())
        text = "; ".join(f"{names(p.path)}: {p.message}" for p in problems[:5]) or "invalid request"
        raise APIError(400, text, param=names(problems[0].path) if problems else None) from None


# ------------------------------------------------------------------------------------------------ a run
@dataclass
class Run:
    """One Responses request on its way through the engine, and the Response objects it makes."""

    state: ServerState
    req: ResponsesRequest
    streams: list[ChoiceStream]
    n_prompt: int
    conversation: list[dict]
    id: str = field(default_factory=lambda: new_id("resp"))
    msg_id: str = field(default_factory=lambda: new_id("msg"))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.req.include or [])

    def body(self, status: str, output: list | None = None, usage: dict | None = None, error: Any = None) -> dict:
        """The Response object, with the request's settings echoed as OpenAI does."""
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        out = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls,
            "model": req.model or self.state.served_name,
            "output": output or [],
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": None,
            "service_tier": "default",
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [],
            "top_logprobs": req.top_logprobs or 0,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "metadata": req.metadata or {},
        }
        if usage is not None:  # OpenAI's schema: an object when present (no usage while in progress)
            out["usage"] = usage
        for name in ("user", "safety_identifier", "prompt_cache_key"):  # OpenAI's schema: a string when present
            if getattr(req, name) is not None:
                out[name] = getattr(req, name)
        return out

    def part(self, s: ChoiceStream | None) -> dict:
        entries = lp.chat_entries(self.state.texts(), s.logprobs) if s is not None and self.logprobs else []
        return {
            "type": "output_text",
            "text": s.emitted if s is not None else "",
            "annotations": [],
            "logprobs": [e.model_dump() for e in entries],
        }

    def item(self, status: str, s: ChoiceStream | None) -> dict:
        content = [self.part(s)] if s is not None else []
        return {"id": self.msg_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def final(self, s: ChoiceStream, store: ResponseStore) -> dict:
        """The finished Response (completed, or incomplete when max_output_tokens ran out); stored unless store
        is false."""
        status = "incomplete" if s.finish[0] == "length" else "completed"
        usage = {
            "input_tokens": self.n_prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": s.generated,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.n_prompt + s.generated,
        }
        body = self.body(status, [self.item(status, s)], usage)
        if self.req.store is not False:
            store.put(body, [*self.conversation, {"role": "assistant", "content": s.emitted}])
        return body


async def start(state: ServerState, req: ResponsesRequest) -> Run:
    """Check, convert and submit (before any response starts: errors are plain HTTP errors)."""
    history: list[dict] = []
    if req.previous_response_id is not None:
        found = state.responses.get(req.previous_response_id)
        if found is None:
            raise not_found(req.previous_response_id, "previous_response_id", "previous_response_not_found")
        history = found.conversation
    messages, names = to_messages(req, history)
    chat = chat_request(req, messages, names)
    streams, n_prompt = await start_chat(state, chat, names)
    conversation = messages[1:] if has_instructions(req) else messages  # instructions are not carried over
    return Run(state, req, streams, n_prompt, conversation)


async def complete(state: ServerState, req: ResponsesRequest, is_disconnected: Any) -> JSONResponse:
    run = await start(state, req)
    await run_all(run.streams, is_disconnected)
    return JSONResponse(run.final(run.streams[0], state.responses))  # built as OpenAI's schema: no model to check


def _short_logprobs(entries: list[Any]) -> list[dict]:
    """The streaming events' logprob shape (OpenAI's ResponseLogProb: no bytes)."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in e.top_logprobs],
        }
        for e in entries
    ]


async def stream(state: ServerState, req: ResponsesRequest, is_disconnected: Any) -> AsyncIterator[str]:
    """OpenAI's event sequence: response.created, response.in_progress, output_item.added, content_part.added,
    output_text.delta..., output_text.done, content_part.done, output_item.done, then response.completed or
    response.incomplete; an engine failure mid-way ends with response.failed (never a dropped connection)."""
    run = await start(state, req)
    (s,) = run.streams
    texts = state.texts()
    numbers = itertools.count()
    at = {"item_id": run.msg_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(numbers), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            yield event("response.created", response=run.body("in_progress"))
            yield event("response.in_progress", response=run.body("in_progress"))
            yield event("response.output_item.added", output_index=0, item=run.item("in_progress", None))
            yield event("response.content_part.added", **at, part=run.part(None))
            async for _, delta, before in each_event(run.streams, is_disconnected):
                new = lp.chat_entries(texts, s.logprobs[before:]) if run.logprobs else []
                if delta or new:
                    yield event("response.output_text.delta", **at, delta=delta, logprobs=_short_logprobs(new))
            if not s.done:  # the client went away
                return
            body = run.final(s, state.responses)
            item = body["output"][0]
            part = item["content"][0]
            all_entries = lp.chat_entries(texts, s.logprobs) if run.logprobs else []
            yield event("response.output_text.done", **at, text=part["text"], logprobs=_short_logprobs(all_entries))
            yield event("response.content_part.done", **at, part=part)
            yield event("response.output_item.done", output_index=0, item=item)
            yield event(f"response.{body['status']}", response=body)
        except Exception as exc:  # the engine failed mid-way: say so in the stream (no traceback to clients)
            error = {"code": "server_error", "message": f"internal error while generating: {type(exc).__name__}"}
            yield event("response.failed", response=run.body("failed", error=error))
        finally:
            cancel(run.streams)

    return events()

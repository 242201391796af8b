"""POST /v1/responses through the official openai SDK (`responses.create`, streamed and not, `responses.parse`):
the same answers as chat completions (one door into the same path), OpenAI's event sequence, the stored-response
rules, refusals by name, and every body and event validated against OpenAI's published schemas."""

from __future__ import annotations

import base64
import json
from typing import Literal

import httpx
import openai
import pytest
from openapi.schemas import assert_valid
from pydantic import BaseModel

JAPAN = "What is the capital of Japan?"
EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
ENDS = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def post(server, body: dict, path: str = "/v1/responses") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def events(server, body: dict) -> list[dict]:
    """Every event of a streamed response, each checked: `event:` line = data type, OpenAI's schema."""
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        text = r.read().decode()
    out = []
    for block in filter(None, text.split("\n\n")):
        head, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        assert_valid(event, "ResponseStreamEvent")
        out.append(event)
    return out


def chat(server, messages: list, **fields) -> dict:
    r = post(server, {"model": "quickstart", "messages": messages, "temperature": 0, **fields}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    return r.json()


def test_create_answers_as_chat_does_in_openais_shape(server, client):
    r = post(server, {"model": "quickstart", "input": JAPAN, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "Response")
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["status"] == "completed"
    assert body["error"] is None and body["incomplete_details"] is None and body["completed_at"] >= body["created_at"]
    (item,) = body["output"]
    assert item["id"].startswith("msg_") and item["type"] == "message" and item["role"] == "assistant"
    assert item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": "Tokyo", "annotations": [], "logprobs": []}]
    reference = chat(server, [{"role": "user", "content": JAPAN}])
    assert body["usage"] == {
        "input_tokens": reference["usage"]["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": reference["usage"]["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": reference["usage"]["total_tokens"],
    }
    sdk = client.responses.create(model="quickstart", input=JAPAN, temperature=0)
    assert sdk.output_text == "Tokyo" and sdk.status == "completed" and sdk.usage.output_tokens == 2


def test_settings_are_echoed(server):
    body = post(
        server,
        {
            "model": "quickstart",
            "input": JAPAN,
            "temperature": 0,
            "top_p": 0.5,
            "max_output_tokens": 9,
            "metadata": {"run": "7"},
            "user": "u-1",
            "instructions": "Answer briefly.",
            "tools": [],
            "include": [],
            "tool_choice": "none",
            "parallel_tool_calls": False,
            "truncation": "disabled",
            "store": False,
            "service_tier": "auto",
        },
    ).json()
    assert_valid(body, "Response")
    assert body["metadata"] == {"run": "7"} and body["user"] == "u-1" and body["instructions"] == "Answer briefly."
    assert body["temperature"] == 0 and body["top_p"] == 0.5 and body["max_output_tokens"] == 9
    assert body["tool_choice"] == "none" and body["parallel_tool_calls"] is False and body["tools"] == []
    assert body["truncation"] == "disabled" and body["text"] == {"format": {"type": "text"}}


def test_input_items_instructions_developer_and_history_are_the_chat_conversation(server, client, images):
    uri = "data:image/png;base64," + base64.b64encode(images["red"].read_bytes()).decode()
    items = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": JAPAN},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Tokyo", "annotations": []}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What colour is the square?"},
                {"type": "input_image", "image_url": uri, "detail": "auto"},
            ],
        },
    ]
    got = client.responses.create(model="quickstart", instructions="Be brief.", input=items, temperature=0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": JAPAN},
        {"role": "assistant", "content": "Tokyo"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What colour is the square?"},
                {"type": "image_url", "image_url": {"url": uri}},
            ],
        },
    ]
    reference = chat(server, messages)
    assert got.output_text == reference["choices"][0]["message"]["content"]
    assert got.usage.input_tokens == reference["usage"]["prompt_tokens"]


def test_stream_follows_openais_event_sequence(server, client):
    got = events(server, {"model": "quickstart", "input": JAPAN, "temperature": 0})
    kinds = [e["type"] for e in got]
    n = len(kinds) - len(EVENTS) - len(ENDS) - 1
    assert n >= 1 and kinds == EVENTS + ["response.output_text.delta"] * n + ENDS + ["response.completed"]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    deltas = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
    final = got[-1]["response"]
    assert deltas == "Tokyo" == got[-4]["text"] == final["output"][0]["content"][0]["text"]
    assert final["id"] == got[0]["response"]["id"] and final["status"] == "completed"
    with client.responses.stream(model="quickstart", input=JAPAN, temperature=0) as sdk:
        texts = [e.delta for e in sdk if e.type == "response.output_text.delta"]
        assert "".join(texts) == sdk.get_final_response().output_text == "Tokyo"


def test_max_output_tokens_gives_an_incomplete_response(server, client):
    base = server.state.served_name
    body = client.responses.create(model=base, input=JAPAN, max_output_tokens=3, temperature=0)
    assert body.status == "incomplete" and body.incomplete_details.reason == "max_output_tokens"
    assert body.output[0].status == "incomplete" and body.usage.output_tokens == 3
    got = events(server, {"model": base, "input": JAPAN, "max_output_tokens": 3, "temperature": 0})
    assert got[-1]["type"] == "response.incomplete" and got[-1]["response"]["status"] == "incomplete"
    assert got[-2]["item"]["status"] == "incomplete"


def test_logprobs_with_include_match_chat(server):
    ask = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    body = post(server, {"model": "quickstart", "input": JAPAN, "temperature": 0, **ask}).json()
    assert_valid(body, "Response")
    content = body["output"][0]["content"][0]["logprobs"]
    reference = chat(server, [{"role": "user", "content": JAPAN}], logprobs=True, top_logprobs=2)
    assert content == reference["choices"][0]["logprobs"]["content"] and len(content[0]["top_logprobs"]) == 2
    got = events(server, {"model": "quickstart", "input": JAPAN, "temperature": 0, **ask})
    streamed = [x for e in got if e["type"] == "response.output_text.delta" for x in e["logprobs"]]
    assert [x["logprob"] for x in streamed] == [x["logprob"] for x in content]
    assert got[-1]["response"]["output"][0]["content"][0]["logprobs"] == content


class City(BaseModel):
    city: Literal["Tokyo", "Paris"]


SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Tokyo", "Paris"]}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_is_enforced_strict_or_not(server, strict):
    fmt = {"type": "json_schema", "name": "city", "schema": SCHEMA, "strict": strict}
    body = post(server, {"model": "quickstart", "input": JAPAN, "text": {"format": fmt}, "max_output_tokens": 40})
    assert body.status_code == 200, body.text
    body = body.json()
    assert_valid(body, "Response")
    assert json.loads(body["output"][0]["content"][0]["text"])["city"] in ("Tokyo", "Paris")
    assert body["text"]["format"] == fmt


def test_parse_and_json_object(server, client):
    parsed = client.responses.parse(model="quickstart", input=JAPAN, text_format=City, temperature=0)
    assert isinstance(parsed.output_parsed, City) and parsed.status == "completed"
    body = post(
        server,
        {"model": "quickstart", "input": JAPAN, "text": {"format": {"type": "json_object"}}, "max_output_tokens": 12},
    )
    text = body.json()["output"][0]["content"][0]["text"]
    assert text.startswith("{") and body.json()["text"]["format"] == {"type": "json_object"}


def test_stored_responses_get_delete_and_continue(server, client):
    first = client.responses.create(model="quickstart", input=JAPAN, temperature=0, instructions="Be brief.")
    fetched = httpx.get(f"{server.url}/v1/responses/{first.id}", timeout=30)
    assert fetched.status_code == 200 and fetched.json()["output"][0]["content"][0]["text"] == "Tokyo"
    assert_valid(fetched.json(), "Response")
    assert client.responses.retrieve(first.id).id == first.id
    second = client.responses.create(
        model="quickstart", input="What is the capital of Japan?", previous_response_id=first.id, temperature=0
    )
    messages = [
        {"role": "user", "content": JAPAN},  # the first request's instructions are not carried over
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": JAPAN},
    ]
    reference = chat(server, messages)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == reference["usage"]["prompt_tokens"]
    assert second.output_text == reference["choices"][0]["message"]["content"]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    r = post(server, {"model": "quickstart", "input": "Hi", "previous_response_id": first.id})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    unstored = client.responses.create(model="quickstart", input=JAPAN, store=False, max_output_tokens=2)
    assert httpx.get(f"{server.url}/v1/responses/{unstored.id}").status_code == 404


def test_the_store_is_bounded_by_its_flag(make_server):
    small = make_server(responses_store=2)
    ids = [post(small, {"model": "quickstart", "input": "Hi", "max_output_tokens": 1}).json()["id"] for _ in "abc"]
    found = [httpx.get(f"{small.url}/v1/responses/{i}").status_code for i in ids]
    assert found == [404, 200, 200] and len(small.state.responses.items) == 2


@pytest.mark.parametrize(
    ("patch", "param", "text"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "tool calling is not supported"),
        ({"tool_choice": "required"}, "tool_choice", "tool calling"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "no reasoning mode"),
        ({"truncation": "auto"}, "truncation", "not supported"),
        ({"background": True}, "background", "not supported"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "not supported"),
        ({"include": ["nonsense"]}, "include", "Input should be 'message.output_text.logprobs'"),
        ({"include": [{}]}, "include", "Input should be 'message.output_text.logprobs'"),  # was a 500 (unhashable)
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]},
            "input[0].type",
            "tool",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "must be one of"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
            "input_file",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]}
                ]
            },
            "input[0].content[0]",
            "not valid base64",
        ),
        (
            {"input": [{"role": "assistant", "content": "Hi"}]},
            "input[0].role",
            "expected 'user' here",
        ),
        ({"instructions": "x", "input": [{"role": "user", "content": ""}]}, "input[0].content", "is empty"),
        ({"max_output_tokens": 10**6}, "max_output_tokens", "maximum context length"),
        ({"model": "nope"}, "model", "does not exist"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 3}}}}, "text.format", ""),
    ],
)
def test_refusals_and_errors_name_the_responses_field(server, patch, param, text):
    r = post(server, {"model": "quickstart", "input": JAPAN, **patch})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert_valid(r.json(), "ErrorResponse")
    assert error["param"].startswith(param) and text in error["message"], error


def test_the_openai_agents_sdk_request_is_accepted(server):
    """The body the Agents SDK's Runner sends on its Responses model (tools [], include [], no tool_choice)."""
    body = {
        "model": "quickstart",
        "instructions": "",  # an agent without instructions: no system turn
        "input": [{"role": "user", "content": JAPAN}],
        "tools": [],
        "include": [],
        "temperature": 0,
        "stream": False,
    }
    r = post(server, body)
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "Tokyo"
    assert r.json()["instructions"] == ""


def test_a_failure_mid_stream_ends_with_response_failed(server, monkeypatch):
    engine = server.state.engine
    submit = engine.submit

    def failing(request):
        on_event = request.on_event

        def broken(kind, value):
            if kind == "token":
                on_event("error", RuntimeError("boom"))
            else:
                on_event(kind, value)

        request.on_event = broken
        return submit(request)

    monkeypatch.setattr(engine, "submit", failing)
    got = events(server, {"model": "quickstart", "input": JAPAN, "temperature": 0})
    assert got[-1]["type"] == "response.failed" and got[-1]["response"]["status"] == "failed"
    assert got[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "internal error while generating: RuntimeError",
    }

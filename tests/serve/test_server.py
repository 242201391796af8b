"""`toolkit serve` on 127.0.0.1, driven by the official openai SDK: the card's schema and shape, streaming,
n, stop, seeds, images, adapters, errors in OpenAI's envelope, disconnects, overload and auth."""

from __future__ import annotations

import base64
import dataclasses
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from toolkit.data import template as chat
from toolkit.data.schema import parse_messages
from toolkit.engine.engine import generate_greedy

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


def _image_uri(images, color):
    return "data:image/png;base64," + base64.b64encode(images[color].read_bytes()).decode()


def test_the_server_runs_on_uvloop_and_httptools():
    """`toolkit serve` leaves uvicorn's loop and HTTP parser on "auto" (cli.py): with the project's dependencies
    installed they must resolve to uvloop and httptools, not asyncio's loop and the pure-Python h11, which cost
    0.5 ms more server CPU per request (docs/BENCHMARKS.md, "Serving load")."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    async def app(scope, receive, send):  # any ASGI app: only the configuration is resolved
        pass

    config = uvicorn.Config(app, log_level="warning")
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    loop = config.get_loop_factory()()
    try:
        assert type(loop).__module__.split(".")[0] == "uvloop"
    finally:
        loop.close()


def test_plain_completion_has_exactly_the_cards_shape(server):
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "quickstart", "messages": JAPAN, "temperature": 0}
    )
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "prompt_logprobs"}
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) == len("chatcmpl-") + 32
    assert body["object"] == "chat.completion" and body["model"] == "quickstart" and body["prompt_logprobs"] is None
    (choice,) = body["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason", "stop_reason"}
    assert choice["message"] == {
        "role": "assistant",
        "content": "Tokyo",
        "refusal": None,
        "annotations": [],
        "audio": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 2  # "Tokyo" + <end_of_turn>
    assert usage["total_tokens"] == usage["prompt_tokens"] + 2 and usage["prompt_tokens_details"] is None


def test_sdk_adapter_selection_and_models(client, server):
    adapter = client.chat.completions.create(model="quickstart", messages=JAPAN, temperature=0)
    base = client.chat.completions.create(model=server.state.served_name, messages=JAPAN, temperature=0, max_tokens=6)
    assert adapter.choices[0].message.content == "Tokyo"
    assert base.choices[0].message.content != "Tokyo"
    assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 6
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {server.state.served_name, "quickstart"}
    assert models["quickstart"].model_extra["parent"] == server.state.served_name


def test_streaming_deltas_usage_and_done(client, server):
    chunks = list(
        client.chat.completions.create(
            model="quickstart", messages=JAPAN, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Tokyo"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"model": "quickstart", "messages": JAPAN, "temperature": 0, "stream": True},
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_n_choices_and_usage_counts_all(client):
    r = client.chat.completions.create(model="quickstart", messages=JAPAN, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == "Tokyo" for c in r.choices)
    assert r.usage.completion_tokens == 4


def test_stop_strings(client):
    r = client.chat.completions.create(model="quickstart", messages=JAPAN, temperature=0, stop=["ky"])
    assert r.choices[0].message.content == "To"
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == "ky"
    streamed = client.chat.completions.create(model="quickstart", messages=JAPAN, temperature=0, stop="ky", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "To"


def test_seed_reproducibility(client, server):
    def sample(seed):
        r = client.chat.completions.create(
            model=server.state.served_name, messages=JAPAN, temperature=1.5, max_tokens=12, seed=seed
        )
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(5)}) > 1


def test_image_data_uri_reaches_the_adapter(client, images):
    for color in ("red", "blue"):
        content = [
            {"type": "text", "text": "What color is the square?"},
            {"type": "image_url", "image_url": {"url": _image_uri(images, color)}},
        ]
        r = client.chat.completions.create(
            model="quickstart", messages=[{"role": "user", "content": content}], temperature=0
        )
        assert r.choices[0].message.content == color


def test_greedy_over_http_equals_in_process_generation(client, server, trained):
    from toolkit.base.loader import load_base
    from toolkit.lora.registry import attach

    assert server.state.base.model is None  # the server's engine runs in its own process (engine_process.py)
    local = load_base(server.state.base.path, device="cpu")  # the same base and adapter, in this process
    local = dataclasses.replace(local, model=attach(local, [("quickstart", Path(trained.adapter_dir))]))
    messages = parse_messages(JAPAN, purpose="request", where="test")
    prompt = chat.encode_prompt(local.processor, messages, []).tensors()
    ids = generate_greedy(local, prompt, max_new_tokens=8)
    expected = local.tokenizer.decode(ids, skip_special_tokens=True)
    r = client.chat.completions.create(model="quickstart", messages=JAPAN, temperature=0, max_tokens=8)
    assert r.choices[0].message.content == expected


ERRORS = [
    ({"temperature": 5}, 400, "temperature", "less than or equal to 2"),
    ({"temperature": "hot"}, 400, "temperature", "valid number"),
    ({"top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"n": 0}, 400, "n", "greater than or equal to 1"),
    ({"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"presence_penalty": 3}, 400, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -2.5}, 400, "frequency_penalty", "greater than or equal to -2"),
    ({"stream": "yes"}, 400, "stream", "valid boolean"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "tool calling is not supported"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
        400,
        "messages[1]",
        "tool calling is not supported",
    ),
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0].role", "expected 'user'"),
    (
        {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
        400,
        "messages[0].content[0]",
        "'text' or 'image_url'",
    ),
    ({"model": "nope"}, 404, "model", "does not exist"),
    ({"max_tokens": 100000}, 400, "max_tokens", "maximum context length is 4096"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ]
        },
        400,
        "messages[0].content[0]",
        "cannot read image",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}
            ]
        },
        400,
        "messages[0].content[0]",
        "non-public address",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
        400,
        "messages[0].content[0]",
        "local image files are not allowed",
    ),
]


@pytest.mark.parametrize("patch, status, param, text", ERRORS, ids=[e[2] + ":" + e[3][:20] for e in ERRORS])
def test_errors_use_the_openai_envelope_and_name_the_parameter(server, patch, status, param, text):
    body = {"messages": JAPAN, **patch}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and text in error["message"], error


def test_malformed_json_and_context_counts(server):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": JAPAN, "max_tokens": 4090})
    assert r.status_code == 400 and "takes 16 tokens" in r.json()["error"]["message"]


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=JAPAN)
    with pytest.raises(openai.BadRequestError, match="tool calling is not supported"):
        client.chat.completions.create(
            model="quickstart",
            messages=JAPAN,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )


def test_disconnect_mid_stream_frees_the_slot(server):
    stats = server.state.engine.stats
    cancelled = stats["cancelled"]
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"messages": JAPAN, "max_tokens": 3000, "temperature": 0, "stream": True},
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # leave mid-stream: the connection closes
    deadline = time.time() + 30
    while time.time() < deadline and (stats["cancelled"] == cancelled or stats["active"]):
        time.sleep(0.1)
    assert stats["cancelled"] == cancelled + 1 and stats["active"] == 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_overload_gives_429_with_retry_after_and_the_server_stays_up(make_server):
    small = make_server(max_batch=1, max_queue=1)
    statuses, headers = [], []

    def call():
        r = httpx.post(
            small.url + "/v1/chat/completions",
            json={"messages": JAPAN, "max_tokens": 60, "temperature": 0},
            timeout=120,
        )
        statuses.append(r.status_code)
        headers.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert all(h == "1" for s, h in zip(statuses, headers, strict=True) if s == 429)
    assert httpx.post(small.url + "/v1/chat/completions", json={"messages": JAPAN, "max_tokens": 2}).status_code == 200


def test_api_key_is_required_on_v1_routes(make_server):
    secured = make_server(api_key="s3cret")
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.request(method, secured.url + path, json={"messages": JAPAN}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert "s3cret" not in r.text
    ok = openai.OpenAI(base_url=secured.url + "/v1", api_key="s3cret", max_retries=0)
    assert (
        ok.chat.completions.create(model="quickstart", messages=JAPAN, temperature=0).choices[0].message.content
        == "Tokyo"
    )
    assert httpx.get(secured.url + "/health").status_code == 200  # health stays open for probes


def test_openapi_document_describes_the_request_schema(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    req = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert req["temperature"]["anyOf"][0]["maximum"] == 2 and req["top_p"]["maximum"] == 1
    assert req["n"]["minimum"] == 1 and req["presence_penalty"]["minimum"] == -2
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["required"]
    assert dataclasses.is_dataclass(type(server.state))

"""Real responses of `toolkit serve` validated against OpenAI's published OpenAPI schemas (tests/openapi/), with
no difference allowed but the model card's documented deviations (tests/openapi/deviations.py); and every field
of OpenAI's request schemas either honoured or refused with a 400 naming it."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from openapi.deviations import DEVIATIONS, FORMS
from openapi.schemas import assert_valid, errors, request_properties

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
CHAT, CHUNK, COMPLETION = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
)


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def sse(server, path: str, body: dict) -> list[dict]:
    """Every chunk of a streamed response (the final [DONE] checked and left out)."""
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def image_uri(images, color: str) -> str:
    return "data:image/png;base64," + base64.b64encode(images[color].read_bytes()).decode()


# ------------------------------------------------------------------------------------------- the validator itself
def openai_chat_body(**message) -> dict:
    """A chat completion exactly as OpenAI's schema describes it (no card fields)."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Tokyo", "refusal": None, **message},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def test_validator_allows_the_cards_deviations_and_nothing_else():
    assert errors(openai_chat_body(), CHAT) == []
    card = openai_chat_body(reasoning_content=None, tool_calls=[])
    card["choices"][0]["stop_reason"] = 106
    card["prompt_logprobs"] = None
    card["usage"]["prompt_tokens_details"] = None
    assert errors(card, CHAT) == []
    # a deviation in another form than the card's, a field OpenAI does not name, a required field missing
    assert errors(openai_chat_body(reasoning_content="thinking"), CHAT)
    assert errors({**openai_chat_body(), "extra": 1}, CHAT)
    assert errors(openai_chat_body(annotations=None), CHAT)  # OpenAI: an array when present
    assert errors(openai_chat_body(function_call=None), CHAT)  # OpenAI: an object when present
    missing = openai_chat_body()
    del missing["choices"][0]["message"]["refusal"]
    assert any("refusal" in e for e in errors(missing, CHAT))
    streamed = {"id": "c", "object": "text_completion", "created": 1, "model": "m"}
    streamed["choices"] = [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]
    assert errors(streamed, COMPLETION + "/stream") == [] and errors(streamed, COMPLETION)  # null only mid-stream
    bad_details = openai_chat_body()
    bad_details["usage"]["prompt_tokens_details"] = 3
    assert errors(bad_details, CHAT)


def test_every_deviation_names_a_form_and_one_line_of_reason():
    for d in DEVIATIONS:
        assert d.form in FORMS and d.reason and "\n" not in d.reason, d
    assert {d.path.split(".")[-1].split("[")[0] for d in DEVIATIONS} == {
        "reasoning_content",
        "tool_calls",
        "stop_reason",
        "prompt_logprobs",
        "prompt_tokens_details",
        "token_logprobs",  # echo: the first prompt token has no logprob (OpenAI's own API sends null too)
        "top_logprobs",
        "finish_reason",  # streamed legacy completions: null until the last chunk, as OpenAI's own API sends
        "root",  # vLLM's /v1/models fields
        "parent",
    }


# ------------------------------------------------------------------------------------------- chat completions
CHAT_CASES = {
    "plain": {"messages": JAPAN, "temperature": 0},
    "n > 1, seeded": {"messages": JAPAN, "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 8},
    "stop string": {"messages": JAPAN, "temperature": 0, "stop": ["ky"]},
    "length": {"messages": JAPAN, "temperature": 0, "max_tokens": 1},
    "adapter": {"model": "quickstart", "messages": JAPAN, "temperature": 0},
    "extras": {"messages": JAPAN, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "max_tokens": 6, "seed": 1},
    "logprobs": {"messages": JAPAN, "temperature": 0, "logprobs": True, "top_logprobs": 3, "max_tokens": 4},
    "prompt_logprobs": {"messages": JAPAN, "temperature": 0, "prompt_logprobs": 2, "max_tokens": 2},
    "json mode": {"messages": JAPAN, "response_format": {"type": "json_object"}, "max_tokens": 24, "seed": 0},
}


@pytest.mark.parametrize("case", CHAT_CASES)
def test_chat_completion_validates(server, case):
    r = post(server, "/v1/chat/completions", CHAT_CASES[case])
    assert r.status_code == 200, r.text
    assert_valid(r.json(), CHAT)


def test_chat_with_images_validates(server, images):
    content = [
        {"type": "text", "text": "What colour is this?"},
        {"type": "image_url", "image_url": {"url": image_uri(images, "red")}},
    ]
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert_valid(r.json(), CHAT)


def test_chat_logprobs_have_openais_shape(server):
    body = post(server, "/v1/chat/completions", CHAT_CASES["logprobs"]).json()
    assert_valid(body, CHAT)
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert entries and "".join(e["token"] for e in entries) == choice["message"]["content"]  # one per content token
    for e in entries:
        assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted(
            (t["logprob"] for t in e["top_logprobs"]), reverse=True
        )


STREAM_CASES = {
    "plain": {"messages": JAPAN, "temperature": 0},
    "usage, n > 1": {
        "messages": JAPAN,
        "n": 2,
        "seed": 3,
        "max_tokens": 6,
        "stream_options": {"include_usage": True},
    },
    "stop": {"messages": JAPAN, "temperature": 0, "stop": "ky"},
    "logprobs": {"messages": JAPAN, "temperature": 0, "logprobs": True, "top_logprobs": 2, "max_tokens": 4},
    "adapter, continuous usage": {
        "model": "quickstart",
        "messages": JAPAN,
        "temperature": 0,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    },
}


@pytest.mark.parametrize("case", STREAM_CASES)
def test_every_stream_chunk_validates(server, case):
    chunks = sse(server, "/v1/chat/completions", STREAM_CASES[case])
    assert len(chunks) >= 3
    for chunk in chunks:
        assert_valid(chunk, CHUNK)


# ------------------------------------------------------------------------------------------- errors and models
ERROR_CASES = {
    "bad temperature": ("/v1/chat/completions", {"messages": JAPAN, "temperature": 9}, 400),
    "no messages": ("/v1/chat/completions", {"model": "quickstart"}, 400),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    "refused field": ("/v1/chat/completions", {"messages": JAPAN, "reasoning_effort": "high"}, 400),
    "tools": (
        "/v1/chat/completions",
        {"messages": JAPAN, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
    ),
    "unknown model": ("/v1/chat/completions", {"model": "nope", "messages": JAPAN}, 404),
    "completions without prompt": ("/v1/completions", {"max_tokens": 3}, 400),
    "unknown route": ("/v1/nothing-here", {}, 404),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_bodies_validate(server, case):
    path, body, status = ERROR_CASES[case]
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert_valid(r.json(), "ErrorResponse")


def test_malformed_json_error_validates(server):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "ErrorResponse")


def test_models_list_validates(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200
    assert_valid(r.json(), "ListModelsResponse")
    assert {m["id"] for m in r.json()["data"]} >= {"quickstart"}


# ------------------------------------------------------------------------------------------- /v1/completions
COMPLETION_CASES = {
    "string": {"prompt": "The capital of Japan is", "max_tokens": 4, "temperature": 0},
    "list of strings, n > 1": {"prompt": ["One", "Two"], "n": 2, "max_tokens": 3, "seed": 5},
    "token ids": {"prompt": [2, 651, 1000], "max_tokens": 3, "temperature": 0},  # the tiny vocabulary: 1773
    "stop": {"prompt": "Count: 1, 2,", "max_tokens": 8, "temperature": 0, "stop": [","]},
    "logprobs": {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 2},
    "echo scoring (lm-eval)": {"prompt": "The sea is blue", "max_tokens": 0, "echo": True, "logprobs": 1},
    "echo and generate": {"prompt": "The sea is", "max_tokens": 2, "echo": True, "logprobs": 0, "temperature": 0},
    "adapter": {"model": "quickstart", "prompt": "Hi", "max_tokens": 2, "temperature": 0},
}


@pytest.mark.parametrize("case", COMPLETION_CASES)
def test_completion_validates(server, case):
    r = post(server, "/v1/completions", COMPLETION_CASES[case])
    assert r.status_code == 200, r.text
    assert_valid(r.json(), COMPLETION)


def test_completion_echo_logprobs_have_openais_legacy_shape(server):
    body = post(server, "/v1/completions", COMPLETION_CASES["echo scoring (lm-eval)"]).json()
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "The sea is blue" or choice["text"].endswith("The sea is blue")
    n = len(lp["tokens"])
    assert n == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) >= 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])


@pytest.mark.parametrize("case", ["string", "list of strings, n > 1", "logprobs"])
def test_every_completion_stream_chunk_validates(server, case):
    # OpenAI streams legacy completions as CreateCompletionResponse objects (finish_reason null until the end)
    chunks = sse(server, "/v1/completions", COMPLETION_CASES[case])
    for chunk in chunks:
        assert_valid(chunk, COMPLETION + "/stream")
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


# ------------------------------------------------------------------------------------------- every request field
# Each field of OpenAI's CreateChatCompletionRequest: "honoured" (changes the answer as documented), "no effect"
# (accepted; cannot change the answer) or "refused" (400 naming it), with a value OpenAI's schema accepts.
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
CHAT_FIELDS: dict[str, tuple[str, object]] = {
    "messages": ("honoured", JAPAN),
    "model": ("honoured", "quickstart"),
    "frequency_penalty": ("honoured", 0.5),
    "presence_penalty": ("honoured", 0.5),
    "logit_bias": ("honoured", {"100": 5}),
    "logprobs": ("honoured", True),
    "top_logprobs": ("honoured", 2),  # sent with logprobs: true
    "max_tokens": ("honoured", 3),
    "max_completion_tokens": ("honoured", 3),
    "n": ("honoured", 2),
    "seed": ("honoured", 1),
    "stop": ("honoured", ["\n"]),
    "stream": ("honoured", False),
    "stream_options": ("honoured", None),  # only with stream: true (checked by the stream tests)
    "temperature": ("honoured", 0.5),
    "top_p": ("honoured", 0.9),
    "response_format": ("honoured", {"type": "json_object"}),
    "user": ("no effect", "user-1"),
    "safety_identifier": ("no effect", "user-1"),
    "metadata": ("no effect", {"k": "v"}),
    "store": ("no effect", False),
    "service_tier": ("no effect", "auto"),
    "prompt_cache_key": ("no effect", "key-1"),
    "prompt_cache_retention": ("no effect", "in_memory"),
    "prompt_cache_options": ("no effect", {"mode": "implicit"}),  # no prompt cache to configure
    "parallel_tool_calls": ("no effect", True),  # no tools: nothing to call in parallel
    "tool_choice": ("no effect", "none"),
    "audio": ("refused", {"voice": "alloy", "format": "wav"}),
    "modalities": ("refused", ["text", "audio"]),
    "prediction": ("refused", {"type": "content", "content": "Tokyo"}),
    "web_search_options": ("refused", {}),
    "reasoning_effort": ("refused", "high"),
    "moderation": ("refused", {"model": "omni-moderation-latest"}),  # may block the answer; /v1/responses refuses it
    "verbosity": ("refused", "high"),
    "tools": ("refused", [TOOL]),
    "functions": ("refused", [{"name": "f", "parameters": {"type": "object", "properties": {}}}]),
    "function_call": ("refused", {"name": "f"}),
}
COMPLETION_FIELDS: dict[str, tuple[str, object]] = {
    "model": ("honoured", "quickstart"),
    "prompt": ("honoured", "Hello"),
    "best_of": ("honoured", 1),  # equal to n; any other value is refused (below)
    "echo": ("honoured", True),
    "frequency_penalty": ("honoured", 0.5),
    "presence_penalty": ("honoured", 0.5),
    "logit_bias": ("honoured", {"100": 5}),
    "logprobs": ("honoured", 2),
    "max_tokens": ("honoured", 3),
    "n": ("honoured", 2),
    "seed": ("honoured", 1),
    "stop": ("honoured", ["\n"]),
    "stream": ("honoured", False),
    "stream_options": ("honoured", None),
    "temperature": ("honoured", 0.5),
    "top_p": ("honoured", 0.9),
    "user": ("no effect", "user-1"),
    "suffix": ("refused", "the end"),
}


def field_request(schema: str, name: str, value: object) -> dict:
    base = {"model": "quickstart", "max_tokens": 3}
    base |= {"messages": JAPAN} if schema == "CreateChatCompletionRequest" else {"prompt": "Hello"}
    body = {**base, name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("schema", "table", "path"),
    [
        ("CreateChatCompletionRequest", CHAT_FIELDS, "/v1/chat/completions"),
        ("CreateCompletionRequest", COMPLETION_FIELDS, "/v1/completions"),
    ],
)
def test_every_openai_request_field_is_honoured_or_refused_by_name(server, schema, table, path):
    assert set(table) == request_properties(schema), "classify the fields OpenAI's schema names (docs/API.md)"
    wrong = []
    for name, (kind, value) in table.items():
        body = field_request(schema, name, value)
        assert not errors(body, schema), (name, errors(body, schema))  # the value is one OpenAI accepts
        r = post(server, path, body)
        if kind == "refused":
            ok = r.status_code == 400 and name in r.json()["error"]["message"]
        else:
            ok = r.status_code == 200
        if not ok:
            wrong.append(f"{name} ({kind}): {r.status_code} {r.text[:200]}")
    assert not wrong, "\n".join(wrong)


def test_best_of_other_than_n_is_refused_by_name(server):
    r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 1, "best_of": 3})
    assert r.status_code == 400 and "best_of" in r.json()["error"]["message"]

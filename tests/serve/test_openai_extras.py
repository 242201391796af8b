"""What users migrating from vLLM / OpenAI send, through the official openai SDK: log probabilities (checked
against one plain forward pass), /v1/completions with echo (the lm-eval log-likelihood path), structured output
on the random base, the sampling extras, and refused fields."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest
from pydantic import BaseModel, Field

from toolkit.data import template as chat
from toolkit.data.schema import parse_messages
from toolkit.engine.engine import generate_greedy
from toolkit.serve.logprobs import TokenText

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
ATOL = 2e-3  # KV-cached decoding vs one full forward in float32 on CPU: same numbers up to summation order


@pytest.fixture(scope="module")
def server(make_server):
    """A float32 model (kernel torch_fused): the checks compare KV-cached chunks with one plain forward to 2e-3,
    which bfloat16 logits (auto's choice on AVX512-BF16 CPUs) cannot hold: they come in steps of 1/16 near -10.
    tests/engine/test_engine.py checks bfloat16 prompt logprobs against the same chunks computed directly.
    In-process engine: the reference forwards use the served model (`state.base.model`)."""
    return make_server(kernel="torch_fused", engine_process=False)


def _log_softmax(state, ids):
    """Reference: one plain forward of the served model (quickstart adapter active in-process) over `ids`."""
    import torch

    with torch.no_grad():
        logits = state.base.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _prompt_ids(state, messages=JAPAN):
    parsed = parse_messages(messages, purpose="request", where="test")
    return chat.encode_prompt(state.base.processor, parsed, []).input_ids


# ------------------------------------------------------------------------------------------- logprobs
def test_chat_logprobs_equal_a_plain_forward_streamed_and_not(client, server):
    state = server.state
    prompt = _prompt_ids(state)
    import torch

    generated = generate_greedy(state.base, {"input_ids": torch.tensor([prompt])}, max_new_tokens=6)
    ref = _log_softmax(state, prompt + generated)
    if len(generated) < 6:  # it ended on a stop token: listed too, as vLLM does (the text leaves it out)
        generated.append(int(ref[-1].argmax()))
        assert generated[-1] in state.stop_ids
    texts = TokenText(state.base.tokenizer)
    r = client.chat.completions.create(
        model="quickstart", messages=JAPAN, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [texts.text(t) for t in generated]
    assert len(content) == r.usage.completion_tokens
    for j, (c, token) in enumerate(zip(content, generated, strict=True)):
        row = ref[len(prompt) - 1 + j]
        assert c.logprob == pytest.approx(float(row[token]), abs=ATOL)
        top_v, top_i = torch.sort(row, descending=True, stable=True)  # equal values: ascending token id
        top_v, top_i = top_v[:3], top_i[:3]
        assert [t.token for t in c.top_logprobs] == [texts.text(int(i)) for i in top_i]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top_v.tolist(), abs=ATOL)
        assert c.bytes == list(c.token.encode())
    streamed = client.chat.completions.create(
        model="quickstart", messages=JAPAN, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True
    )
    entries = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [(c.token, round(c.logprob, 4)) for c in content]
    plain = client.chat.completions.create(model="quickstart", messages=JAPAN, temperature=0, max_tokens=6)
    assert plain.choices[0].logprobs is None


def _sse(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(x) for x in lines if x != "[DONE]"]


def test_logprobs_list_every_token_usage_counts_stop_token_included(server):
    """As vLLM: a choice that ends on <end_of_turn> generated it, so usage counts it and logprobs list it (its
    text stays out of the answer); one entry per completion token in chat, completions and responses, streamed
    and not."""
    stop = {"temperature": 0, "max_tokens": 24}
    state = server.state
    end_of_turn = TokenText(state.base.tokenizer).text(106)
    chat_body = {"model": "quickstart", "messages": JAPAN, "logprobs": True, "top_logprobs": 1, **stop}
    out = httpx.post(server.url + "/v1/chat/completions", json=chat_body, timeout=60).json()
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None, choice  # ended on a stop token
    content = choice["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] and content[-1]["token"] == end_of_turn
    assert end_of_turn not in choice["message"]["content"]
    chunks = _sse(server, "/v1/chat/completions", {**chat_body, "stream_options": {"include_usage": True}})
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert streamed == content and chunks[-1]["usage"] == out["usage"]

    completion_body = {"model": "quickstart", "prompt": _prompt_ids(state), "logprobs": 1, **stop}
    out = httpx.post(server.url + "/v1/completions", json=completion_body, timeout=60).json()
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "stop" and choice["logprobs"]["tokens"][-1] == end_of_turn
    assert len(choice["logprobs"]["tokens"]) == out["usage"]["completion_tokens"]
    chunks = _sse(server, "/v1/completions", {**completion_body, "stream_options": {"include_usage": True}})
    streamed = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert streamed == choice["logprobs"]["tokens"] and chunks[-1]["usage"] == out["usage"]

    responses_body = {"model": "quickstart", "input": JAPAN, "temperature": 0, "max_output_tokens": 24}
    responses_body |= {"include": ["message.output_text.logprobs"], "top_logprobs": 1}
    out = httpx.post(server.url + "/v1/responses", json=responses_body, timeout=60).json()
    assert out["status"] == "completed"
    entries = out["output"][0]["content"][0]["logprobs"]
    assert len(entries) == out["usage"]["output_tokens"] and entries[-1]["token"] == end_of_turn
    events = _sse(server, "/v1/responses", responses_body)
    deltas = [e for ev in events if ev["type"] == "response.output_text.delta" for e in ev["logprobs"]]
    assert [e["token"] for e in deltas] == [e["token"] for e in entries]
    assert events[-1]["response"]["usage"] == out["usage"]


def test_prompt_logprobs_are_vllms_top_level_field(server):
    state = server.state
    prompt = _prompt_ids(state)
    ref = _log_softmax(state, prompt)
    body = {"model": "quickstart", "messages": JAPAN, "temperature": 0, "max_tokens": 1, "prompt_logprobs": 2}
    out = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    pl = out["prompt_logprobs"]
    assert len(pl) == len(prompt) and pl[0] is None
    for i in range(1, len(prompt)):
        entry = pl[i][str(prompt[i])]
        assert entry["logprob"] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=ATOL)
        assert len(pl[i]) in (2, 3)  # the prompt token and the top 2 (it may be one of them)


# ------------------------------------------------------------------------------------------- completions
def test_completions_echo_logprobs_equal_a_plain_forward(client, server):
    state = server.state
    text = "The capital of Japan is"
    ids = state.base.tokenizer(text).input_ids
    ref = _log_softmax(state, ids)
    r = client.completions.create(model="quickstart", prompt=text, max_tokens=0, echo=True, logprobs=2)
    (choice,) = r.choices
    assert choice.text == text and choice.finish_reason == "length"
    lps = choice.logprobs
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert len(lps.tokens) == len(ids) and lps.text_offset[0] == 0
    for i in range(1, len(ids)):
        assert lps.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=ATOL)
        assert 2 <= len(lps.top_logprobs[i]) <= 3
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_completions_prompts_n_stop_and_stream(client, server):
    r = client.completions.create(model="quickstart", prompt=["Hello", "Paris is"], max_tokens=5, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    ids = server.state.base.tokenizer("Paris is").input_ids
    by_ids = client.completions.create(model="quickstart", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == r.choices[2].text
    streamed = client.completions.create(
        model="quickstart", prompt="Paris is", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[2].text
    full = r.choices[2].text
    if len(full) > 2:
        cut = client.completions.create(
            model="quickstart", prompt="Paris is", max_tokens=5, temperature=0, stop=full[1:3]
        )
        assert cut.choices[0].text == full[:1] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": [999999]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_completion_errors_name_the_field(server, patch, param):
    body = {"model": "quickstart", "prompt": "Hello", **patch}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_loglikelihoods_over_http_equal_the_direct_computation(server):
    """The lm-eval `local-completions` path without lm-eval: its exact request (echo, logprobs 1, max_tokens 1,
    token-id prompts batched) and its parsing, against log-likelihoods from one plain forward per prompt."""
    state = server.state
    tok = state.base.tokenizer
    rows = [json.loads(line) for line in open("examples/lm_eval/capitals_mc.jsonl")][:8]
    prompts, ctxlens, gold = [], [], []
    for row in rows:
        ctx = tok.encode(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)
        for choice in row["choices"]:
            cont = tok.encode(f" {choice}", add_special_tokens=False)
            prompts.append(ctx + cont)
            ctxlens.append(len(ctx))
        gold.append(row["label"])
    body = {"model": "quickstart", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    http_ll = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens, strict=True):
        http_ll.append(sum(choice["logprobs"]["token_logprobs"][ctxlen:-1]))
    direct_ll = []
    for ids, ctxlen in zip(prompts, ctxlens, strict=True):
        ref = _log_softmax(state, ids)
        direct_ll.append(sum(float(ref[i - 1, ids[i]]) for i in range(ctxlen, len(ids))))
    assert http_ll == pytest.approx(direct_ll, abs=5e-3)

    def accuracy(ll):
        picks = [max(range(4), key=lambda j, i=i: ll[4 * i + j]) for i in range(len(rows))]
        return sum(p == g for p, g in zip(picks, gold, strict=True)) / len(rows)

    assert accuracy(http_ll) == accuracy(direct_ll)


# ------------------------------------------------------------------------------------------- structured output
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "blue"]},
    },
    "required": ["name", "age", "ok", "color"],
    "additionalProperties": False,
}


def test_json_mode_parses_on_the_random_base(client, server):
    for temperature in (0, 1.0):
        r = client.chat.completions.create(
            model=server.state.served_name,
            messages=JAPAN,
            temperature=temperature,
            seed=3,
            n=2,
            max_tokens=200,
            response_format={"type": "json_object"},
        )
        for c in r.choices:
            assert isinstance(json.loads(c.message.content), dict), c.message.content


def test_json_schema_output_validates_streamed_and_not(client, server):
    validator = jsonschema_rs.validator_for(PERSON)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    for temperature in (0, 1.0):
        r = client.chat.completions.create(
            model=server.state.served_name,
            messages=JAPAN,
            temperature=temperature,
            seed=5,
            max_tokens=200,
            response_format=fmt,
        )
        assert validator.is_valid(json.loads(r.choices[0].message.content)), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="quickstart", messages=JAPAN, temperature=0, max_tokens=200, response_format=fmt, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert validator.is_valid(json.loads(text)), text


def test_sdk_parse_and_vllm_guided_fields(client, server):
    class Person(BaseModel):
        name: str = Field(max_length=8)
        ok: bool

    parsed = client.chat.completions.parse(
        model=server.state.served_name, messages=JAPAN, temperature=0, max_tokens=100, response_format=Person
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)
    r = client.chat.completions.create(
        model=server.state.served_name,
        messages=JAPAN,
        temperature=1.0,
        seed=1,
        max_tokens=20,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(
        model=server.state.served_name,
        prompt="Number:",
        temperature=1.0,
        seed=2,
        max_tokens=20,
        extra_body={"guided_regex": "[0-9]{3}"},
    )
    assert len(r.choices[0].text) == 3 and r.choices[0].text.isdigit()
    bad = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "messages": JAPAN,
            "max_tokens": 30,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
        },
        timeout=60,
    )
    assert bad.status_code == 200  # no schema: any JSON, as OpenAI
    bad = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": JAPAN, "response_format": {"type": "json_schema"}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format.json_schema"


# ------------------------------------------------------------------------------------------- sampling extras
def test_sampling_extras_change_the_answer_as_documented(client, server):
    state = server.state
    greedy = client.chat.completions.create(model="quickstart", messages=JAPAN, temperature=0, max_tokens=8)
    assert greedy.choices[0].message.content == "Tokyo"
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.chat.completions.create(
            model="quickstart", messages=JAPAN, temperature=1.5, seed=4, max_tokens=8, extra_body=extra
        )
        assert r.choices[0].message.content == "Tokyo", extra
    first = state.base.tokenizer.encode("Tokyo", add_special_tokens=False)[0]
    r = client.chat.completions.create(
        model="quickstart", messages=JAPAN, temperature=0, max_tokens=8, extra_body={"stop_token_ids": [first]}
    )
    assert r.choices[0].message.content == "" and r.choices[0].model_extra["stop_reason"] == first
    r = client.chat.completions.create(
        model="quickstart",
        messages=JAPAN,
        temperature=0,
        max_tokens=8,
        stop=["ky"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert r.choices[0].message.content == "Toky"
    r = client.chat.completions.create(
        model="quickstart", messages=JAPAN, temperature=0, max_tokens=6, extra_body={"min_tokens": 4}
    )
    assert r.usage.completion_tokens >= 4
    forced = state.base.tokenizer.encode("Paris", add_special_tokens=False)[0]
    r = client.chat.completions.create(
        model="quickstart", messages=JAPAN, temperature=0, max_tokens=3, logit_bias={str(forced): 100}
    )
    assert r.choices[0].message.content.startswith("Paris")
    r = client.chat.completions.create(
        model=state.served_name,
        messages=JAPAN,
        temperature=0,
        max_tokens=12,
        extra_body={"repetition_penalty": 1.5, "skip_special_tokens": False},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "name, value, bad",
    [("logit_bias", {"5000000": 1}, 5000000), ("stop_token_ids", [3, 5000001], 5000001)],
    ids=["bias", "stop"],
)
def test_token_ids_outside_the_vocabulary_are_a_400_naming_the_field(server, name, value, bad):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": JAPAN, "max_tokens": 1, name: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and f"token id {bad} is outside the vocabulary" in error["message"]


REFUSED = [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("use_beam_search", True),
    ("best_of", 2),
    ("echo", True),
    ("allowed_token_ids", [1, 2]),
    ("chat_template", "{{ x }}"),
    ("add_generation_prompt", False),
    ("guided_grammar", "root ::= 'a'"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
]


@pytest.mark.parametrize("name, value", REFUSED, ids=[r[0] for r in REFUSED])
def test_unimplemented_fields_are_refused_by_name(server, name, value):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": JAPAN, "max_tokens": 1, name: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"]


def test_harmless_fields_are_accepted(client):
    r = client.chat.completions.create(
        model="quickstart",
        messages=JAPAN,
        temperature=0,
        max_tokens=8,
        modalities=["text"],
        store=False,
        metadata={"k": "v"},
        user="u1",
        service_tier="auto",
        tool_choice="none",
        parallel_tool_calls=False,
        extra_body={"some_future_field": 1},
    )
    assert r.choices[0].message.content == "Tokyo"


def test_a_request_the_kv_budget_can_never_hold_is_a_400(make_server):
    small = make_server(adapters=[], kv_cache_gb=1e-7)
    for path, body in (
        ("/v1/chat/completions", {"messages": JAPAN, "max_tokens": 4}),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
    ):
        r = httpx.post(small.url + path, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "--kv-cache-gb" in r.json()["error"]["message"]


def test_strict_refuses_schema_keywords_the_grammar_cannot_enforce(server):
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "if": {"type": "object"}}
    for strict, status in ((True, 400), (False, 200)):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": strict, "schema": schema}}
        # greedy: a sampled answer on the random base may spend its 20 tokens on the whitespace JSON allows
        body = {"messages": JAPAN, "max_tokens": 20, "response_format": fmt, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["param"] == "response_format.json_schema.schema"
            assert "if" in r.json()["error"]["message"]
        else:
            assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["a"], bool)

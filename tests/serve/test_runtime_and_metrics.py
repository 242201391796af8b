"""Runtime adapters (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter) and GET /metrics, through HTTP and
the openai SDK, on a server started with the base only."""

from __future__ import annotations

import json
import shutil
import threading

import httpx
import openai
import pytest

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
KEY = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-adapters")
    shutil.copytree(trained.adapter_dir, root / "qs")
    other = shutil.copytree(trained.adapter_dir, root / "other-base")
    manifest = json.loads((other / "toolkit.json").read_text())
    manifest["base"]["fingerprint"] = "0" * 16
    (other / "toolkit.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def rt(make_server, folder):
    return make_server(adapters=[], adapters_dir=str(folder), allow_runtime_adapters=True, api_key="k")


def _load(server, name, path, headers=KEY):
    return httpx.post(
        server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=headers, timeout=120
    )


def _unload(server, name):
    return httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=KEY, timeout=120)


def test_runtime_loading_is_off_by_default(make_server, folder):
    plain = make_server()
    r = httpx.post(plain.url + "/v1/load_lora_adapter", json={"lora_name": "qs", "lora_path": "qs"})
    assert r.status_code == 404 and "--allow-runtime-adapters" in r.json()["error"]["message"]


def test_paths_keys_and_fingerprints_are_checked(rt, folder):
    assert _load(rt, "qs", "qs", headers={}).status_code == 401
    for path in ("../qs", str(folder.parent), "/etc", "qs\x00", "x" * 5000):  # the last two: 500s found by fuzzing
        r = _load(rt, "x", path)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text)
    r = _load(rt, "other", "other-base")
    assert r.status_code == 400 and "trained on base" in r.json()["error"]["message"]
    r = _load(rt, "../evil", "qs")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    assert _unload(rt, "never-loaded").status_code == 404


def test_an_unreadable_manifest_is_a_400_and_the_document_still_builds(rt, folder, trained):
    """Found in review: a toolkit.json that is not JSON made the load, and /openapi.json (which lists the loadable
    folders), a 500."""
    broken = shutil.copytree(trained.adapter_dir, folder / "broken")
    (broken / "toolkit.json").write_text("not json")
    try:
        r = _load(rt, "broken", "broken")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter", r.text
        doc = httpx.get(rt.url + "/openapi.json")
        assert doc.status_code == 200
        assert doc.json()["components"]["schemas"]["LoadLoraRequest"]["properties"]["lora_path"]["enum"] == ["qs"]
    finally:
        shutil.rmtree(broken)


def test_load_serve_unload_with_a_request_in_flight(rt):
    client = openai.OpenAI(base_url=rt.url + "/v1", api_key="k", max_retries=0)
    base_name = rt.state.served_name
    before = client.chat.completions.create(model=base_name, messages=JAPAN, temperature=0, max_tokens=6)
    r = _load(rt, "qs", "qs")
    assert r.status_code == 200 and "qs" in r.text
    assert _load(rt, "qs", "qs").status_code == 400  # already loaded
    assert {m.id for m in client.models.list().data} == {base_name, "qs"}
    assert client.chat.completions.create(model="qs", messages=JAPAN, temperature=0).choices[0].message.content == (
        "Tokyo"
    )
    after = client.chat.completions.create(model=base_name, messages=JAPAN, temperature=0, max_tokens=6)
    assert after.choices[0].message.content == before.choices[0].message.content  # the base is still the base

    args = dict(model="qs", messages=JAPAN, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    expected = client.chat.completions.create(**args).choices[0].message.content
    chunks, started = [], threading.Event()

    def consume():
        for c in client.chat.completions.create(stream=True, **args):
            chunks.append(c)
            started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(120)
    assert _unload(rt, "qs").status_code == 200  # while the stream runs
    t.join(180)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="qs", messages=JAPAN)
    assert {m.id for m in client.models.list().data} == {base_name}
    assert _load(rt, "qs", "qs").status_code == 200  # loaded again under the same name
    assert client.chat.completions.create(model="qs", messages=JAPAN, temperature=0).choices[0].message.content == (
        "Tokyo"
    )


def _samples(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def _generated(samples: dict) -> float:
    return sum(s.value for s in samples.get("toolkit_generation_tokens_total", []))


def test_metrics_scrape_in_prometheus_format(rt):
    client = openai.OpenAI(base_url=rt.url + "/v1", api_key="k", max_retries=0)
    before = _generated(_samples(rt))
    chat = client.chat.completions.create(model=rt.state.served_name, messages=JAPAN, temperature=0, max_tokens=4)
    text = client.completions.create(model=rt.state.served_name, prompt="Hello", temperature=0, max_tokens=3)
    stop = client.chat.completions.create(  # <end_of_turn> (106) first: a choice that is its stop token alone
        model=rt.state.served_name, messages=JAPAN, max_tokens=4, logit_bias={"106": 100}
    )
    assert stop.choices[0].finish_reason == "stop" and stop.usage.completion_tokens == 1
    httpx.post(rt.url + "/v1/chat/completions", json={"messages": JAPAN, "model": "nope"}, headers=KEY)
    samples = _samples(rt)
    # generated tokens as usage counts them, stop tokens included
    used = chat.usage.completion_tokens + text.usage.completion_tokens + stop.usage.completion_tokens
    assert _generated(samples) - before == used
    ok = [s for s in samples["toolkit_requests_total"] if s.labels["status"] == "200"]
    assert {s.labels["endpoint"] for s in ok} >= {"/v1/chat/completions", "/v1/completions"}
    missing = [s.labels["model"] for s in samples["toolkit_requests_total"] if s.labels["status"] == "404"]
    assert "unknown" in missing and "nope" not in missing  # one series for every unknown name
    assert sum(s.value for s in samples["toolkit_prompt_tokens_total"]) > 0
    assert sum(s.value for s in samples["toolkit_generation_tokens_total"]) >= 4
    assert sum(s.value for s in samples["toolkit_time_to_first_token_seconds_count"]) >= 2
    assert sum(s.value for s in samples["toolkit_time_per_output_token_seconds_count"]) >= 3
    for gauge in ("toolkit_num_requests_waiting", "toolkit_num_requests_running", "toolkit_kv_cache_bytes_used"):
        assert gauge in samples


def test_requests_are_counted_by_route_template_not_by_raw_path(rt):
    """A label per response id (or per mistyped URL) would grow the registry without bound: GET /v1/responses/{id}
    counts under its route's template, and a path no route matches under one fixed label."""
    from prometheus_client.parser import text_string_to_metric_families

    ids = ("resp_metricsprobe1", "resp_metricsprobe2")
    for response_id in ids:
        assert httpx.get(f"{rt.url}/v1/responses/{response_id}", headers=KEY).status_code == 404
    assert httpx.get(rt.url + "/v1/no-such-endpoint/metricsprobe3", headers=KEY).status_code == 404
    r = httpx.get(rt.url + "/metrics")
    assert not any(probe in r.text for probe in ("metricsprobe", "no-such-endpoint")), r.text
    counted = {
        s.labels["endpoint"]: s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == "toolkit_requests_total" and s.labels["status"] == "404"
    }
    assert counted["/v1/responses/{response_id}"] == 2
    assert counted["unmatched"] == 1

"""The KV budget seen through the server: a request that can never fit is refused with a 400, others are served."""

from __future__ import annotations


def test_a_request_too_large_for_the_kv_budget_gets_a_400_and_the_server_keeps_serving(make_server):
    import httpx

    server = make_server(kv_cache_gb=0.001)  # about 1 MiB: the tiny base holds 4 KiB a token (4 layers, fp32)
    body = {"model": "quickstart", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 1000}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "--kv-cache-gb" in error["message"]
    ok = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 8}, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    engine = httpx.get(server.url + "/health", timeout=10).json()["engine"]
    assert engine["kv_bytes_budget"] == int(0.001 * 2**30) and engine["running"] == 0

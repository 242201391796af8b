"""`toolkit serve`'s engine in a process of its own (serve/engine_process.py): what crosses the process boundary
and what happens when the engine's process fails. The other server tests run on the same default, so chat,
streaming, cancellation, structured output and runtime adapters are exercised across it there."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from toolkit.errors import ToolkitError

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


def test_the_engine_runs_in_another_process_and_the_server_holds_no_model(server):
    engine = server.state.engine
    assert engine.pid != os.getpid() and engine.alive
    assert server.state.base.model is None and server.state.base.kernel  # the child's kernel, reported back
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": JAPAN, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert engine.stats["completion_tokens"] >= 3  # the child's stats arrive with its events


def test_a_startup_error_in_the_engine_process_reaches_the_caller_whole(tiny_ct):
    from toolkit.serve.app import build_state

    with pytest.raises(ToolkitError, match="no_such_kernel") as info:
        build_state(base=str(tiny_ct), adapters=[], device="cpu", kernel="no_such_kernel")
    assert info.value.where == "kernel" and "use auto" in info.value.fix  # where and fix survive the crossing


def test_when_the_engine_process_dies_requests_end_and_health_says_so(make_server):
    s = make_server(adapters=[])
    engine = s.state.engine
    with httpx.stream(
        "POST",
        s.url + "/v1/chat/completions",
        json={"messages": JAPAN, "max_tokens": 3000, "temperature": 0, "stream": True},
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        next(lines)  # the role delta: the request is running
        os.kill(engine.pid, signal.SIGKILL)
        started = time.monotonic()
        rest = [line for line in lines if line]  # the stream ends instead of hanging
    assert time.monotonic() - started < 30
    errors = [line for line in rest if '"error"' in line]  # the stream says why, then ends as streams end
    assert len(errors) == 1 and '"engine_gone"' in errors[0] and rest[-1] == "data: [DONE]"
    deadline = time.monotonic() + 10
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    after = httpx.post(s.url + "/v1/chat/completions", json={"messages": JAPAN, "max_tokens": 2}, timeout=10)
    assert after.status_code == 503 and after.json()["error"]["code"] == "engine_gone"
    health = httpx.get(s.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "engine process exited"


def test_the_engine_process_starts_without_third_party_log_lines(tiny_ct, capfd):
    """The child writes to the server's terminal: a quiet start there, as the CLI's own (quiet.py)."""
    from toolkit.serve.engine_process import EngineClient, EngineSpec

    capfd.readouterr()
    engine = EngineClient(EngineSpec(base=str(tiny_ct), adapters=[], device="cpu"))
    engine.close()
    assert capfd.readouterr().err == ""

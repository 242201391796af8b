"""Schema fuzzing: Schemathesis's `st run` over the server's own /openapi.json, as a user runs it.

bench/fuzz.py's `fuzz` runs `st run URL/openapi.json --checks not_a_server_error` on every operation and phase
(examples, coverage, fuzzing, stateful), positive and negative data, with a fixed seed and a bounded number of
examples per operation (one worker, no example database, no Schemathesis cache: the same requests every run),
then reads its JSON and NDJSON reports; the routes the document leaves out (FastAPI's docs pages) get
every method with odd queries and bodies. `.venv/bin/python bench/fuzz.py` is the long version.
"""

from __future__ import annotations

import shutil
import sys

import pytest
from helpers import ROOT

EXAMPLES = 100  # per operation and phase: st run takes 15-25 s on 2 cores (the coverage phase adds ~1,700 cases)
GENERATING = ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses")


@pytest.fixture(scope="module")
def server(make_server, trained, tmp_path_factory):
    """A small token limit keeps accepted requests fast; a 1 MiB body limit makes 413 cheap to reach; runtime
    adapters on, with one adapter folder to load, so load and unload are fuzzed past their off switch."""
    adapters = tmp_path_factory.mktemp("fuzz-adapters")
    shutil.copytree(trained.adapter_dir, adapters / "qs")
    return make_server(max_tokens_limit=8, max_body_mb=1.0, allow_runtime_adapters=True, adapters_dir=str(adapters))


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    """One Schemathesis run for the module's tests; `found(kind)` says what it found of that kind."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fuzz

    workdir = tmp_path_factory.mktemp("schemathesis")
    with fuzz.server_tracebacks() as tracebacks:
        result = fuzz.fuzz(server.url, workdir, max_examples=EXAMPLES, seed=0, app=server.server.config.app)

    def found(kind: str) -> str:
        paragraphs = fuzz.problems(result, tracebacks, kinds=(kind,))
        return "\n\n".join([*paragraphs, f"(`{result['command']}`; its reports and output: {workdir})"])

    result["found"], result["tracebacks"] = found, tracebacks
    return result


def test_no_5xx_on_any_operation_or_route(run):
    assert not (run["server_errors"] or run["failures"] or run["tracebacks"]), run["found"]("5xx")
    assert run["healthy_after"], run["found"]("5xx")


def test_every_4xx_carries_the_openai_error_envelope(run):
    assert not run["bare_4xx"], run["found"]("envelope")


def test_schemathesis_reports_no_schema_validation_mismatch(run):
    """Schemathesis's warning when an operation refused every positive case of a phase on its data: the published
    schema is looser than the server's validation (what a client generator builds from it would be refused)."""
    assert not run["mismatch"], run["found"]("mismatch")
    # Schemathesis's opt-in warning for an operation that accepted under 20% of its positive cases (unloading an
    # adapter is left out: which names exist depends on the loads before it, which no schema can say)
    low = set(run["warnings"].get("low_valid_rate", [])) & set(GENERATING)
    assert not low, run["warnings"]


def test_the_run_covers_every_operation_and_route_and_reaches_the_model(run):
    assert not (run["errors"] or run["untested"]), run["found"]("coverage")
    assert run["cases"] >= 1000, run["cases"]
    documented = {op.split()[1] for op in run["operations"]}
    assert {op.split()[1] for op in GENERATING} <= documented
    every = {"/health", "/metrics", "/v1/models", "/v1/responses/{response_id}", "/v1/load_lora_adapter"}
    assert every <= documented | set(run["unlisted_routes"])  # through Schemathesis or the probes
    for op in GENERATING:  # fuzzed fields reached generation, and fuzzed bodies reached the checks
        positive = run["positive"].get(op, {})
        accepted = positive.get("accepted", 0)
        assert accepted > 0, f"no positive case of {op} accepted: {positive}\n{run['found']('mismatch')}"
        assert any(key.startswith(f"{op} negative 4") for key in run["statuses"]), op

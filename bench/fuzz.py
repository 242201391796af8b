"""Schema fuzzing of `toolkit serve` with Schemathesis's own `st run`, driven by the server's own /openapi.json.

    .venv/bin/python bench/fuzz.py [--cases 1000] [--seed 0] [--adapter NAME=DIR]...

Builds the seeded tiny base, starts the server on 127.0.0.1 (`--max-tokens-limit 8` so accepted requests stay fast,
`--max-body-mb 1`; with an adapter, `--allow-runtime-adapters` and a copy of it to load), and runs what a user runs
against it:

    st run URL/openapi.json --checks not_a_server_error --seed S --max-examples N --workers 1 ...

every operation of the document, every phase (examples, coverage, fuzzing, stateful), positive and negative
data, with a fixed seed, no Hypothesis example database and no Schemathesis cache, so a run is repeatable. Then
from its JSON and NDJSON reports: no response of 500 or more, every 4xx in OpenAI's error envelope
{"error": {"message", "type", "param", "code"}}, no "Schema validation mismatch" warning (the schema a client
generator reads must not be looser than the server's validation), every operation tested. Routes the document
leaves out (FastAPI's docs pages) get every method with odd query strings and bodies, under the same
rules; /health must answer 200 after. Prints the findings and writes the counts to docs/SECURITY.md ("## Fuzzing
record"). tests/serve/test_fuzz.py runs the same `fuzz` with a small budget; this is the long version.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECKS = ("not_a_server_error",)
PHASES = ("examples", "coverage", "fuzzing", "stateful")
ENVELOPE = {"message", "type", "param", "code"}
# Schemathesis leaves these out when it decides whether positive data was rejected on its content
# (schemathesis/cli/commands/run/warnings.py, StatusCodeStatistic._get_4xx_breakdown)
NOT_ABOUT_THE_DATA = {401, 403, 404, 409, 429}
# what the long run sends to routes missing from /openapi.json (every method, odd queries and bodies)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ODD_QUERIES = ("", "?a=1", "?x=%00%ff&x=&%5B%5D=%7B")
ODD_BODIES = (None, b"{}", b'{"messages": [{}]}', b"\xff\xfe", b"[" * 2000)


def st_command(
    schema_url: str, report_dir: Path, *, max_examples: int, seed: int, mode: str = "all", phases=PHASES
) -> list[str]:
    """`st run` as a user types it, pinned down: one worker (requests in order, so the server's answers and with
    them Schemathesis's learning from error messages are the same every run), a fixed seed, no example database
    (Hypothesis would replay failures saved by earlier runs) and a config file that turns Schemathesis's cache
    off (it replays requests and observations across runs). Every warning is on, the opt-in low valid-input rate
    too (under 20% of an operation's positive cases accepted)."""
    from schemathesis.core.warnings import SchemathesisWarning

    config = report_dir / "schemathesis.toml"
    shown = ", ".join(f'"{w.value}"' for w in SchemathesisWarning)
    config.write_text(f"[cache]\nenabled = false\n\n[warnings]\ndisplay = [{shown}]\n")
    return [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", schema_url),
        *("--checks", ",".join(CHECKS), "--phases", ",".join(phases), "--mode", mode),
        *("--seed", str(seed), "--max-examples", str(max_examples), "--workers", "1"),
        *("--generation-database", "none", "--continue-on-failure", "--request-timeout", "120", "--no-color"),
        *("--report", "json,ndjson", "--report-dir", str(report_dir)),
        *("--report-json-path", str(report_dir / "run.json")),
        *("--report-ndjson-path", str(report_dir / "events.ndjson")),
    ]


def _text(value) -> str | None:
    """A body as the NDJSON report stores it (bytes as {"$base64": ...}) back to text."""
    if value is None:
        return None
    if isinstance(value, dict) and "$base64" in value:
        return base64.b64decode(value["$base64"]).decode("utf-8", "replace")
    return value if isinstance(value, str) else json.dumps(value)


def _interactions(ndjson: Path):
    """Every request Schemathesis sent, with its operation (the scenario's, or the case's own in the stateful
    phase), phase, generation mode, coverage scenario and the response."""
    with ndjson.open() as lines:
        for line in lines:
            if not line.startswith('{"ScenarioFinished"'):
                continue
            event = json.loads(line)["ScenarioFinished"]
            recorder = event.get("recorder", {})
            for case_id, node in recorder.get("cases", {}).items():
                interaction = recorder.get("interactions", {}).get(case_id)
                if interaction is None:
                    continue
                case = node["value"]
                meta = case.get("meta") or {}
                phase = (meta.get("phase") or {}).get("name", event.get("phase"))
                stateful = event.get("phase") == "stateful"
                request, response = interaction["request"], interaction.get("response")
                yield {
                    "operation": f"{case['method']} {case['path']}" if stateful else recorder.get("label"),
                    "phase": phase,
                    "mode": (meta.get("generation") or {}).get("mode", "?"),
                    "scenario": ((meta.get("phase") or {}).get("data") or {}).get("description", ""),
                    "method": request["method"],
                    "url": request["uri"],
                    "headers": {k: v[0] for k, v in request.get("headers", {}).items()},
                    "body": _text(request.get("body")),
                    "status": response["status_code"] if response else None,
                    "response": _text(response.get("content")) if response else None,
                }


def envelope_problem(status: int | None, text: str | None, method: str = "GET") -> str | None:
    """Why a response breaks the rules (None when it keeps them): below 500, and a 4xx in OpenAI's envelope."""
    if status is None:
        return "no response (connection error or timeout)"
    if status >= 500:
        return f"{status}"
    if status < 400 or method == "HEAD":
        return None
    try:
        error = json.loads(text or "")["error"]
        assert set(error) == ENVELOPE and isinstance(error["message"], str) and error["message"]
    except Exception:
        return f"{status} without the error envelope"
    return None


def curl(record: dict) -> str:
    """The request as a command line that reproduces it."""
    parts = [f"curl -X {record['method']} '{record['url']}'"]
    parts += [f"-H '{k}: {v}'" for k, v in record["headers"].items()]
    if record["body"] is not None:
        parts.append("-d " + json.dumps(record["body"][:2000]))
    return " ".join(parts)


def _message(text: str | None) -> str:
    try:
        return json.loads(text or "")["error"]["message"]
    except Exception:
        return (text or "")[:200]


def probe_unlisted(url: str, paths: list[str]) -> list[dict]:
    """Every method, with odd query strings and bodies, to routes that /openapi.json leaves out (Schemathesis
    sees only the document)."""
    import httpx

    records = []
    with httpx.Client(timeout=60) as client:
        for path in paths:
            for method in METHODS:
                for query in ODD_QUERIES:
                    for body in ODD_BODIES if method not in ("GET", "HEAD") else (None,):
                        headers = {"content-type": "application/json"} if body is not None else {}
                        try:
                            r = client.request(method, url + path + query, content=body, headers=headers)
                            status, text = r.status_code, r.text
                        except httpx.HTTPError:
                            status, text = None, None
                        records.append(
                            {
                                "operation": f"{path} (not in /openapi.json: every method)",
                                "phase": "probe",
                                "mode": "negative" if query or body else "positive",
                                "scenario": "",
                                "method": method,
                                "url": url + path + query,
                                "headers": headers,
                                "body": body.decode("utf-8", "replace") if body is not None else None,
                                "status": status,
                                "response": text,
                            }
                        )
    return records


def fuzz(
    url: str, workdir: Path, *, max_examples: int, seed: int = 0, app=None, mode: str = "all", phases=PHASES
) -> dict:
    """Run `st run` over `url`/openapi.json (see `st_command`) and read its reports; with the server's FastAPI
    `app`, probe the routes the document leaves out too. Returns the run's findings (see `problems`)."""
    import httpx

    workdir.mkdir(parents=True, exist_ok=True)
    command = st_command(url + "/openapi.json", workdir, max_examples=max_examples, seed=seed, mode=mode, phases=phases)
    t = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    (workdir / "st-output.txt").write_text(done.stdout + done.stderr)
    report = json.loads((workdir / "run.json").read_text()) if (workdir / "run.json").exists() else {}
    records = list(_interactions(workdir / "events.ndjson")) if (workdir / "events.ndjson").exists() else []
    schema = httpx.get(url + "/openapi.json", timeout=30).json()
    operations = sorted(f"{m.upper()} {p}" for p, item in schema["paths"].items() for m in item)
    unlisted = sorted({r.path for r in app.routes} - set(schema["paths"])) if app is not None else []
    records += probe_unlisted(url, unlisted)

    statuses: Counter = Counter()
    rejected: dict[str, Counter] = defaultdict(Counter)  # positive data refused on its content, by message
    samples: dict[tuple[str, str], list[dict]] = defaultdict(list)
    positive: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        statuses[f"{r['operation']} {r['mode']} {r['status']}"] += 1
        if r["mode"] == "positive" and r["status"] is not None and r["phase"] != "probe":
            positive[r["operation"]]["accepted" if r["status"] < 300 else str(r["status"])] += 1
            if 400 <= r["status"] < 500 and r["status"] not in NOT_ABOUT_THE_DATA:
                message = _message(r["response"])
                rejected[r["operation"]][message] += 1
                if len(samples[r["operation"], message]) < 3:
                    samples[r["operation"], message].append({"body": r["body"], "status": r["status"]})
    broken = [r | {"problem": p} for r in records if (p := envelope_problem(r["status"], r["response"], r["method"]))]
    warnings = {kind: labels for kind, labels in report.get("warnings", {}).items() if labels}
    tested = {r["operation"] for r in records if r["phase"] != "probe"}
    return {
        "command": "st " + " ".join(command[3:]),
        "exit_code": done.returncode,
        "seconds": seconds,
        "seed": seed,
        "max_examples": max_examples,
        "operations": operations,
        "untested": [op for op in operations if op not in tested],
        "unlisted_routes": unlisted,
        "cases": len(records),
        "statuses": dict(sorted(statuses.items(), key=lambda kv: str(kv[0]))),
        "server_errors": [r for r in broken if r["status"] is None or r["status"] >= 500],
        "bare_4xx": [r for r in broken if r["status"] is not None and r["status"] < 500],
        "failures": report.get("failures", []),
        "errors": report.get("errors", []) if report else [{"title": "no JSON report", "count": 1}],
        "mismatch": warnings.get("validation_mismatch", []),
        "warnings": warnings,
        "valid_rates": report.get("valid_rates", {}),
        "positive": {op: dict(c) for op, c in sorted(positive.items())},
        "rejected": {op: c.most_common() for op, c in sorted(rejected.items())},
        "rejected_samples": {f"{op} | {msg}": s for (op, msg), s in samples.items()},
        "healthy_after": httpx.get(url + "/health", timeout=30).status_code == 200,
        "st_tail": (done.stdout + done.stderr)[-3000:],
    }


KINDS = ("5xx", "envelope", "mismatch", "coverage")


def problems(result: dict, tracebacks: list[str] = (), kinds=KINDS) -> list[str]:
    """Every broken rule of `kinds` in `result`, one paragraph each: the operation, the request that reproduces it
    and what came back (with the server's tracebacks, when captured, after the 5xx)."""
    out = []
    if "5xx" in kinds:
        for r in result["server_errors"]:
            out.append(
                f"{r['status']} on {r['operation']} ({r['phase']}, {r['mode']}: {r['scenario']}):\n  {curl(r)}\n"
                f"  -> {(r['response'] or '')[:300]}"
            )
        out += ["server traceback (its end):\n" + "\n".join(tb.splitlines()[-8:]) for tb in dict.fromkeys(tracebacks)]
        for group in result["failures"]:
            out.append(f"Schemathesis failure {group.get('title')!r} x{group.get('count')}: {group.get('operations')}")
        if not result["healthy_after"]:
            out.append("/health did not answer 200 after the run")
    if "envelope" in kinds:
        for r in result["bare_4xx"]:
            out.append(f"{r['problem']} on {r['operation']}:\n  {curl(r)}\n  -> {(r['response'] or '')[:300]}")
    if "mismatch" in kinds:
        for op in result["mismatch"]:
            rates = ", ".join(
                f"{phase} {rate['accepted']} of {sum(rate.values())}"
                for phase, rate in result["valid_rates"].get(op, {}).items()
            )
            top = []
            for message, n in dict(result["rejected"]).get(op, [])[:10]:
                bodies = [s["body"] or "" for s in result["rejected_samples"].get(f"{op} | {message}", [])]
                sample = min(bodies, key=len, default="")
                top.append(f"    {n} x {message[:200]}\n        e.g. {sample[:300]}")
            out.append(
                f"Schema validation mismatch on {op} (positive cases accepted: {rates}; Schemathesis warns when a "
                "phase accepted none): the server's most frequent refusals of data its /openapi.json allows:\n"
                + "\n".join(top)
            )
    if "coverage" in kinds:
        for error in result["errors"]:
            out.append(f"Schemathesis error {error.get('title')!r} x{error.get('count')} (see st-output.txt)")
        if result["untested"]:
            out.append(f"operations Schemathesis did not test: {result['untested']}")
    return out


@contextlib.contextmanager
def server_tracebacks():
    """Tracebacks the server logs while the block runs (uvicorn logs every unhandled exception on
    `uvicorn.error`), for a server running in this process."""
    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info:
                found.append(logging.Formatter().format(record))

    handler = Keep(logging.ERROR)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


def record_section(result: dict) -> str:
    by_status: Counter = Counter()
    per_op: dict[str, Counter] = defaultdict(Counter)
    for key, count in result["statuses"].items():
        op, mode, status = key.rsplit(" ", 2)
        by_status[status] += count
        per_op[op][f"{mode} {status}"] += count
    fives = sum(c for s, c in by_status.items() if s.startswith("5") or s == "None")
    lines = [
        "## Fuzzing record (`bench/fuzz.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d')}: `st run` (Schemathesis {st_version()}) with "
        f"{result['max_examples']} examples per operation (seed {result['seed']}), every phase, positive and "
        f"negative data, {result['cases']} requests in {result['seconds']:.0f} s against `toolkit serve` on the "
        f"tiny base; {len(result['operations'])} operations in /openapi.json and "
        f"{len(result['unlisted_routes'])} routes outside it ({', '.join(result['unlisted_routes']) or 'none'}). "
        "Responses by status: " + ", ".join(f"{s}: {c}" for s, c in sorted(by_status.items())) + ". "
        f"5xx: {fives}. 4xx without the OpenAI envelope: {len(result['bare_4xx'])}. Schema validation mismatch: "
        f"{', '.join(result['mismatch']) or 'none'}. "
        f"Server healthy after: {'yes' if result['healthy_after'] else 'NO'}.",
        "",
        "| operation | responses (generation mode, status) |",
        "|---|---|",
        *[f"| {op} | {', '.join(f'{k}: {v}' for k, v in sorted(c.items()))} |" for op, c in sorted(per_op.items())],
        "",
    ]
    return "\n".join(lines)


def st_version() -> str:
    from importlib.metadata import version

    return version("schemathesis")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=1000, help="examples per operation (st run --max-examples)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", action="append", default=[], help="NAME=DIR of an adapter to serve beside the base")
    ap.add_argument("--out", default=str(ROOT / "docs" / "SECURITY.md"))
    ap.add_argument("--keep", help="folder for Schemathesis's reports (default: a temporary one)")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
    import report  # first, as every bench script: it quiets third-party log lines
    from helpers import LiveServer

    from toolkit.base import builder
    from toolkit.serve.app import build_state

    with tempfile.TemporaryDirectory() as tmp:
        base = builder.build(Path(tmp) / "tiny-ct", seed=0)
        # with an adapter, runtime loading is on too (a copy of each to load), so load/unload are fuzzed past 404
        loadable = Path(tmp) / "adapters"
        for spec in args.adapter:
            name, _, folder = spec.partition("=")
            shutil.copytree(folder, loadable / f"{name}-copy")
        state = build_state(
            base=str(base),
            adapters=args.adapter,
            device="cpu",
            max_tokens_limit=8,
            max_body_mb=1.0,
            allow_runtime_adapters=bool(args.adapter),
            adapters_dir=str(loadable),
        )
        server = LiveServer(state)
        try:
            with server_tracebacks() as tracebacks:
                workdir = Path(args.keep) if args.keep else Path(tmp) / "schemathesis"
                app = server.server.config.app
                result = fuzz(server.url, workdir, max_examples=args.cases, seed=args.seed, app=app)
        finally:
            server.stop()
    found = problems(result, tracebacks)
    print(result["st_tail"])
    print(json.dumps({k: result[k] for k in ("command", "cases", "warnings", "positive", "rejected")}, indent=1))
    print("\n\n".join(found) or "no problems")
    report.replace_section(Path(args.out), "## Fuzzing record", record_section(result))
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()

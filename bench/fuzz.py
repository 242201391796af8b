"""Schema fuzzing of `toolkit serve` with Schemathesis, driven by the server's own OpenAPI document.

    .venv/bin/python bench/fuzz.py [--cases 500] [--seed 0]

Starts the server on 127.0.0.1 (tiny base + the quickstart adapter, `--max-tokens-limit 8` so valid requests
stay fast), then sends generated requests to every operation: a third within the schema (positive), a third
outside it (negative: wrong types, out-of-range numbers, missing fields), and a third positive with a
well-formed conversation swapped in, so fuzzed sampling fields reach generation. Every response must be below 500
and every 4xx must carry the OpenAI error envelope; the server must still answer /health after. Prints the counts
and writes them to docs/SECURITY.md. tests/test_hardening.py runs the same `fuzz` function with fewer cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _with_messages(case, conversations: list):
    if isinstance(case.body, dict):
        case.body = {**case.body, "messages": conversations[len(str(case.body)) % len(conversations)]}
    return case


def _envelope_problem(response) -> str | None:
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:200]}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"]
            assert {"type", "param", "code"} <= set(error)
        except Exception:
            return f"{response.status_code} without the error envelope: {response.text[:200]}"
    return None


def _valid_conversations() -> list[list[dict]]:
    """Conversations the schema allows but a fuzzer rarely builds (role order is not expressible in OpenAPI), so a
    third of the budget reaches generation with fuzzed sampling fields."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
    }
    return [
        [{"role": "user", "content": "What is the capital of Japan?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Colour?"}, image]},
        ],
    ]


def _run(strategy, n: int, seed: int, key: str, url: str, statuses: Counter, problems: list) -> int:
    """Send `n` cases drawn from `strategy` (Hypothesis, derandomized by `seed`); count statuses, note problems."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    sent = 0

    @hseed(seed)
    @settings(
        max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @given(case=strategy)
    def run(case) -> None:
        nonlocal sent
        response = case.call(base_url=url, timeout=120)
        sent += 1
        statuses[f"{key} {response.status_code}"] += 1
        problem = _envelope_problem(response)
        if problem:
            problems.append(f"{key}: {problem}")

    run()
    return sent


def fuzz(url: str, cases: int, seed: int = 0) -> dict:
    """Send about `cases` generated requests; return counts by operation, mode and status, and problems."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(requests.get(url + "/openapi.json", timeout=30).json())
    operations = [op.ok() for op in schema.get_all_operations()]
    post = [op for op in operations if op.method.upper() == "POST"]
    others = [op for op in operations if op.method.upper() != "POST"]
    statuses: Counter = Counter()
    problems: list[str] = []
    sent = 0
    # nearly all of the budget goes to the one operation with a body; GET routes have no inputs to vary
    conversations = _valid_conversations()
    share = max(1, cases // (3 * len(post)))
    plan = [(op, mode, share, False) for op in post for mode in GenerationMode]
    plan += [(op, GenerationMode.POSITIVE, share, True) for op in post]
    plan += [(op, GenerationMode.POSITIVE, 3, False) for op in others]
    for op, mode, n, valid_messages in plan:
        strategy = op.as_strategy(generation_mode=mode)
        if valid_messages:
            strategy = strategy.map(lambda case: _with_messages(case, conversations))
        key = f"{op.method.upper()} {op.path} {mode.value}{' + valid messages' if valid_messages else ''}"
        sent += _run(strategy, n, seed, key, url, statuses, problems)
    healthy = requests.get(url + "/health", timeout=30).status_code == 200
    return {"cases": sent, "statuses": dict(sorted(statuses.items())), "problems": problems, "healthy_after": healthy}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", default=str(ROOT / "adapters" / "quickstart"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "SECURITY.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from report import replace_section
    from serve_load import start_server

    from toolkit.serve.app import build_state

    state = build_state(base=None, adapters=[f"quickstart={args.adapter}"], device="cpu", max_tokens_limit=8)
    server, url = start_server(state)
    t = time.perf_counter()
    result = fuzz(url, args.cases, args.seed)
    seconds = time.perf_counter() - t
    server.should_exit = True
    state.engine.close()
    print(json.dumps(result, indent=2))
    by_status: Counter = Counter()
    for key, count in result["statuses"].items():
        by_status[key.rsplit(" ", 1)[1]] += count
    lines = [
        "## Fuzzing record (`bench/fuzz.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d')}: {result['cases']} generated requests (seed {args.seed}) in {seconds:.0f} s "
        "against `toolkit serve` on the tiny base with the quickstart adapter. Responses by status: "
        + ", ".join(f"{s}: {c}" for s, c in sorted(by_status.items()))
        + f". 5xx responses: {sum(c for s, c in by_status.items() if s.startswith('5'))}. "
        f"4xx without the OpenAI envelope: {sum('without the error envelope' in p for p in result['problems'])}. "
        f"Server healthy after: {'yes' if result['healthy_after'] else 'NO'}.",
        "",
        "| operation, generation mode, status | responses |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in result["statuses"].items()],
        "",
    ]
    replace_section(Path(args.out), "## Fuzzing record", "\n".join(lines))
    sys.exit(1 if result["problems"] or not result["healthy_after"] else 0)


if __name__ == "__main__":
    main()

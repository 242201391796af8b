"""Server memory while one long prompt is served: peak resident memory over the idle server's.

    .venv/bin/python bench/prompt_memory.py [--base DIR] [--tokens 7000,30000] [--out docs/BENCHMARKS.md]

Starts `toolkit serve` on the base (default: the real Gemma 3 270M base, built or taken from the per-machine
cache), sends one short request (warm-up), reads the idle resident memory, then for each prompt length sends one
greedy request whose prompt is that many tokens of held-out English (standard-library docstrings) and samples the
server's resident memory (/proc/PID/status VmRSS, every 20 ms) until the answer arrives. Goal (issue R2 6/6): one
7k-token prompt peaks at <= idle + 1.5 GB; a 30k-token prompt is served without exhausting memory. The answer is
printed too (a real base answers the question after the text). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from peer_serve import Server, free_port  # noqa: E402
from report import cpus, replace_section  # noqa: E402

QUESTION = "\n\nIn one word: which programming language is the text above about?"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def prompt_of(tokenizer, text: str, tokens: int) -> str:
    """About `tokens` tokens of `text` (repeated if short), cut on a token boundary, then the question."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return tokenizer.decode(ids[:tokens]) + QUESTION


def ask(server: Server, prompt: str, max_tokens: int) -> dict:
    import httpx

    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": max_tokens}, timeout=3600)
    r.raise_for_status()
    return r.json()


def measure(server: Server, prompt: str, max_tokens: int) -> dict:
    """Serve one request while sampling the server's resident memory; peak, answer, prompt tokens, seconds."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes(server.proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    try:
        out = ask(server, prompt, max_tokens)
    finally:
        stop.set()
        sampler.join()
    return {
        "seconds": time.perf_counter() - t,
        "peak": peak[0],
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "answer": out["choices"][0]["message"]["content"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="base folder (default: the real 270M base from the per-machine cache)")
    ap.add_argument("--tokens", default="7000,30000", help="prompt lengths, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", help="write the section into this BENCHMARKS.md")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from toolkit.base import real_weights

    base = Path(args.base) if args.base else real_weights.cached_base(progress=print)
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = real_weights.heldout_text()
    port = free_port()
    command = [sys.executable, "-m", "cli", "serve", "--base", str(base), "--port", str(port), "--device", "cpu"]
    server = Server("toolkit", command, port, base.name)
    results = []
    try:
        server.wait_ready()
        ask(server, "Hello!", 4)  # warm-up: first-request allocations belong to the idle figure
        time.sleep(1)
        idle = rss_bytes(server.proc.pid)
        for n in (int(x) for x in args.tokens.split(",")):
            r = measure(server, prompt_of(tokenizer, text, n), args.max_tokens)
            r["over_idle"] = r["peak"] - idle
            results.append(r)
            print(
                f"{r['prompt_tokens']:>6} prompt tokens: {r['seconds']:.1f} s, peak RSS {r['peak'] / 2**30:.2f} GB "
                f"= idle {idle / 2**30:.2f} GB + {r['over_idle'] / 2**30:.2f} GB; answer {r['answer']!r}",
                flush=True,
            )
    finally:
        server.stop()
    summary = {"base": str(base), "idle": idle, "results": results}
    print(json.dumps(summary))
    first = results[0]
    print(
        f"peak over idle, {first['prompt_tokens']}-token prompt: {first['over_idle'] / 2**30:.2f} GB "
        f"(goal <= 1.5 GB: {'met' if first['over_idle'] <= 1.5 * 2**30 else 'NOT met'})"
    )
    if args.out:
        rows = [
            f"| {r['prompt_tokens']:,} | {r['seconds']:.1f} s | {r['peak'] / 2**30:.2f} GB | "
            f"+{r['over_idle'] / 2**30:.2f} GB | {r['answer']!r} |"
            for r in results
        ]
        section = "\n".join(
            [
                "## Long-prompt serving memory (`bench/prompt_memory.py`)",
                "",
                f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU ({cpus()} cores), `toolkit serve` on "
                f"{base.name} (the real Gemma 3 270M base unless named otherwise), one greedy request at a time, "
                f"max_tokens {args.max_tokens}; resident memory of the server process sampled every 20 ms. "
                f"Idle (after one short request): {idle / 2**30:.2f} GB. Goal: a 7k-token prompt peaks at "
                "<= idle + 1.5 GB (round one's engine: +8.0 GB, the logits of every prompt position).",
                "",
                "| prompt tokens | time | peak RSS | over idle | answer |",
                "|---|---|---|---|---|",
                *rows,
                "",
            ]
        )
        replace_section(Path(args.out), "## Long-prompt serving memory", section)


if __name__ == "__main__":
    main()

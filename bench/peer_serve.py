"""`toolkit serve` against the servers a user would pick instead, same base, same chat requests, alternating.

    .venv/bin/python bench/peer_serve.py [--base DIR] [--llama-cpp GGUF] [--clients 1,16] [--repeats 3]
                                         [--max-tokens 32] [--out docs/BENCHMARKS.md]

Peers, each in its own process on 127.0.0.1, started once and kept up while the rounds alternate:
  - `transformers serve --continuous-batching` (the transformers CLI in the venv) on the same GPTQ-layout folder
    (without --base: the tiny base built with `toolkit tiny-base DIR --format gptq`)
  - with --llama-cpp GGUF: llama.cpp's OpenAI server (`python -m llama_cpp.server --chat_format gemma`, from
    llama-cpp-python[server], a dev-only benchmark dependency) on the GGUF file the base came from
At each client count (1 and 16 concurrent clients by default) every server answers the same streamed chat
requests (greedy, max_tokens 32, each client sends --per-client requests one after another); the rounds alternate
between servers, median of --repeats. Measured: completion tokens/s (the server's own usage count, or streamed
chunks where it gives none) and time to first token. Prints the ratios against each peer; goals (issue R2 2/4 and
6/6): transformers >= 1.5x at 1 client and >= 5x at 16 on the tiny base (>= 1.0x and >= 3x on the real 270M base);
llama.cpp >= 0.5x at 1 client and >= 1.5x at 16. JSON to stdout; the section of docs/BENCHMARKS.md with --out.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from report import cpu_label, cpus, replace_section  # noqa: E402

# GPTQModel's import sets the root logger to INFO: httpx would log every benchmark request on stderr
logging.getLogger("httpx").setLevel(logging.WARNING)

PY = sys.executable
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Name three colours.",
    "Explain what a cat is in one sentence.",
    "Count from one to ten.",
    "Tell me a story about a red square.",
    "What is two plus two?",
    "Describe the weather today.",
]
GOALS = {  # (peer, base kind) -> (goal at 1 client, goal at 16 clients)
    ("transformers", "tiny"): (1.5, 5.0),
    ("transformers", "other"): (1.0, 3.0),
    ("llama.cpp", "tiny"): (0.5, 1.5),
    ("llama.cpp", "other"): (0.5, 1.5),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One OpenAI-compatible server in its own process group; `model` is what requests name."""

    def __init__(self, name: str, command: list[str], port: int, model: str, env: dict | None = None) -> None:
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"peer-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT
        )

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log: {self.log.name}")
            for path in ("/health", "/v1/models"):  # transformers' /v1/models scans the hub cache (500 without one)
                try:
                    if httpx.get(self.url + path, timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} did not answer in {timeout:.0f} s; log: {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def chat(server: Server, prompt: str, max_tokens: int, client=None) -> dict:
    """One streamed greedy chat request: completion tokens, time to first token, total seconds. `client`: an
    httpx.Client kept by the caller (a real client keeps its connection; a new one costs ~40 ms of CPU here)."""
    import httpx

    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t = time.perf_counter()
    first, chunks, usage = None, 0, None
    with (client or httpx).stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t
    seconds = time.perf_counter() - t
    return {"tokens": usage if usage is not None else chunks, "ttft": first if first is not None else seconds}


def load(server: Server, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests in turn; completion tokens/s and TTFT."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    import httpx

    def client(c: int) -> None:
        session = httpx.Client(timeout=600)  # made before the clock starts, kept like a real client's
        started.wait()
        for i in range(per_client):
            try:
                r = chat(server, PROMPTS[(c * per_client + i) % len(PROMPTS)], max_tokens, session)
            except Exception as exc:  # recorded, reported: a failing peer must not hide the others' figures
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                results.append(r)
        session.close()

    started = threading.Event()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    time.sleep(0.5)  # every client has its session
    t = time.perf_counter()
    started.set()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_s": statistics.median(r["ttft"] for r in results) if results else None,
        "completion_tokens": tokens,
        "requests": len(results),
        "errors": errors,
    }


def start_servers(base: Path, llama_gguf: str | None, kernel: str, llama_python: str = PY) -> list[Server]:
    servers = []
    p = free_port()
    servers.append(
        Server(
            "toolkit",
            [PY, "-m", "cli", "serve", "--base", str(base), "--port", str(p), "--device", "cpu", "--kernel", kernel],
            p,
            base.name,
        )
    )
    p = free_port()
    transformers_cli = str(Path(PY).with_name("transformers"))
    # transformers loads GPTQModel's layout, not the 27B's compressed-tensors one: give it the toolkit's own
    # lossless repack of the same weights (what the toolkit loads too)
    from toolkit.base.quant_format import ensure_gptq

    gptq = ensure_gptq(base)
    servers.append(
        Server(
            "transformers",
            [transformers_cli, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1"]
            + ["--port", str(p), str(gptq)],
            p,
            str(gptq),
            env={"SETUPTOOLS_USE_DISTUTILS": "stdlib"},  # the transformers CLI imports distutils through setuptools
        )
    )
    if llama_gguf:
        p = free_port()
        servers.append(
            Server(
                "llama.cpp",
                [llama_python, "-m", "llama_cpp.server", "--model", llama_gguf, "--chat_format", "gemma"]
                # its default drops the running stream whenever another request arrives: queue them instead
                + ["--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(p)],
                p,
                Path(llama_gguf).name,
            )
        )
    return servers


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` stops the servers on kill, too
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="a GPTQ-layout (or compressed-tensors) base folder")
    ap.add_argument("--llama-cpp", default=None, metavar="GGUF", help="also run llama.cpp's server on this GGUF")
    ap.add_argument(
        "--llama-python",
        default=str(ROOT / "build" / "llama-venv" / "bin" / "python"),
        help="the Python that has llama-cpp-python[server] (`make llama-cpp` builds build/llama-venv)",
    )
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends in turn")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kernel", default="auto", help="the toolkit's --kernel")
    ap.add_argument("--out", default=None, help="write the section into this BENCHMARKS.md")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            base, kind = Path(args.base).resolve(), "other"
        else:
            base, kind = Path(tmp) / "tiny-gptq", "tiny"
            subprocess.run([PY, "-m", "cli", "tiny-base", str(base), "--format", "gptq"], cwd=ROOT, check=True)
        servers = start_servers(base, args.llama_cpp, args.kernel, args.llama_python)
        try:
            for s in servers:
                s.wait_ready()
                chat(s, PROMPTS[0], args.max_tokens)  # warm-up: first-request loading and kernel repacking
            runs: dict[str, dict[int, list[dict]]] = {s.name: {c: [] for c in levels} for s in servers}
            for _ in range(args.repeats):
                for clients in levels:
                    for s in servers:  # alternate: every server runs each round
                        runs[s.name][clients].append(load(s, clients, args.per_client, args.max_tokens))
        finally:
            for s in servers:
                s.stop()

    summary: dict = {"base": str(args.base or "tiny (GPTQ layout)"), "cpus": cpus(), "max_tokens": args.max_tokens}
    for name, by_level in runs.items():
        summary[name] = {
            str(c): {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "ttft_s": statistics.median(r["ttft_s"] for r in rs if r["ttft_s"] is not None)
                if any(r["ttft_s"] is not None for r in rs)
                else None,
                "completion_tokens": [r["completion_tokens"] for r in rs],
                "errors": sum((r["errors"] for r in rs), []),
            }
            for c, rs in by_level.items()
        }
    ratios = {}
    for peer in [s.name for s in servers if s.name != "toolkit"]:
        goal = GOALS[(peer, kind)]
        for c in levels:
            ours, theirs = summary["toolkit"][str(c)]["tokens_per_s"], summary[peer][str(c)]["tokens_per_s"]
            want = goal[0] if c == 1 else goal[1] if c >= 16 else None
            ratios[f"{peer} {c}"] = {
                "ratio": ours / theirs if theirs else None,
                "goal": want,
                "met": (ours / theirs >= want) if theirs and want else None,
            }
    summary["ratios"] = ratios
    print(json.dumps(summary, indent=2))
    for key, r in ratios.items():
        peer, c = key.rsplit(" ", 1)
        print(
            f"toolkit / {peer} at {c} client(s): {r['ratio']:.2f}x completion tokens/s"
            + (f" (goal >= {r['goal']}x: {'met' if r['met'] else 'NOT met'})" if r["goal"] else ""),
            file=sys.stderr,
        )
    if args.out:
        write_section(Path(args.out), summary, levels, args)


def write_section(out: Path, summary: dict, levels: list[int], args) -> None:
    label = "tiny base (GPTQ layout)" if not args.base else f"base {Path(args.base).name}"
    names = [n for n in ("toolkit", "transformers", "llama.cpp") if n in summary]
    lines = [
        f"## Peer serving ({label})",
        "",
        f"`bench/peer_serve.py{f' --base {args.base}' if args.base else ''}"
        f"{' --llama-cpp GGUF' if args.llama_cpp else ''}`, {time.strftime('%Y-%m-%d')}, "
        f"{cpu_label()}, {cpus()} cores (rounds alternate between servers, median "
        f"of {args.repeats}; `make {'peer-serve-270m' if args.base else 'peer-serve'}`). Streamed greedy chat "
        f"requests, max_tokens {args.max_tokens}, {args.per_client} per client in turn, each client on its own kept "
        "connection; each server in its own process, the clients in the benchmark's; the toolkit's engine in a "
        "process of its own behind its server (serve/engine_process.py).",
        "",
        "| server | " + " | ".join(f"{c} client(s): tokens/s, TTFT" for c in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for n in names:
        cells = []
        for c in levels:
            r = summary[n][str(c)]
            ttft = f"{r['ttft_s'] * 1000:.0f} ms" if r["ttft_s"] is not None else "-"
            cells.append(f"{r['tokens_per_s']:.1f}, {ttft}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, r in summary["ratios"].items():
        peer, c = key.rsplit(" ", 1)
        goal = f" (goal >= {r['goal']}x: {'met' if r['met'] else '**not met**'})" if r["goal"] else ""
        lines.append(f"- toolkit / {peer} at {c} client(s): {r['ratio']:.2f}x{goal}")
    lines += ["", READING + kernel_sentence(args.kernel), ""]
    replace_section(out, f"## Peer serving ({label})", "\n".join(lines))


READING = (
    "Reading: at 16 clients the toolkit decodes all rows in one forward per step, while `transformers serve` "
    "answers one request at a time for Gemma 3 (its log says `CB: False`: continuous batching is not used for "
    "this model) and llama.cpp's Python server serves one at a time too. At one client each server runs one row "
    "per step and per-step overhead decides: the toolkit's decoding step runs the model's own modules without "
    "transformers' generic forward (toolkit/engine/lean_decode.py: no masks, cache object or peft hooks built per "
    "step, attention per row over its own keys and values) on one intra-op thread, giving every thread only to "
    "the LM head and long attention (toolkit/engine/threads.py), one row's LM head through `torch.mv` (same "
    "logits, 15 ms instead of 22 for the 270M), and a streamed choice wakes the server's event loop at most every "
    "5 ms (serve/serving.py `STREAM_INTERVAL_S`); transformers serve runs `generate` over the full modeling code; "
    "llama.cpp runs a compiled graph without Python in the loop (built for AVX512 without AMX: `make llama-cpp`). "
)


def kernel_sentence(kernel: str) -> str:
    """What each side ran on this CPU: the toolkit's pick comes from the same function `toolkit info` prints."""
    from toolkit.base.info import kernel_choice

    c = kernel_choice("cpu", kernel)["inference"]
    picked = f"{c['kernel']}, {c['dtype']}" if "kernel" in c else c["error"]
    return (
        f"The toolkit ran `--kernel {kernel}` (`toolkit info`: {picked} on this {cpu_label()}), "
        "transformers the kernel GPTQModel picks for `from_pretrained`."
    )


if __name__ == "__main__":
    main()

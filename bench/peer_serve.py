"""`toolkit serve` against the servers a user would pick instead, same base, same chat requests, alternating.

    .venv/bin/python bench/peer_serve.py [--base DIR] [--llama-cpp GGUF] [--clients 1,16] [--repeats 3]
                                         [--max-tokens 32] [--prefill 2048,8192] [--out docs/BENCHMARKS.md]

Peers, each in its own process on 127.0.0.1, started once and kept up while the rounds alternate:
  - `transformers serve --continuous-batching` (the transformers CLI in the venv) on the same GPTQ-layout folder
    (without --base: the tiny base built with `toolkit tiny-base DIR --format gptq`)
  - with --llama-cpp GGUF: llama.cpp's OpenAI server (`python -m llama_cpp.server --chat_format gemma`, from
    llama-cpp-python[server], a dev-only benchmark dependency built by `make llama-cpp` as its users build it:
    build/llama-venv/BUILD.json says native or workaround build, and why; copied into the report) on the GGUF file
    the base came from, with `--verbose true`: its own timings (llama_perf_context_print) are parsed from its log
Decoding: at each client count (1 and 16 concurrent clients by default) every server answers the same streamed
chat requests (greedy, max_tokens 32, each client sends --per-client requests one after another); the rounds
alternate between servers, median of --repeats. Measured: completion tokens/s (the server's own usage count, or
streamed chunks where it gives none), time to first token, and at one client llama.cpp's own eval tokens/s (its
compiled graph's time per token, without its Python server) and each server's fraction of the memory-bandwidth
limit (bench/bandwidth.py `decode_limit`, where present).
Prefill (default with --llama-cpp: 2048 and 8192 prompt tokens, counted with the base's tokenizer after its chat
template): one non-streamed request with max_tokens 1, prompt tokens / seconds from send to response, median of
--repeats; every request starts with a sentence of its own, so no server reuses a cached prefix.
Goals (issue R3 2/6), real 270M base, one client: toolkit / llama.cpp >= 1.0x, toolkit / transformers >= 1.5x, the
toolkit at >= 70% of the bandwidth limit; 16 clients: >= 3x both; prefill at 8k: toolkit / llama.cpp >= 0.5x.
Tiny base: toolkit / transformers >= 2.0x at one client (>= 5x at 16, issue R2's). JSON to stdout; the section of
docs/BENCHMARKS.md with --out. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
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
GOALS = {  # (peer, base kind) -> (goal at 1 client, goal at 16 clients); issue R3 2/6 (tiny at 16: R2's)
    ("transformers", "tiny"): (2.0, 5.0),
    ("transformers", "other"): (1.5, 3.0),
    ("llama.cpp", "tiny"): (1.0, 3.0),
    ("llama.cpp", "other"): (1.0, 3.0),
}
BANDWIDTH_GOAL = 0.70  # the toolkit's one-client tokens/s over bench/bandwidth.py's limit, real base
PREFILL_GOAL = {8192: 0.5}  # prompt tokens -> toolkit / llama.cpp prompt tokens/s
PREFILL_QUESTION = "\n\nIn one word: which programming language is the text above about?"
# the perf lines llama.cpp prints after each request (llama-cpp-python resets its counters before each one)
PERF_PROMPT = re.compile(r"llama_perf_context_print:\s+prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
PERF_EVAL = re.compile(r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One OpenAI-compatible server in its own process group; `model` is what requests name."""

    def __init__(
        self, name: str, command: list[str], port: int, model: str, env: dict | None = None, cwd: Path = ROOT
    ) -> None:
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.marks: list[tuple[int, tuple]] = []
        self.log = tempfile.NamedTemporaryFile(prefix=f"peer-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
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

    def mark(self, phase: tuple) -> None:
        """Where the log stands as a measured phase starts: llama.cpp's perf lines are read back per phase."""
        self.marks.append((os.path.getsize(self.log.name), phase))

    def log_by_phase(self) -> list[tuple[tuple, str]]:
        """(phase, its log text) for each mark: a phase runs to this server's next mark, so a line printed after
        the answer went out (while the other servers ran) still counts for its own phase."""
        data = Path(self.log.name).read_bytes()
        ends = [at for at, _ in self.marks[1:]] + [len(data)]
        return [
            (phase, data[at:end].decode(errors="replace")) for (at, phase), end in zip(self.marks, ends, strict=True)
        ]

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


def toolkit_server(base: Path, kernel: str, name: str = "toolkit", checkout: Path = ROOT) -> Server:
    """`toolkit serve` on `base` on a free port, run from `checkout` (its own cli.py and toolkit/)."""
    p = free_port()
    command = [PY, "-m", "cli", "serve", "--base", str(base), "--port", str(p), "--device", "cpu", "--kernel", kernel]
    return Server(name, command, p, base.name, cwd=checkout)


def start_servers(
    base: Path,
    llama_gguf: str | None,
    kernel: str,
    llama_python: str = PY,
    llama_ctx: int = 2048,
    llama_threads: int | None = None,
) -> list[Server]:
    servers = [toolkit_server(base, kernel)]
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
                + llama_args(llama_ctx, llama_threads)
                + ["--host", "127.0.0.1", "--port", str(p)],
                p,
                Path(llama_gguf).name,
            )
        )
    return servers


def llama_args(n_ctx: int, threads: int | None = None) -> list[str]:
    """llama.cpp's server settings besides its defaults (batch sizes: llama-cpp-python's own; threads too unless
    `threads`: its default decodes on cpu_count // 2 threads, one on a 2-core machine, and prompts on all)."""
    extra = [] if threads is None else ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return extra + [
        # its default drops the running stream whenever another request arrives: queue them instead
        "--interrupt_requests", "False",
        # prints llama_perf_context_print's lines after each request (its default today; said, since we parse them)
        "--verbose", "true",
        # its default of 2048 tokens refuses the long prefill prompts
        "--n_ctx", str(n_ctx),
        # its default (true, for prompt logprobs, which no request here asks for) computes the 262k-vocabulary logits
        # of every prompt position and copies them into a numpy array (n_ctx x vocab floats): a 2k-token prompt took
        # 9.4 s instead of 3; 8k would touch 8.6 GB. llama.cpp's own llama-server and the toolkit compute the last's.
        "--logits_all", "false",
    ]  # fmt: skip


def llama_build(llama_python: str) -> dict:
    """build/llama-venv/BUILD.json (bench/llama_build.py): native or workaround build, its flags, llama.cpp's system
    info. Not resolved: the venv's python links to the system's."""
    record = Path(llama_python).parents[1] / "BUILD.json"
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return {"build": "unknown", "reason": f"no {record} (not built by `make llama-cpp`)"}


def llama_perf(text: str) -> list[dict]:
    """llama.cpp's own timings of each request in `text`: prompt eval and eval (one-token steps) tokens/s."""
    out = []
    for line in text.splitlines():
        for kind, pattern in (("prompt_eval", PERF_PROMPT), ("eval", PERF_EVAL)):
            m = pattern.search(line)
            ms, n = (float(m[1]), int(m[2])) if m else (0.0, 0)
            # llama.cpp prints max(1, count): a request without one-token steps shows "1 runs" in 0 ms
            if m and ms > 0 and n > 1:
                out.append({"kind": kind, "ms": ms, "tokens": n, "tokens_per_s": n / ms * 1000})
    return out


def bandwidth_limit(base: Path, context_tokens: int) -> dict | None:
    """bench/bandwidth.py's decode limit for `base` (written alongside this script; absent: reported, not fatal)."""
    try:
        from bandwidth import decode_limit

        limit = decode_limit(str(base), context_tokens)
        float(limit["limit_tokens_per_s"])
    except Exception as exc:  # missing module or function, or one still in progress: the rest still measures
        print(f"bandwidth limit: not available ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return None
    return {**limit, "context_tokens": context_tokens}


def templated_ids(tokenizer, content: str) -> list[int]:
    """The prompt's token ids for one user message after the base's chat template (what every server reads)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def templated_tokens(tokenizer, content: str) -> int:
    """Prompt tokens of one user message after the base's chat template (what every server is asked to read)."""
    return len(templated_ids(tokenizer, content))


def prefill_prompt(tokenizer, text_ids: list[int], tokens: int, k: int) -> tuple[str, int]:
    """About `tokens` templated prompt tokens: a leading sentence of its own (number k, so that no server finds a
    cached prefix beyond the template's first tokens), held-out English, a question. (message, its token count)."""
    lead = f"Reader number {k}, here is a text from Python's documentation."
    overhead = templated_tokens(tokenizer, f"{lead}\n\n{PREFILL_QUESTION}")
    content = f"{lead}\n\n{tokenizer.decode(text_ids[: max(tokens - overhead, 0)])}{PREFILL_QUESTION}"
    return content, templated_tokens(tokenizer, content)


def prefill_request(server: Server, content: str, timeout: float) -> dict:
    """One non-streamed greedy request for one token: seconds from send to the whole response."""
    import httpx

    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 1,
        "temperature": 0,
    }
    t = time.perf_counter()
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)
    seconds = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]!r}")
    return {"seconds": seconds, "server_prompt_tokens": (r.json().get("usage") or {}).get("prompt_tokens")}


def run_prefill(servers: list[Server], tokenizer, lengths: list[int], repeats: int, timeout: float) -> tuple:
    """Prefill rounds alternating between servers, shortest prompts first. A server that fails or would need longer
    than `timeout` for a request is skipped from then on (and stopped, so a request it still computes does not
    slow the others); the reason is printed and reported. (results by server and length, skip reasons)"""
    from toolkit.base.real_weights import heldout_text

    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    while len(ids) < max(lengths):
        ids = ids + ids
    results: dict[str, dict[int, list[dict]]] = {s.name: {n: [] for n in lengths} for s in servers}
    skipped: dict[str, str] = {}
    k = 0
    for n in lengths:
        for s in servers:  # a server this slow at a shorter prompt would need at least proportionally longer
            shorter = [(m, rs) for m, rs in results[s.name].items() if rs and m < n]
            if s.name not in skipped and shorter:
                m, rs = shorter[-1]
                predicted = statistics.median(r["seconds"] for r in rs) * n / m
                if predicted > timeout:
                    skipped[s.name] = (
                        f"{n}-token prompt predicted >= {predicted:.0f} s from {m} tokens "
                        f"(over --prefill-timeout {timeout:.0f} s)"
                    )
                    print(f"prefill: {s.name} skipped: {skipped[s.name]}", file=sys.stderr)
        for _ in range(repeats):
            for s in servers:
                if s.name in skipped:
                    continue
                content, count = prefill_prompt(tokenizer, ids, n, k)
                k += 1
                s.mark(("prefill", n))
                try:
                    r = prefill_request(s, content, timeout)
                except Exception as exc:
                    skipped[s.name] = f"{n}-token prompt: {type(exc).__name__}: {exc}"[:300]
                    print(f"prefill: {s.name} skipped: {skipped[s.name]}", file=sys.stderr)
                    s.stop()
                    continue
                results[s.name][n].append({**r, "prompt_tokens": count, "tokens_per_s": count / r["seconds"]})
    return results, skipped


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
    ap.add_argument(
        "--prefill",
        default=None,
        metavar="TOKENS,...",
        help='prompt lengths of the prefill rounds (default with --llama-cpp: 2048,8192; "" for none)',
    )
    ap.add_argument("--prefill-timeout", type=float, default=300, help="seconds a server may take for one prefill")
    ap.add_argument("--kernel", default="auto", help="the toolkit's --kernel")
    ap.add_argument(
        "--llama-threads",
        type=int,
        default=None,
        help="llama.cpp's --n_threads and --n_threads_batch (default: llama-cpp-python's, cpu_count // 2 to decode)",
    )
    ap.add_argument("--out", default=None, help="write the section into this BENCHMARKS.md")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if args.prefill is None:
        args.prefill = "2048,8192" if args.llama_cpp else ""
    lengths = sorted(int(n) for n in args.prefill.split(",") if n.strip())
    # room for the longest prompt and its answer; the decoding rounds use a few dozen tokens of it either way
    llama_ctx = max([2048] + [1 << (2 * n - 1).bit_length() for n in lengths])

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            base, kind = Path(args.base).resolve(), "other"
        else:
            base, kind = Path(tmp) / "tiny-gptq", "tiny"
            subprocess.run([PY, "-m", "cli", "tiny-base", str(base), "--format", "gptq"], cwd=ROOT, check=True)
        tokenizer = AutoTokenizer.from_pretrained(base)
        # the one-client rounds decode at about a short prompt plus half the answer
        context = int(statistics.median(templated_tokens(tokenizer, p) for p in PROMPTS)) + args.max_tokens // 2
        limit = bandwidth_limit(base, context)  # before the servers start: it may time memory itself
        servers = start_servers(base, args.llama_cpp, args.kernel, args.llama_python, llama_ctx, args.llama_threads)
        try:
            for s in servers:
                s.wait_ready()
                chat(s, PROMPTS[0], args.max_tokens)  # warm-up: first-request loading and kernel repacking
            runs: dict[str, dict[int, list[dict]]] = {s.name: {c: [] for c in levels} for s in servers}
            for _ in range(args.repeats):
                for clients in levels:
                    for s in servers:  # alternate: every server runs each round
                        s.mark(("decode", clients))
                        runs[s.name][clients].append(load(s, clients, args.per_client, args.max_tokens))
            prefill, skipped = (
                run_prefill(servers, tokenizer, lengths, args.repeats, args.prefill_timeout) if lengths else ({}, {})
            )
        finally:
            for s in servers:
                s.stop()
        # Memory bandwidth drifts on a shared VM (25-40 GB/s over a day here): timed again once the servers are
        # down, and the faster of the two kept, i.e. the stricter limit
        after = bandwidth_limit(base, context) if limit else None
        if after and after["bandwidth_gb_s"] > limit["bandwidth_gb_s"]:
            after["bandwidth_before_gb_s"], limit = limit["bandwidth_gb_s"], after
        elif after:
            limit["bandwidth_after_gb_s"] = after["bandwidth_gb_s"]

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
    llama = next((s for s in servers if s.name == "llama.cpp"), None)
    if llama:
        summary["llama.cpp"]["build"] = llama_build(args.llama_python)
        summary["llama.cpp"]["server_args"] = llama_args(llama_ctx, args.llama_threads)
        summary["llama.cpp"]["own_timings"] = own_timings(llama)
    summary["bandwidth"] = bandwidth_fractions(summary, limit, kind, [s.name for s in servers]) if limit else None
    if lengths:
        summary["prefill"] = prefill_summary(prefill, skipped, lengths)
    print(json.dumps(summary, indent=2))
    for line in result_lines(summary):
        print(line, file=sys.stderr)
    if args.out:
        write_section(Path(args.out), summary, levels, args)


def own_timings(llama: Server) -> dict:
    """llama.cpp's own perf lines, by phase: eval (one-token steps) at one client, prompt eval per prefill length."""
    by_phase: dict[str, list[dict]] = {}
    for phase, text in llama.log_by_phase():
        by_phase.setdefault(" ".join(map(str, phase)), []).extend(llama_perf(text))
    out: dict = {}
    for phase, perf in by_phase.items():
        kind = "eval" if phase.startswith("decode") else "prompt_eval"
        rates = [p["tokens_per_s"] for p in perf if p["kind"] == kind]
        out[phase] = {
            kind + "_tokens_per_s": statistics.median(rates) if rates else None,
            "requests": len(rates),
            "tokens": [p["tokens"] for p in perf if p["kind"] == kind],
        }
    return out


def bandwidth_fractions(summary: dict, limit: dict, kind: str, names: list[str]) -> dict:
    """Each server's one-client tokens/s over the limit (computed for the toolkit's base: a GGUF's bytes differ)."""
    fractions = {n: summary[n]["1"]["tokens_per_s"] / limit["limit_tokens_per_s"] for n in names if "1" in summary[n]}
    own = (summary.get("llama.cpp", {}).get("own_timings") or {}).get("decode 1", {}).get("eval_tokens_per_s")
    if own:
        fractions["llama.cpp (own eval timing)"] = own / limit["limit_tokens_per_s"]
    goal = BANDWIDTH_GOAL if kind == "other" else None
    met = fractions["toolkit"] >= goal if goal and "toolkit" in fractions else None
    return {"limit": limit, "fractions": fractions, "goal": goal, "met": met}


def prefill_summary(prefill: dict, skipped: dict, lengths: list[int]) -> dict:
    out: dict = {"skipped": skipped, "ratios": {}}
    for name, by_len in prefill.items():
        out[name] = {
            str(n): {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "seconds": statistics.median(r["seconds"] for r in rs),
                "prompt_tokens": [r["prompt_tokens"] for r in rs],
                "server_prompt_tokens": [r["server_prompt_tokens"] for r in rs],
            }
            for n, rs in by_len.items()
            if rs
        }
    for peer in [n for n in prefill if n != "toolkit"]:
        for n in lengths:
            ours, theirs = out["toolkit"].get(str(n)), out[peer].get(str(n))
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"] if ours and theirs else None
            want = PREFILL_GOAL.get(n) if peer == "llama.cpp" else None
            met = ratio >= want if ratio is not None and want else None
            out["ratios"][f"{peer} {n}"] = {"ratio": ratio, "goal": want, "met": met}
    return out


def result_lines(summary: dict) -> list[str]:
    """The findings in words: the stderr lines after the JSON, and the list under the section's tables."""
    lines = []
    for key, r in summary["ratios"].items():
        peer, c = key.rsplit(" ", 1)
        lines.append(
            f"toolkit / {peer} at {c} client(s): {r['ratio']:.2f}x completion tokens/s"
            + (f" (goal >= {r['goal']}x: {'met' if r['met'] else 'NOT met'})" if r["goal"] else "")
        )
    own = (summary.get("llama.cpp") or {}).get("own_timings", {}).get("decode 1", {})
    if own.get("eval_tokens_per_s"):
        server = summary["llama.cpp"]["1"]["tokens_per_s"]
        lines.append(
            f"llama.cpp's own eval timing at 1 client: {own['eval_tokens_per_s']:.1f} tokens/s (median of "
            f"{own['requests']} requests; its server end to end {server:.1f}); toolkit / that: "
            f"{summary['toolkit']['1']['tokens_per_s'] / own['eval_tokens_per_s']:.2f}x"
        )
    if summary["bandwidth"]:
        b = summary["bandwidth"]
        goal = f" (goal toolkit >= {b['goal']:.0%}: {'met' if b['met'] else 'NOT met'})" if b["goal"] else ""
        what = b["limit"].get("what", "?")
        other = b["limit"].get("bandwidth_before_gb_s") or b["limit"].get("bandwidth_after_gb_s")
        if other:  # timed before and after the rounds; the faster kept
            what += f"; the other timing {other:.1f} GB/s"
        lines.append(
            f"bandwidth limit {b['limit']['limit_tokens_per_s']:.1f} tokens/s at 1 client ({what}): "
            + ", ".join(f"{n} {f:.0%}" for n, f in b["fractions"].items())
            + goal
        )
    else:
        lines.append("bandwidth limit: not available (bench/bandwidth.py `decode_limit`)")
    p = summary.get("prefill")
    if p:
        for name in ("toolkit", "transformers", "llama.cpp"):
            for n, r in (p.get(name) or {}).items():
                own = (summary.get("llama.cpp") or {}).get("own_timings", {}).get(f"prefill {n}", {})
                ownline = (
                    f"; llama.cpp's own prompt eval timing {own['prompt_eval_tokens_per_s']:.0f}"
                    if name == "llama.cpp" and own.get("prompt_eval_tokens_per_s")
                    else ""
                )
                lines.append(
                    f"prefill {n} ({statistics.median(r['prompt_tokens']):.0f} prompt tokens): {name} "
                    f"{r['tokens_per_s']:.0f} prompt tokens/s, {r['seconds']:.2f} s{ownline}"
                )
        for name, reason in p["skipped"].items():
            lines.append(f"prefill: {name} skipped: {reason}")
        for key, r in p["ratios"].items():
            if r["ratio"] is None:
                continue
            peer, n = key.rsplit(" ", 1)
            lines.append(
                f"prefill toolkit / {peer} at {n} tokens: {r['ratio']:.2f}x prompt tokens/s"
                + (f" (goal >= {r['goal']}x: {'met' if r['met'] else 'NOT met'})" if r["goal"] else "")
            )
    return lines


def write_section(out: Path, summary: dict, levels: list[int], args) -> None:
    label = "tiny base (GPTQ layout)" if not args.base else f"base {Path(args.base).name}"
    if args.llama_cpp and args.llama_threads:
        label += f", llama.cpp on {args.llama_threads} threads"
    names = [n for n in ("toolkit", "transformers", "llama.cpp") if n in summary]
    lines = [
        f"## Peer serving ({label})",
        "",
        f"`bench/peer_serve.py{f' --base {args.base}' if args.base else ''}"
        f"{' --llama-cpp GGUF' if args.llama_cpp else ''}"
        f"{f' --llama-threads {args.llama_threads}' if args.llama_threads else ''}`, "
        f"{time.strftime('%Y-%m-%d')}, "
        f"{cpu_label()}, {cpus()} cores (rounds alternate between servers, median "
        f"of {args.repeats}; `make {'peer-serve-270m' if args.base else 'peer-serve'}`). Streamed greedy chat "
        f"requests, max_tokens {args.max_tokens}, {args.per_client} per client in turn, each client on its own kept "
        "connection; each server in its own process, the clients in the benchmark's; the toolkit's engine in a "
        "process of its own behind its server (serve/engine_process.py).",
    ]
    if "llama.cpp" in summary:
        b = summary["llama.cpp"]["build"]
        flags = " ".join(b.get("cmake_args") or []) or "none"
        lines += [
            "",
            f"llama.cpp: {b.get('package', 'llama-cpp-python[server]')}, **{b['build']} build** (`make llama-cpp`, "
            f"bench/llama_build.py: {b.get('reason', '')}; CMake arguments: {flags}), server arguments "
            f"`{' '.join(summary['llama.cpp']['server_args'])}`, "
            f"{'batch sizes' if args.llama_threads else 'threads and batch sizes'} its defaults. Its system "
            f"info: `{b.get('system_info', '?')}`",
        ]

    def decoding(r: dict) -> str:
        return f"{r['tokens_per_s']:.1f}, " + (f"{r['ttft_s'] * 1000:.0f} ms" if r["ttft_s"] is not None else "-")

    lines += [""] + table(
        names, [f"{c} client(s): tokens/s, TTFT" for c in levels], lambda n, i: decoding(summary[n][str(levels[i])])
    )
    p = summary.get("prefill")
    if p:
        lengths = sorted({int(n) for name in names for n in (p.get(name) or {})})
        lines += [
            "",
            "Prefill: one non-streamed request with max_tokens 1 at a time, prompt tokens (the base's tokenizer "
            "after its chat template) / seconds from send to response; each prompt opens with a sentence of its own, "
            "so no server reuses a cached prefix.",
            "",
        ]

        def prefilled(n: str, i: int) -> str:
            r = (p.get(n) or {}).get(str(lengths[i]))
            return f"{r['tokens_per_s']:.0f}, {r['seconds']:.2f} s" if r else "-"

        lines += table(names, [f"~{n} prompt tokens: tokens/s, seconds" for n in lengths], prefilled)
    lines.append("")
    lines += [f"- {line}" for line in result_lines(summary)]
    lines += ["", READING + kernel_sentence(args.kernel), ""]
    replace_section(out, f"## Peer serving ({label})", "\n".join(lines))


def table(names: list[str], columns: list[str], cell) -> list[str]:
    """A markdown table: one row per server, `cell(server, column index)` in each column."""
    head = ["| server | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    return head + [f"| {n} | " + " | ".join(cell(n, i) for i in range(len(columns))) + " |" for n in names]


READING = (
    "Reading: at 16 clients the toolkit decodes all rows in one forward per step, while `transformers serve` "
    "answers one request at a time for Gemma 3 (its log says `CB: False`: continuous batching is not used for "
    "this model) and llama.cpp's Python server serves one at a time too. At one client each server runs one row "
    "per step and per-step overhead decides: the toolkit's decoding step runs the model's own modules without "
    "transformers' generic forward (toolkit/engine/lean_decode.py: no masks, cache object or peft hooks built per "
    "step, attention per row over its own keys and values); where one row's projections split over threads (the "
    "real base) its engine process runs the loop on its main thread, every int4 call on every core "
    "(toolkit/engine/threads.py), and compiles one row's step (toolkit/engine/compiled_step.py: inductor's fused "
    "kernels between the int4 calls; `--no-compiled-step` turns it off); q/k/v and gate/up as one int4 call each, one "
    "query's GQA group folded into one head, the real base's LM head as int8 rows with the top 64 candidates "
    "rescored exactly (toolkit/base/lm_head.py: 168 MB read per token instead of 335), and a streamed choice wakes "
    "the server's event loop at most every "
    "5 ms (serve/serving.py `STREAM_INTERVAL_S`); transformers serve runs `generate` over the full modeling code; "
    "llama.cpp runs a compiled graph without Python in the loop (its build: above), and its own eval timing is that "
    "graph's time per token without its Python server around it. "
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

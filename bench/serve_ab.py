"""Two checkouts' `toolkit serve` side by side on one base, one client, rounds alternating: is a change faster?

    .venv/bin/python bench/serve_ab.py --against DIR [--base build/real-base] [--rounds 12] [--max-tokens 32]

DIR is another checkout of the toolkit (e.g. `git worktree add /tmp/before HEAD~1`); both servers run from this
venv, each from its own folder, and stay up while the rounds alternate (the order flips every round). A round is
peer_serve's 8 prompts sent one after another (greedy, streamed), so its tokens/s is peer_serve's one-client figure.

Why this and not two peer_serve runs: the memory speed of a shared VM moves by half within minutes (B: the int8
matvec at 22-46 GB/s in one afternoon), which swings a one-client fraction of the bandwidth limit by +-15 points,
far more than most changes to the decoding step; two servers alternating round by round see the same memory.
Printed: each round's tokens/s, then the medians, the median of the per-round ratios and in how many rounds this
checkout was faster (JSON on the last line). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_serve import PROMPTS, ROOT, Server, chat, toolkit_server  # noqa: E402


def round_tokens_per_s(server: Server, client, max_tokens: int) -> float:
    start_s = time.perf_counter()
    tokens = sum(chat(server, p, max_tokens, client)["tokens"] for p in PROMPTS)
    return tokens / (time.perf_counter() - start_s)


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, required=True, help="the other checkout (a folder with cli.py)")
    ap.add_argument("--base", type=Path, default=ROOT / "build" / "real-base")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kernel", default="auto")
    args = ap.parse_args()
    if not (args.against / "cli.py").is_file():
        sys.exit(f"--against {args.against}: not a checkout of the toolkit (no cli.py there)")
    if not args.base.is_dir():
        sys.exit(f"--base {args.base}: no such folder (build it with `make real-base`)")
    base = args.base.resolve()
    servers = {
        "this": toolkit_server(base, args.kernel, "this"),
        "against": toolkit_server(base, args.kernel, "against", args.against.resolve()),
    }
    try:
        for server in servers.values():
            server.wait_ready()
        clients = {name: httpx.Client(timeout=600) for name in servers}
        for name, server in servers.items():  # warm: each engine's first requests build and check its kernels
            for p in PROMPTS[:3]:
                chat(server, p, args.max_tokens, clients[name])
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for r in range(args.rounds):
            for name in list(servers) if r % 2 == 0 else list(servers)[::-1]:
                rates[name].append(round_tokens_per_s(servers[name], clients[name], args.max_tokens))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f} tokens/s" for n, v in rates.items()), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    ratios = [a / b for a, b in zip(rates["this"], rates["against"], strict=True)]
    summary = {
        "this_median": statistics.median(rates["this"]),
        "against_median": statistics.median(rates["against"]),
        "median_ratio": statistics.median(ratios),
        "this_faster_rounds": sum(x > 1 for x in ratios),
        "rounds": args.rounds,
        "against": str(args.against),
    }
    print(
        f"this {summary['this_median']:.1f} against {summary['against_median']:.1f} tokens/s (medians), "
        f"ratio {summary['median_ratio']:.3f}, this faster in {summary['this_faster_rounds']} of {args.rounds}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

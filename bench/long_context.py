"""32k context: KV memory under a mixed load, stream gaps while a long prompt joins, training memory of a long row.

    .venv/bin/python bench/long_context.py [--long 30000] [--chunk 256] [--base DIR] [--no-write]

On the tiny base with 32,768 positions (built in a temporary folder unless --base is given), in-process engine:
  1. KV bytes held / KV bytes needed with 15 short rows decoding and one --long-token prompt among them, read
     from the engine's stats when all 16 rows are held (goal <= 1.25). Also printed: what one left-padded batch
     (the former DynamicCache) would hold for the same rows.
  2. Longest inter-token gap of a running stream while the long prompt is prefilled (from its submission to its
     first token) / the same stream's median gap over the same tokens in a run of the same short rows without the
     long prompt (goal <= 3), with at most --chunk tokens per prefill pass (paced); the median of --pairs such
     pairs (each joining run beside its own control run); the same with the whole prompt in one pass (--chunk 0)
     for contrast. Also printed: the longest gap / the median gap before the prompt came.
  3. Peak training memory of one long row with the chunked loss / without: the last line of
     bench/long_row_memory.py (the training helper's; "not available" when it is missing or fails).
Results go to docs/BENCHMARKS.md (section "Long context"). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
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

SHORTS = 15


def ids(n: int, rng: random.Random) -> list[int]:
    return [2] + [rng.randrange(200, 1700) for _ in range(n - 1)]


class Stream:
    def __init__(self, probe=None) -> None:
        self.times: list[float] = []
        self.probe, self.seen = probe, []
        self.done = threading.Event()
        self.finish = None

    def __call__(self, kind, value) -> None:
        if kind == "token":
            self.times.append(time.perf_counter())
            if self.probe:
                self.seen.append(self.probe())
        elif kind in ("done", "error"):
            self.finish = value
            self.done.set()


def _start_shorts(base, chunk: int, seed: int):
    """An engine with the SHORTS short rows decoding (the same prompts for a given seed), their requests and streams,
    the stats probe, and the random generator (which draws the long prompt next)."""
    from toolkit.engine.engine import Engine, Request, SamplingParams

    rng = random.Random(seed)
    engine = Engine.for_base(base, max_batch=SHORTS + 1, prefill_chunk=chunk)
    s = engine.stats
    probe = lambda: (s["running"], s["kv_bytes_used"], s["kv_bytes_needed"])  # noqa: E731
    shorts = [ids(rng.randrange(20, 60), rng) for _ in range(SHORTS)]
    streams = [Stream(probe) for _ in shorts]
    requests = []
    for p, st in zip(shorts, streams, strict=True):  # the short rows run until the long one is done
        params = SamplingParams(100_000, 0, ignore_eos=True)
        requests.append(engine.submit(Request(p, [0] * len(p), None, None, params, st)))
    return engine, shorts, streams, requests, probe, rng


def _end_shorts(requests: list, streams: list) -> None:
    """Cancel the short rows and wait until each has ended."""
    for r in requests:
        r.cancel()
    for st in streams:
        assert st.done.wait(60)


def control_gaps(base, chunk: int, tokens: int, seed: int = 0) -> list[float]:
    """The same short rows without the long prompt, until stream 0 has `tokens` tokens: its gaps, by token index.
    The denominator of the gap ratio: the rows grow (their attention lengthens) while a long prompt joins, so the
    stream's own cadence at the same point of its life is what a joining prompt's stall is measured against."""
    engine, _, streams, requests, _, _ = _start_shorts(base, chunk, seed)
    try:
        while len(streams[0].times) < tokens + 1:
            time.sleep(0.01)
        _end_shorts(requests, streams)
    finally:
        engine.close()
    t = streams[0].times
    return [b - a for a, b in zip(t, t[1:], strict=False)]


def mixed_load(base, long_tokens: int, chunk: int, seed: int = 0) -> dict:
    """15 short rows decode; once they run, the long prompt is submitted. Gaps of stream 0 and KV use."""
    from toolkit.engine.engine import Request, SamplingParams

    engine, shorts, streams, requests, probe, rng = _start_shorts(base, chunk, seed)
    long = ids(long_tokens, rng)
    try:
        while len(streams[0].times) < 12:
            time.sleep(0.01)
        joined = time.perf_counter()
        lg = Stream(probe)
        engine.submit(Request(long, [0] * len(long), None, None, SamplingParams(4, 0, ignore_eos=True), lg))
        assert lg.done.wait(3600) and not isinstance(lg.finish, Exception), lg.finish
        _end_shorts(requests, streams)
    finally:
        engine.close()
    first_long = lg.times[0]
    t = streams[0].times
    before = [b - a for a, b in zip(t, t[1:], strict=False) if b <= joined]
    joining = [i for i, (a, b) in enumerate(zip(t, t[1:], strict=False)) if b > joined and a < first_long]
    during = [t[i + 1] - t[i] for i in joining]
    # memory: when all 16 rows are held, the long one fully prefilled (its own first token events)
    full = [(used, needed) for running, used, needed in lg.seen if running == SHORTS + 1]
    used, needed = max(full, key=lambda x: x[1])
    lengths = [len(p) + len(st.times) for p, st in zip(shorts, streams, strict=True)]
    layout = engine.layout
    widest = len(long) + 1
    padded = (SHORTS + 1) * layout.needed_bytes(widest)  # one left-padded batch: every row as wide as the widest
    return {
        "long_tokens": long_tokens,
        "chunk": chunk,
        "median_gap_before_s": statistics.median(before),
        "longest_gap_joining_s": max(during),
        "gap_ratio_vs_before": max(during) / statistics.median(before),
        "joining_gap_indices": [joining[0], joining[-1]],
        "prefill_s": first_long - joined,
        "gaps_joining_s": sorted(during),
        "kv_used": used,
        "kv_needed": needed,
        "kv_ratio": used / needed,
        "padded_ratio": padded / needed,
        "short_lengths": [min(lengths), max(lengths)],
    }


def training_ratio() -> tuple[str, dict | None]:
    script = ROOT / "bench" / "long_row_memory.py"
    if not script.exists():
        return "not available (bench/long_row_memory.py is missing)", None
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in r.stdout.strip().splitlines() if line.startswith("{")]
    try:
        report = json.loads(lines[-1])
        return f"{report['ratio']:.2f}", report
    except (IndexError, KeyError, TypeError, ValueError):
        return f"not available (bench/long_row_memory.py exited {r.returncode})", None


def _against_control(run: dict, control: list[float]) -> None:
    """The run's longest joining gap against the control run's gaps over the same token indices."""
    first, last = run["joining_gap_indices"]
    same = control[first : last + 1]  # the control's gaps over the same tokens
    run["control_median_gap_s"] = statistics.median(same)
    run["control_longest_gap_s"] = max(same)  # the machine's own jitter, no long prompt
    run["gap_ratio"] = run["longest_gap_joining_s"] / run["control_median_gap_s"]
    run["longest_gap_ratio"] = run["longest_gap_joining_s"] / run["control_longest_gap_s"]  # like against like
    # the 99th percentile beside the longest: one isolated stall of the shared machine (controls had 77 ms ones at a
    # 12-15 ms median) sets the longest gap, while the engine's own slowdown shows across the whole join
    run["p99_gap_ratio"] = _p99(run["gaps_joining_s"]) / run["control_median_gap_s"]
    run["control_p99_gap_ratio"] = _p99(same) / run["control_median_gap_s"]
    # the typical pass that carries a piece of the prompt, against a decoding step (the pacing aims at 1 + its ratio)
    run["median_gap_ratio"] = statistics.median(run["gaps_joining_s"]) / run["control_median_gap_s"]


def _p99(gaps: list[float]) -> float:
    return sorted(gaps)[int(0.99 * (len(gaps) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", type=int, default=30000, help="tokens of the long prompt")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens) for the gap measurement")
    ap.add_argument("--base", help="a base folder with at least --long + 64 positions (default: build one)")
    # the machine's speed drifts between runs (a shared 2-core VM: a stream's median gap with no long prompt ranged
    # 11.5-19.9 ms in consecutive runs, and one 121 ms stall came in a run whose next-longest gap was 54 ms), so
    # each joining run is paired with a control run right after it and the gap ratio is the median of the pairs'
    ap.add_argument("--pairs", type=int, default=3, help="joining + control runs; the gap ratio is their median")
    ap.add_argument("--skip-training", action="store_true", help="do not run bench/long_row_memory.py")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()

    from toolkit.base import builder
    from toolkit.base.loader import load_base

    with tempfile.TemporaryDirectory() as tmp:
        path = args.base or builder.build(Path(tmp) / "tiny-32k", seed=0, context=32768)
        base = load_base(path, device="cpu")
        whole = mixed_load(base, args.long, 0)
        runs = []
        for _ in range(args.pairs):
            run = mixed_load(base, args.long, args.chunk)
            _against_control(run, control_gaps(base, args.chunk, run["joining_gap_indices"][1] + 1))
            runs.append(run)
            print(f"gap ratio, pair {len(runs)}: {run['gap_ratio']:.2f}", flush=True)
        _against_control(whole, control_gaps(base, args.chunk, whole["joining_gap_indices"][1] + 1))
    chunked = sorted(runs, key=lambda r: r["gap_ratio"])[len(runs) // 2]  # the median pair
    chunked["pair_gap_ratios"] = [r["gap_ratio"] for r in runs]
    train, train_report = ("skipped", None) if args.skip_training else training_ratio()

    print(
        f"KV bytes held / needed, 1 x {args.long}-token prompt + {SHORTS} short rows: {chunked['kv_ratio']:.2f} "
        f"(goal <= 1.25; one left-padded batch would hold {chunked['padded_ratio']:.1f}x)"
    )
    print(
        f"longest inter-token gap while the long prompt joins / the stream's median gap over the same tokens "
        f"without it: {chunked['gap_ratio']:.2f} (goal <= 3; median of {args.pairs} pairs: "
        f"{', '.join(f'{x:.2f}' for x in chunked['pair_gap_ratios'])}; prefill chunk {args.chunk}; "
        "whole prompt in one pass: "
        f"{whole['gap_ratio']:.1f}; / its median gap before the prompt arrived: {chunked['gap_ratio_vs_before']:.2f}; "
        f"without the long prompt, longest / median gap: "
        f"{chunked['control_longest_gap_s'] / chunked['control_median_gap_s']:.2f}; 99th percentile gap / the same "
        f"median: {chunked['p99_gap_ratio']:.2f} joining, {chunked['control_p99_gap_ratio']:.2f} without; median "
        f"gap while it joins / the same median: {chunked['median_gap_ratio']:.2f}; longest gap while it joins / "
        f"longest without it: {chunked['longest_gap_ratio']:.2f})"
    )
    print(f"peak training memory of one long row, chunked loss / plain: {train} (goal <= 0.5)")
    print(json.dumps({"chunked": chunked, "whole": whole, "training": train_report}))
    if args.no_write:
        return

    when = time.strftime("%Y-%m-%d")
    c, w = chunked, whole
    cl = c["control_longest_gap_s"] / c["control_median_gap_s"]
    pairs = ", ".join(f"{x:.2f}" for x in c["pair_gap_ratios"])
    p99 = f"{c['p99_gap_ratio']:.2f}; {c['control_p99_gap_ratio']:.2f}"
    ms = lambda x: f"{1000 * x:.0f} ms"  # noqa: E731
    section = f"""## Long context (`bench/long_context.py`)

Measured {when} on {cpu_label()} ({cpus()} cores, shared with other jobs: timings are noisy), tiny base
with 32,768 positions (4 layers: 3 sliding-window layers of 1,024, 1 global), in-process engine, greedy. Load: {SHORTS}
short rows ({c["short_lengths"][0]}-{c["short_lengths"][1]} tokens when measured) decoding, then one prompt of
{args.long:,} tokens submitted among them.

| ratio | measured | goal |
|---|---|---|
| KV bytes held / KV bytes needed (all 16 rows held) | {c["kv_ratio"]:.2f} | <= 1.25 |
| (for contrast: one left-padded batch, the former DynamicCache) | {c["padded_ratio"]:.1f} | |
| longest gap while the long prompt joins / median gap, same tokens, no long prompt | {c["gap_ratio"]:.2f} | <= 3 |
| (the same ratio in each pair; the row above is their median) | {pairs} | |
| (the same longest gap / the median gap before the prompt came) | {c["gap_ratio_vs_before"]:.2f} | |
| (without the long prompt: longest gap / median gap over the same tokens) | {cl:.2f} | |
| (longest gap while it joins / longest gap over the same tokens without it) | {c["longest_gap_ratio"]:.2f} | |
| (99th percentile gap / the same median: while it joins; without the long prompt) | {p99} | |
| (median gap while it joins / the same median) | {c["median_gap_ratio"]:.2f} | |
| (for contrast: the whole prompt in one prefill pass) | {w["gap_ratio"]:.1f} | |
| peak training memory of one long row, chunked loss / plain | {train} | <= 0.5 |

Each pair is a run with the long prompt and, right after it, a control run of the same short rows without it (the
machine's speed drifts between runs); the figures below are the median pair's. Gaps of one running stream: median
{ms(c["median_gap_before_s"])} before the long prompt arrived; median
{ms(c["control_median_gap_s"])} over the same tokens ({c["joining_gap_indices"][0]}-{c["joining_gap_indices"][1]}) in a
run of the same short rows without the long prompt (the denominator: the rows grow from ~50 to
~{c["short_lengths"][1]:,} tokens while the prompt joins, and their steps lengthen with them); longest
{ms(c["longest_gap_joining_s"])} while it was prefilled in paced chunks of at most {args.chunk} tokens
({c["prefill_s"]:.1f} s to its first token); {ms(w["longest_gap_joining_s"])} when prefilled in one pass
({w["prefill_s"]:.1f} s). KV bytes: held
{c["kv_used"] / 2**20:.1f} MiB, needed {c["kv_needed"] / 2**20:.1f} MiB (each row's own tokens in global layers, its
last 1,023 in sliding ones).
"""
    replace_section(ROOT / "docs" / "BENCHMARKS.md", "## Long context", section)


if __name__ == "__main__":
    main()

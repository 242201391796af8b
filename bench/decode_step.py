"""The engine's decoding step in-process: the lean step (engine/lean_decode.py) vs transformers' generic forward.

    .venv/bin/python bench/decode_step.py [--base DIR]... [--rows 1,16] [--tokens 64] [--repeats 3] [--out FILE]

For each base (default: the tiny base, built in a temporary folder) and each row count, the in-process engine
decodes `--tokens` greedy tokens per row (`ignore_eos`) with `lean_decode` on and off, alternating, median of
`--repeats`; reported: milliseconds per decoding step (the time between a row's tokens, after its first) and the
ratio generic / lean. Also the kernel and dtype the base ran with, and the one-row step's memory-bandwidth limit
(bench/bandwidth.py: the bytes a step reads over the bandwidth of a matvec at the head's precision) with the lean
step's fraction of it. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bandwidth import decode_limit  # noqa: E402
from report import cpu_label, cpus, replace_section  # noqa: E402

PROMPT = "<start_of_turn>user\nTell me about the sea.<end_of_turn>\n<start_of_turn>model\n"


def step_ms(base, lean: bool, rows: int, tokens: int, here: bool = True, served: bool = False) -> tuple[float, str]:
    """`here`: the engine's loop on this (the main) thread, as `toolkit serve`'s engine process runs it
    (Engine.run_here); else on the engine's own thread, as in-process users (chat, eval, rollouts) run it.
    `served`: with the step compiled where serve's engine process compiles it (Engine.compile_step). Milliseconds
    per step and what the one-row step ran as."""
    from toolkit.engine.engine import Engine, Request, SamplingParams

    ids = base.tokenizer(PROMPT)["input_ids"]
    engine = Engine.for_base(base, max_batch=rows, lean_decode=lean, start=False)
    kind = engine.compile_step() if served else "eager"
    times: list[list[float]] = [[] for _ in range(rows)]
    left, done = [rows], threading.Event()

    def on_event(i: int):
        def on(kind, value):
            if kind == "token":
                times[i].append(time.perf_counter())
            elif kind in ("done", "error"):
                left[0] -= 1  # the engine's thread only
                if not left[0]:
                    done.set()
                    if here:
                        engine.close()  # (from its own loop: the loop ends after this round)

        return on

    for i in range(rows):  # queued before the start: one shared prefill, then every step decodes all rows
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        engine.submit(Request(ids, [0] * len(ids), None, None, params, on_event(i)))
    if here:
        engine.run_here()
    else:
        engine.start()
        done.wait()
        engine.close()
    t = times[0]
    return (t[-1] - t[1]) / (len(t) - 2) * 1000, kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", action="append", help="base folder (repeatable); default: a tiny base")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the section into this BENCHMARKS.md")
    args = ap.parse_args()

    from toolkit.base import builder
    from toolkit.base.loader import load_base

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.base or [str(builder.build(Path(tmp) / "tiny-base", seed=0))]
        for path in paths:
            base = load_base(path, device="cpu")
            name = Path(path).name
            context = len(base.tokenizer(PROMPT)["input_ids"]) + args.tokens // 2  # a row's mean length while timed
            limit = decode_limit(path, context, base=base)
            print(json.dumps({"base": name, "limit": limit}), flush=True)
            for rows in (int(r) for r in args.rows.split(",")):
                step_ms(base, True, rows, 8, served=rows == 1)  # warm-up: repacking, first calls, compiling
                runs = {"served": [], "lean": [], "own": [], "generic": []}
                kind = "eager"
                for _ in range(args.repeats):
                    lean_ms = step_ms(base, True, rows, args.tokens)[0]
                    if rows == 1:  # (several rows: served as the eager lean step, the same run)
                        ms, kind = step_ms(base, True, rows, args.tokens, served=True)
                    runs["served"].append(ms if rows == 1 else lean_ms)
                    runs["lean"].append(lean_ms)
                    runs["own"].append(step_ms(base, True, rows, args.tokens, here=False)[0])
                    runs["generic"].append(step_ms(base, False, rows, args.tokens)[0])
                served_ms, generic_ms = statistics.median(runs["served"]), statistics.median(runs["generic"])
                results.append(
                    {
                        "base": name,
                        "kernel": f"{base.kernel}, {str(base.dtype).removeprefix('torch.')}",
                        "rows": rows,
                        "step": kind.split(" (")[0],  # compiled or eager
                        "served_ms": served_ms,
                        "lean_ms": statistics.median(runs["lean"]),
                        "lean_own_thread_ms": statistics.median(runs["own"]),
                        "generic_ms": generic_ms,
                        "ratio": generic_ms / served_ms,
                        "limit_ms": limit["limit_ms"] if rows == 1 else None,
                        "limit_what": limit["what"],
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    if args.out:
        lines = [
            "## Lean decoding step (`bench/decode_step.py`)",
            "",
            f"{time.strftime('%Y-%m-%d')}, {cpu_label()}, {cpus()} cores, in-process "
            f"engine, greedy, {args.tokens} tokens per row (`ignore_eos`), median of {args.repeats} alternating runs. "
            "Milliseconds per decoding step of all rows. As served: the engine's loop on the process's main thread, "
            "as `toolkit serve`'s engine process runs it (Engine.run_here), one row's step compiled where it compiles "
            "it (Engine.compile_step, engine/compiled_step.py; the step column says which). Beside it the eager lean "
            "step on the main thread and on a thread of its own, as in-process users (chat, eval, GRPO rollouts) run "
            "it.",
            "",
            "| base | kernel | rows | step | as served | lean eager | lean eager, own thread | generic forward "
            "| generic / served | one-row limit | served at |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            at = f"{r['limit_ms']:.2f} ms | {r['limit_ms'] / r['served_ms']:.0%}" if r["limit_ms"] else "| "
            lines.append(
                f"| {r['base']} | {r['kernel']} | {r['rows']} | {r['step']} | {r['served_ms']:.2f} ms "
                f"| {r['lean_ms']:.2f} ms | {r['lean_own_thread_ms']:.2f} ms | {r['generic_ms']:.2f} ms "
                f"| {r['ratio']:.2f}x | {at} |"
            )
        lines += ["", "Limits: " + "; ".join(sorted({f"{r['base']}: {r['limit_what']}" for r in results}))]
        lines += ["", READING, ""]
        replace_section(Path(args.out), "## Lean decoding step", "\n".join(lines))


READING = (
    "What the lean step leaves out (engine/lean_decode.py): transformers' per-step mask building (causal and "
    "sliding), its cache object and output plumbing, peft's per-forward hook installation for `adapter_names`, and "
    "the left-padded gather of every row's keys and values per layer; attention runs per row over that row's own "
    "storage, and a pass of decoding rows only takes `_decoding_layers` (each layer's kernel calls and LoRA "
    "modules looked up once per pass); one row's step as served compiles those layers (inductor's fused kernels "
    "between the int4 calls, attention left eager). On the process's main thread every op may use every intra-op "
    "thread; on a thread of its own the engine keeps small ops on one (engine/threads.py): a parallel region "
    "started off the main thread costs ~80 us to wake on 2 cores, more than most ops of a decoding step."
)


if __name__ == "__main__":
    main()

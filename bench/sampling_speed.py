"""The batched sampling step vs the per-row loop it replaced, on Gemma 3's real logits width.

    .venv/bin/python bench/sampling_speed.py [--rows 16] [--vocab 262208] [--repeats 15] [--dry-run]

Logits [rows, vocab] in float32 on the CPU, flat (random normal x 4) or peaked (20 tokens per row hold
nearly all the mass, as a model's usually do); every row has 200 output tokens behind it. Mixes: greedy
only, sampled (temperature 0.8, top-p 0.95, presence/frequency penalties, own seed), and sampled with the
extras (top-k 50, min-p 0.05, repetition penalty 1.1). The per-row loop is the engine's former `_sample`
(softmax, sort for top-p, torch.multinomial per row); it knows no extras, so the third mix compares against
it doing less work. Alternating runs, median. Writes its section of docs/BENCHMARKS.md unless --dry-run.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from report import cpus, replace_section  # noqa: E402

STOPS = {1, 106}


def per_row_loop(logits, rows) -> list[int]:
    """The engine's sampling before this module: one row at a time (kept verbatim as the baseline)."""
    import torch

    out = []
    for j, r in enumerate(rows):
        p, counts = r.params, r.counts
        x = logits[j].float().cpu()
        if counts and (p.presence_penalty or p.frequency_penalty):
            idx = torch.tensor(list(counts))
            freq = torch.tensor([counts[t] for t in counts], dtype=x.dtype)
            x[idx] -= p.presence_penalty + p.frequency_penalty * freq
        if p.temperature == 0:
            out.append(int(torch.argmax(x)))
            continue
        probs = torch.softmax(x / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=262208)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()

    import torch

    from toolkit.engine.sampling import RowState, SamplingParams, sample

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=gen) * 4
    history = torch.randint(0, args.vocab, (args.rows, 200), generator=gen)
    common = {"max_tokens": 10**6, "ignore_eos": True}
    sampled = {"temperature": 0.8, "top_p": 0.95, "presence_penalty": 0.3, "frequency_penalty": 0.2}
    extras = {"top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1}
    # a model's next-token distribution is peaked: a few tokens hold nearly all the mass (top-p decided by its
    # candidates, sampling.TOP_P_FLOOR); flat random logits make top-p sort every row in full (the worst case)
    peaked = torch.randn(args.rows, args.vocab, generator=gen) * 2
    peaked.scatter_add_(
        1, torch.randint(0, args.vocab, (args.rows, 20), generator=gen), torch.full((args.rows, 20), 25.0)
    )
    mixes = {
        "greedy": (logits, lambda i: SamplingParams(temperature=0, **common)),
        "sampled, flat logits": (logits, lambda i: SamplingParams(seed=i, **sampled, **common)),
        "sampled, peaked logits": (peaked, lambda i: SamplingParams(seed=i, **sampled, **common)),
        "sampled + extras, flat logits": (logits, lambda i: SamplingParams(seed=i, **sampled, **extras, **common)),
        "sampled + extras, peaked logits": (peaked, lambda i: SamplingParams(seed=i, **sampled, **extras, **common)),
    }
    lines = []
    for name, (logits, make) in mixes.items():
        rows = [RowState.new(make(i), history[i, :100].tolist()) for i in range(args.rows)]
        for i, r in enumerate(rows):
            for t in history[i].tolist():
                r.counts[t] = r.counts.get(t, 0) + 1
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate: background load hits both alike
            t0 = time.perf_counter()
            sample(logits, rows, STOPS)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            per_row_loop(logits, rows)
            theirs.append(time.perf_counter() - t0)
        a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
        print(lines[-1], flush=True)

    section = "\n".join(
        [
            "## Sampling step (`bench/sampling_speed.py`)\n",
            f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {cpus()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rows} rows x {args.vocab} "
            f"logits (float32, CPU), 200 output tokens per row; median of {args.repeats} alternating runs.\n",
            "| mix | `sample()` ms | per-row loop ms | speed-up |",
            "|---|---|---|---|",
            *lines,
            "",
        ]
    )
    print(section)
    if not args.dry_run:
        replace_section(ROOT / "docs" / "BENCHMARKS.md", "## Sampling step", section)


if __name__ == "__main__":
    main()

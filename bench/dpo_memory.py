"""Peak memory of one DPO training step of `toolkit train`, at 1k and 8k tokens per pair, against loading the base.

    .venv/bin/python bench/dpo_memory.py [--base DIR | --size small] [--tokens 1024,8192] [--answer-share 0.5]
                                         [--method dpo] [--control simpo|none] [--checkpointing on|off]
                                         [--kernel auto] [--device cpu] [--work build/dpo-memory] [--no-warmup]
                                         [--dry-run] [--out FILE]

Toolkit side only. Every measurement is a fresh subprocess, run from the repository root, and its peak is the whole
process's maximum resident set (os.wait4's ru_maxrss; bench/dpo_peer.run_measured):
  imports    python importing torch, transformers, peft, trl, datasets and the toolkit's loader and trainer: the
             interpreter and libraries, no model
  load only  the same, then `load_base(BASE, training=True)` as `toolkit train` loads it (it also prints the loaded
             model's tensor bytes: what a second copy of the base would add)
  N tokens   `python -m cli train RECIPE --overwrite` on a recipe generated here: one pair, training.max_steps 1,
             batch_size 1, grad_accum 1, data.max_seq_len 9000 (more if a length asks for it), no held-out rows, the
             quickstart's LoRA shape (r 16, alpha 32, the 7 projections), gradient checkpointing on (--checkpointing)
A pair of N tokens: each side's whole conversation (the user prompt, then that answer, through the Gemma 3 template,
as the toolkit encodes it) is N tokens, of which --answer-share are the answer (the labelled tokens); the prompt is
shared, the chosen and rejected answers are different seeded words of the same token count. One DPO step therefore
runs the policy over 2 rows of N tokens (forward and backward) and the reference over the same 2 rows (forward).
The table gives each process's peak and its increment over "load only". The reference of a new adapter is the base
with the adapter disabled (TRL with peft), so no second copy of the base should be loaded. The check: a control run,
the same step with training.method simpo (no reference model at all; --control none skips it) at the shortest
length; DPO's peak minus the control's is what the reference costs (its forward over the 2 rows, the frozen "ref"
adapter), and a second copy of the base would make it at least the base's tensor bytes. On the default small base
(builder size `small`, 32,768 positions, its 1,773-entry vocabulary: tens of MB of tensors) run-to-run noise of the
resident set is of that order, so the check says little there; `--base build/real-base` (the real 270M: 262k
vocabulary, ~0.4 GB of tensors) makes it sharp.
The first training load of a base shape on a machine times the trainable kernels (kernel_probe.py); a warm-up
"load only" process runs first (not measured) so that the timing is cached before anything is measured
(--no-warmup skips it). The measure is the host's resident set, also with --device cuda (not GPU memory).
--dry-run writes the base, pairs and recipes and prints the commands without running them.
JSON to stdout (last line), the table, and with --out the section of that markdown file. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

# plain words (the filler of prompts and answers): a seeded draw, so the same lengths give the same rows
WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education foot boy age policy process music "
    "market sense nation plan college interest death experience effect use class control care field development "
    "role effort rate heart drug show leader light voice wife police mind price report decision son view"
).split()

IMPORTS = "import torch, transformers, peft, trl, datasets\nimport toolkit.base.loader, toolkit.train.trainer\n"
LOAD_ONLY = IMPORTS + (
    "import json, sys\n"
    "from toolkit.base.loader import load_base\n"
    "from toolkit.base.memory import model_tensor_bytes\n"
    "b = load_base(sys.argv[1], device=sys.argv[2], training=True, kernel=sys.argv[3])\n"
    "print('LOAD_RESULT ' + json.dumps({'tensor_bytes': model_tensor_bytes(b.model), 'kernel': b.kernel, "
    "'dtype': str(b.dtype).removeprefix('torch.')}), flush=True)\n"
)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Encoder:
    """Lengths of conversations as `toolkit train` encodes them (schema check, then the Gemma 3 template)."""

    def __init__(self, base: Path) -> None:
        from toolkit.base.loader import load_processor

        self.processor = load_processor(base)

    def lengths(self, prompt: str, answer: str) -> tuple[int, int]:
        """(tokens of the whole conversation, labelled answer tokens)."""
        from toolkit.data.schema import check_messages
        from toolkit.data.template import encode_conversation

        raw = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        messages, problems = check_messages(raw, purpose="train")
        if problems:
            raise SystemExit(f"bad generated row: {problems}")
        enc = encode_conversation(self.processor, messages, [])
        return len(enc.input_ids), sum(1 for label in enc.labels if label != -100)


def _largest(fits, hi: int) -> int:
    """The largest n in [1, hi] with fits(n) (fits is monotone: true, then false)."""
    lo = 1
    if not fits(lo):
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def make_pair(enc: Encoder, tokens: int, answer_share: float, seed: int) -> tuple[dict, dict]:
    """A pair whose sides are each about `tokens` long (answer: about `answer_share` of them); the row and its
    measured lengths."""
    want_answer = max(4, round(tokens * answer_share))

    def answer_text(tag: str, n: int) -> str:
        return _words(random.Random(f"{tag}-{seed}"), n)

    n_chosen = _largest(lambda n: enc.lengths("q", answer_text("chosen", n))[1] <= want_answer, 2 * want_answer)
    chosen = answer_text("chosen", n_chosen)
    chosen_labels = enc.lengths("q", chosen)[1]
    n_rejected = _largest(lambda n: enc.lengths("q", answer_text("rejected", n))[1] <= chosen_labels, 2 * want_answer)
    rejected = answer_text("rejected", n_rejected)

    def prompt_text(n: int) -> str:
        return "Read this and answer. " + _words(random.Random(f"prompt-{seed}"), n)

    longest = max(chosen, rejected, key=lambda a: enc.lengths("q", a)[1])
    n_prompt = _largest(lambda n: enc.lengths(prompt_text(n), longest)[0] <= tokens, 2 * tokens)
    prompt = prompt_text(n_prompt)
    (c_total, c_ans), (r_total, r_ans) = enc.lengths(prompt, chosen), enc.lengths(prompt, rejected)
    row = {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    sizes = {"chosen_tokens": c_total, "rejected_tokens": r_total, "chosen_answer": c_ans, "rejected_answer": r_ans}
    return row, sizes


def write_recipe(path: Path, *, base: Path, data: Path, name: str, out: Path, args, max_len: int, method: str) -> None:
    import yaml

    training = {
        "method": method,
        "max_steps": 1,
        "batch_size": 1,
        "grad_accum": 1,
        "learning_rate": 1.0e-4,
        "warmup_ratio": 0.0,
        "gradient_checkpointing": args.checkpointing == "on",
        "logging_every": 1,
        "seed": 0,
    }
    recipe = {
        "base": {"path": str(base), "device": args.device, "kernel": args.kernel},
        "data": {"train": str(data), "eval": None, "eval_fraction": 0.0, "max_seq_len": max_len},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": training,
        "output": {"dir": str(out), "name": name},
    }
    path.write_text(
        "# generated by bench/dpo_memory.py: one DPO step of one pair, for its peak memory\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )


def _base(args, work: Path) -> Path:
    if args.base:
        base = Path(args.base).resolve()
        if not (base / "config.json").exists():
            raise SystemExit(f"no base at {base}")
        return base
    base = work / f"base-{args.size}-32k"
    if not (base / "config.json").exists():
        cmd = [sys.executable, "-m", "cli", "tiny-base", str(base), "--size", args.size, "--context", "32768"]
        print("building the base:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return base


def _context(base: Path) -> int:
    from toolkit.base.loader import context_length

    return context_length(json.loads((base / "config.json").read_text()))


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="base folder (default: the builder's --size base, 32k positions)")
    ap.add_argument("--size", default="small", help="builder size of the default base (tiny, small)")
    ap.add_argument("--tokens", default="1024,8192", help="tokens of each side of the pair, comma-separated")
    ap.add_argument("--answer-share", type=float, default=0.5, help="share of each side that is the answer")
    ap.add_argument("--method", choices=["dpo", "orpo", "simpo"], default="dpo")
    ap.add_argument(
        "--control", choices=["simpo", "none"], default="simpo", help="reference-free run at the shortest length"
    )
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on", help="training.gradient_checkpointing")
    ap.add_argument("--kernel", default="auto", help="base.kernel")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--work", default=str(ROOT / "build" / "dpo-memory"), help="base, pairs, recipes, logs")
    ap.add_argument("--no-warmup", action="store_true", help="skip the unmeasured first load (kernel timing)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--dry-run", action="store_true", help="write the pairs and recipes, print the commands")
    ap.add_argument("--out", default=None, help="markdown file whose section to write (e.g. docs/BENCHMARKS.md)")
    args = ap.parse_args()

    from dpo_peer import child_env, run_measured
    from report import cpu_label, cpus, replace_section

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = _base(args, work)
    lengths = [int(t) for t in args.tokens.split(",")]
    max_len = max(9000, max(lengths) + 512)
    if max_len > 32768:
        raise SystemExit("data.max_seq_len is at most 32768: use --tokens up to 32256")
    if _context(base) < max_len:
        raise SystemExit(f"{base} has {_context(base)} positions, fewer than {max_len}: build it with --context 32768")

    enc = Encoder(base)
    jobs = []
    control = args.control if args.method == "dpo" and args.control != "none" else None
    for n in lengths:
        row, sizes = make_pair(enc, n, args.answer_share, seed=n)
        data = work / f"pair-{n}.jsonl"
        data.write_text(json.dumps(row) + "\n")
        methods = [args.method] + ([control] if control and n == min(lengths) else [])
        for method in methods:
            recipe = work / f"{method}-{n}.yaml"
            name = f"{method}-memory-{n}"
            write_recipe(
                recipe,
                base=base,
                data=data,
                name=name,
                out=work / "adapters",
                args=args,
                max_len=max_len,
                method=method,
            )
            cmd = [sys.executable, "-m", "cli", "train", str(recipe), "--overwrite"]
            jobs.append({"tokens": n, "method": method, "sizes": sizes, "recipe": str(recipe), "cmd": cmd})
    del enc

    py = sys.executable
    probes = {
        "imports": [py, "-c", IMPORTS],
        "load only": [py, "-c", LOAD_ONLY, str(base), args.device, args.kernel],
    }
    if args.dry_run:
        for name, cmd in probes.items():
            print(f"{name}: {' '.join(cmd[:2])} <script> {' '.join(cmd[3:])}")
        for j in jobs:
            print(f"{j['method']}, {j['tokens']} tokens {j['sizes']}: {' '.join(j['cmd'])}")
        return

    env = child_env()
    if not args.no_warmup:
        warm = run_measured(probes["load only"], log=work / "logs" / "warmup.txt", env=env, timeout=args.timeout)
        if warm["rc"] != 0:
            raise SystemExit(f"loading the base failed (exit {warm['rc']}); see {warm['log']}")
    results: list[dict] = []
    for name, cmd in probes.items():
        r = run_measured(cmd, log=work / "logs" / f"{name.replace(' ', '-')}.txt", env=env, timeout=args.timeout)
        entry = {"process": name, "rc": r["rc"], "peak_rss_bytes": r["peak_rss_bytes"], "wall_s": r["wall_s"]}
        for line in r["stdout"].splitlines():
            if line.startswith("LOAD_RESULT "):
                entry.update(json.loads(line[len("LOAD_RESULT ") :]))
        results.append(entry)
        print(f"[{name}] peak {_mib(r['peak_rss_bytes'])} (exit {r['rc']})", file=sys.stderr, flush=True)
    for j in jobs:
        log = work / "logs" / f"train-{j['method']}-{j['tokens']}.txt"
        r = run_measured(j["cmd"], log=log, env=env, timeout=args.timeout)
        entry = {
            "process": f"{j['method']} step, {j['tokens']} tokens",
            "method": j["method"],
            "tokens": j["tokens"],
            **j["sizes"],
            "rc": r["rc"],
            "peak_rss_bytes": r["peak_rss_bytes"] if r["rc"] == 0 else None,
            "wall_s": r["wall_s"],
            "log": r["log"],
        }
        results.append(entry)
        print(f"[{j['tokens']} tokens] peak {_mib(entry['peak_rss_bytes'])} (exit {r['rc']})", file=sys.stderr)

    load = next(r for r in results if r["process"] == "load only")
    imports = next(r for r in results if r["process"] == "imports")
    base_bytes = load.get("tensor_bytes")
    for r in results:
        r["over_load_only_bytes"] = (
            r["peak_rss_bytes"] - load["peak_rss_bytes"]
            if r["peak_rss_bytes"] is not None and load["rc"] == 0
            else None
        )
    steps = [r for r in results if r.get("method") == args.method and r["peak_rss_bytes"] is not None]
    shortest = min(steps, key=lambda r: r["tokens"]) if steps else None
    ctrl = next((r for r in results if control and r.get("method") == control and r["peak_rss_bytes"]), None)
    reference_cost = (
        shortest["peak_rss_bytes"] - ctrl["peak_rss_bytes"]
        if shortest and ctrl and ctrl["tokens"] == shortest["tokens"]
        else None
    )
    verdict = reference_cost < base_bytes if reference_cost is not None and base_bytes else None
    cpu = f"{cpu_label()} ({cpus()} cores)"

    header = f"{'process':<26} {'peak RSS':>10} {'over load':>10}  tokens (chosen / rejected, answer)"
    print(header)
    print("-" * len(header))
    for r in results:
        toks = f"{r['chosen_tokens']} / {r['rejected_tokens']}, {r['chosen_answer']}" if "tokens" in r else ""
        over = _mib(r["over_load_only_bytes"]) if "tokens" in r else ""
        failed = f"  (exit {r['rc']}: {r.get('log', '')})" if r["rc"] != 0 else ""
        print(f"{r['process']:<26} {_mib(r['peak_rss_bytes']):>10} {over:>10}  {toks}{failed}")
    print(
        f"base tensors loaded: {_mib(base_bytes)} ({load.get('kernel')} {load.get('dtype')}); libraries alone "
        f"{_mib(imports['peak_rss_bytes'])}; {cpu}"
    )
    if verdict is not None:
        print(
            f"reference cost at {shortest['tokens']} tokens ({args.method} peak - {control} peak) "
            f"{_mib(reference_cost)} {'<' if verdict else '>='} base tensors {_mib(base_bytes)}: "
            + ("no second copy of the base" if verdict else "as much as a second copy of the base: look")
            + ("" if base_bytes >= 200 * 2**20 else " (a small base: within run-to-run noise, see --base)")
        )

    report = {
        "cpu": cpu,
        "base": str(base),
        "method": args.method,
        "checkpointing": args.checkpointing,
        "answer_share": args.answer_share,
        "max_seq_len": max_len,
        "measure": "ru_maxrss of each fresh process (os.wait4)",
        "base_tensor_bytes": base_bytes,
        "reference_cost_bytes": reference_cost,
        "no_second_copy": verdict,
        "results": results,
    }
    if args.out:
        rel = base.relative_to(ROOT) if base.is_relative_to(ROOT) else base
        lines = [
            "## DPO step memory (`bench/dpo_memory.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {cpu}: `toolkit train` with training.method {args.method}, "
            f"one step of one pair (batch 1), base `{rel}` ({load.get('kernel')} {load.get('dtype')}), LoRA r 16 on "
            f"the 7 projections, gradient checkpointing {args.checkpointing}; each side of the pair is the shared "
            f"prompt and its answer ({args.answer_share:.0%} of the tokens). Peak resident set of each fresh process "
            "(ru_maxrss), and its increment over a process that only loads the base:",
            "",
            "| process | tokens per side (chosen / rejected) | peak RSS | over load only |",
            "|---|---|---|---|",
        ]
        for r in results:
            toks = f"{r['chosen_tokens']} / {r['rejected_tokens']}" if "tokens" in r else ""
            over = _mib(r["over_load_only_bytes"]) if "tokens" in r else ""
            lines.append(f"| {r['process']} | {toks} | {_mib(r['peak_rss_bytes'])} | {over} |")
        lines += [
            "",
            f"The loaded base holds {_mib(base_bytes)} of tensors"
            + (
                f"; at {shortest['tokens']} tokens the {args.method} step's peak exceeds the {control} step's (no "
                f"reference) by {_mib(reference_cost)}: "
                + (
                    "less than one copy of the base, so the reference pass loads no second copy."
                    if verdict
                    else "as much as a copy of the base."
                )
                if verdict is not None
                else "."
            ),
            "",
        ]
        replace_section(Path(args.out), "## DPO step memory", "\n".join(lines))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()

"""The merged export on the real Gemma 3 270M: does plain transformers answer as the toolkit does?

    .venv/bin/python bench/export_merged_270m.py              # build/real-base + adapters/sft-270m (~10 min, 2 cores)
    .venv/bin/python bench/export_merged_270m.py --plan-27b   # the 27B's memory plan (27b-shapes base, ~2 min)
    .venv/bin/python bench/export_merged_270m.py --quantize   # the GPTQ re-quantised merge (~15 min)

Default run: `write_merged` of adapters/sft-270m onto build/real-base in bfloat16 and float32 (each in a child
process: wall time and peak RSS), into --out (default /dev/shm: the two folders are 1.6 GB). On every held-out row
of build/preference-task/sft_eval.jsonl: the toolkit's greedy answer with the adapter (the 4-bit base as `toolkit
serve` loads it, the adapter attached, answers from the serving engine, at most 32 new tokens) and plain
transformers' greedy answer from each merged folder (AutoModelForImageTextToText, the folder's own chat template,
`generate`, 32 new tokens). Reported: % identical answers (goal >= 95%), each side's regex match rate, and the
next-token log-probabilities of the toolkit's answer tokens (teacher-forced on the toolkit's prompt + answer, each
model's own log-softmax): max and mean |diff| per prompt, summarised over prompts. Writes
build/export-merged-270m.json. Another process on the machine makes the timings approximate.

--quantize: `write_merged(quantize=True)` (GPTQModel, calibrated on the adapter's training rows) against the
unquantised float32 merge and the toolkit's 4-bit base + adapter: exact match and regex match of the greedy answers,
perplexity of the reference answers (teacher-forced), agreement with the float32 merge's answers; the export's time
and peak RSS. Writes build/export-merged-270m-gptq.json.

--plan-27b: builds the 27b-shapes base (2 layers of the 27B's shapes, tiny vocabulary) under --out, reads its
headers with the exporter's own scan, replicates its layers to the 27B's 62 text / 27 vision layers with the real
262,208-row vocabulary, and plans the shards; then exports that 2-layer base with a random rank-16 adapter on every
projection in a child process to measure the peak RSS with the 27B's largest layers. Writes
build/export-merged-27b-plan.json.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ROOT / "build" / "real-base"
ADAPTER = ROOT / "adapters" / "sft-270m"
ROWS = ROOT / "build" / "preference-task" / "sft_eval.jsonl"
MAX_NEW = 32


def rss_mb() -> float:
    """This process's peak resident set so far, MB. VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss
    across fork and exec, so a child would report its parent's peak (the 27b-shapes build's 4 GB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- child processes


def child_export(adapter_dir: str, out: str, dtype: str, base: str) -> None:
    """Run in a fresh interpreter: one export, printing its seconds and peak RSS as JSON (last line)."""
    from toolkit.lora.export_merged import write_merged
    from toolkit.lora.weights import load_lora

    adapter = load_lora(adapter_dir)
    before = rss_mb()
    start = time.perf_counter()
    files = write_merged(adapter, Path(out), base=Path(base), dtype=dtype)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb(), "rss_before_mb": before, "files": len(files)}))


def child_export_synthetic(base: str, out: str, dtype: str) -> None:
    """A random rank-16 adapter on every text projection of `base` (the 27b-shapes one), exported."""
    import torch

    from toolkit.lora.export_merged import _scan, write_merged
    from toolkit.lora.weights import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(0)
    modules = []
    for t in _scan(Path(base))[0]:
        if t.kind != "dense" and t.module and "language_model" in t.module:
            out_f, in_f = t.shape
            modules.append(LoraModule(t.module, torch.randn(16, in_f, generator=g), torch.randn(out_f, 16) * 0.01, 2.0))
    adapter = LoraAdapter(Path("synthetic-r16"), {"peft_type": "LORA", "r": 16, "lora_alpha": 32}, modules, [])
    before = rss_mb()
    start = time.perf_counter()
    write_merged(adapter, Path(out), base=Path(base), dtype=dtype)
    seconds = time.perf_counter() - start
    adapter_mb = sum(m.a.numel() + m.b.numel() for m in modules) * 4 / 1e6
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb(), "rss_before_mb": before, "adapter_mb": adapter_mb}))


def run_child(*args: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        sys.exit(f"child {args[:2]} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------- answers


def load_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]


def toolkit_answers(
    rows: list[dict], base_dir: Path = BASE, adapter: Path | None = ADAPTER, **load: str
) -> tuple[object, object, list[list[int]], list[list[int]]]:
    """The toolkit's prompt ids and greedy answer ids: the serving engine over the base + adapter (or the base
    alone), loaded as `toolkit serve` loads it (or with the `load_base` options given)."""
    import threading

    from toolkit.base.loader import load_base
    from toolkit.data.schema import check_messages
    from toolkit.data.template import encode_prompt
    from toolkit.engine.engine import Engine, Request, SamplingParams
    from toolkit.lora.registry import attach

    base = load_base(base_dir, **load)
    model = attach(base, [("sft", adapter)]) if adapter else base.model
    prompts = []
    for r in rows:
        messages, problems = check_messages(r["messages"][:-1], purpose="request")
        assert not problems, problems
        prompts.append(encode_prompt(base.processor, messages, []))
    engine = Engine.for_base(base, model, max_batch=8, max_queue=len(rows) + 1, start=False)
    answers: list[list[int]] = [[] for _ in rows]
    finished = threading.Semaphore(0)

    def collector(i: int):
        def on_event(kind: str, value) -> None:
            if kind == "token":
                answers[i].append(value)
            elif kind in ("done", "error"):
                finished.release()

        return on_event

    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
        engine.submit(Request(p.input_ids, p.token_type_ids, None, "sft" if adapter else None, params, collector(i)))
    engine.start()
    try:
        for _ in rows:
            finished.acquire()
    finally:
        engine.close()
    stops = set(base.model.generation_config.eos_token_id or [])
    answers = [[t for t in a if t not in stops] for a in answers]
    return base, model, [p.input_ids for p in prompts], answers


def answer_logprobs(model, prompt: list[int], answer: list[int]) -> list[float]:
    """log p(answer[i] | prompt + answer[:i]) for each i, from one teacher-forced forward."""
    import torch

    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
    logp = torch.log_softmax(logits[positions], -1)
    return logp[torch.arange(len(answer)), torch.tensor(answer)].tolist()


def plain_answers(folder: Path, rows: list[dict]) -> tuple[object, object, list[list[int]], list[list[int]]]:
    """Plain transformers: the merged folder's model and chat template, greedy `generate`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    stops = set(model.generation_config.eos_token_id or [])
    prompts, answers = [], []
    for r in rows:
        inputs = processor.apply_chat_template(
            r["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, top_p=None, top_k=None)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        prompts.append(inputs["input_ids"][0].tolist())
        answers.append(new[: next((i for i, t in enumerate(new) if t in stops), len(new))])
    return model, processor, prompts, answers


def summarise(diffs: list[list[float]]) -> dict:
    per_max = [max(d) for d in diffs if d]
    per_mean = [sum(d) / len(d) for d in diffs if d]
    return {
        "max_abs_diff": max(per_max),
        "mean_of_prompt_max": sum(per_max) / len(per_max),
        "mean_abs_diff": sum(per_mean) / len(per_mean),
        "prompts": len(per_max),
    }


# How the toolkit side is loaded: as `toolkit serve` does (the measured kernel and LM head for this machine), and
# the float32 reference (dequantise + matmul, the exact head), which isolates the merge from serving precision.
TOOLKIT_LOADS = {"serve": {}, "reference": {"kernel": "torch", "lm_head": "exact"}}


def main_270m(out_root: Path) -> None:
    import torch

    rows = load_rows()
    out_root.mkdir(parents=True, exist_ok=True)
    exports = {}
    for dtype in ("bfloat16", "float32"):
        folder = out_root / f"sft-270m-merged-{dtype}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        exports[dtype] = run_child("_export", str(ADAPTER), str(folder), dtype, str(BASE))
        exports[dtype]["bytes"] = sum(f.stat().st_size for f in folder.iterdir())
        print(f"export {dtype}: {exports[dtype]}", file=sys.stderr)

    def regex_rate(texts: list[str]) -> float:
        return sum(bool(re.search(r["regex"], t)) for r, t in zip(rows, texts, strict=True)) / len(rows)

    toolkit = {}
    for label, options in TOOLKIT_LOADS.items():
        start = time.perf_counter()
        base, model, prompts, ids = toolkit_answers(rows, **options)
        text = [base.tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]
        logp = [answer_logprobs(model, p, a) for p, a in zip(prompts, ids, strict=True)]
        toolkit[label] = {
            "load": f"kernel {base.kernel}, head {base.head}, {str(base.dtype).removeprefix('torch.')}",
            "prompts": prompts,
            "ids": ids,
            "text": text,
            "logp": logp,
            "regex_match": regex_rate(text),
            "seconds": time.perf_counter() - start,
        }
        decode = base.tokenizer.decode
        del model, base

    results = {
        "base": str(BASE.relative_to(ROOT)),
        "adapter": str(ADAPTER.relative_to(ROOT)),
        "rows": len(rows),
        "max_new_tokens": MAX_NEW,
        "machine": f"{__import__('os').cpu_count()} CPUs, torch {torch.__version__}; timings approximate (shared)",
        "exports": exports,
        "toolkit": {k: {f: v[f] for f in ("load", "regex_match", "seconds")} for k, v in toolkit.items()},
        "merged": {},
    }
    for dtype in ("bfloat16", "float32"):
        folder = out_root / f"sft-270m-merged-{dtype}"
        start = time.perf_counter()
        model, _, pl_prompts, pl_ids = plain_answers(folder, rows)
        pl_text = [decode(a, skip_special_tokens=True).strip() for a in pl_ids]
        entry = {"regex_match": regex_rate(pl_text), "generate_seconds": time.perf_counter() - start}
        for label, tk in toolkit.items():
            pl_logp = [answer_logprobs(model, p, a) for p, a in zip(tk["prompts"], tk["ids"], strict=True)]
            diffs = [[abs(x - y) for x, y in zip(a, b, strict=True)] for a, b in zip(tk["logp"], pl_logp, strict=True)]
            pairs = list(zip(tk["text"], pl_text, strict=True))
            entry[f"vs_{label}"] = {
                "identical_answers": sum(a == b for a, b in pairs) / len(rows),
                "identical_token_ids": sum(a == b for a, b in zip(tk["ids"], pl_ids, strict=True)) / len(rows),
                "same_prompt_ids": sum(a == b for a, b in zip(tk["prompts"], pl_prompts, strict=True)) / len(rows),
                "logprob": summarise(diffs),
                "differing": [{"row": i, "toolkit": a, "merged": b} for i, (a, b) in enumerate(pairs) if a != b][:10],
            }
        results["merged"][dtype] = entry
        del model
    shutil.rmtree(out_root / "sft-270m-merged-bfloat16", ignore_errors=True)
    shutil.rmtree(out_root / "sft-270m-merged-float32", ignore_errors=True)
    (ROOT / "build" / "export-merged-270m.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    m, t, e = r["merged"], r["toolkit"], r["exports"]
    cols = [(d, k) for k in TOOLKIT_LOADS for d in ("bfloat16", "float32")]
    lines = [
        f"Merged export of {r['adapter']} on {r['base']}: {r['rows']} held-out rows, greedy, at most "
        f"{r['max_new_tokens']} new tokens. Toolkit serve = {t['serve']['load']}; toolkit reference = "
        f"{t['reference']['load']}.",
        "",
        "| merged folder vs toolkit | " + " | ".join(f"{d} vs {k}" for d, k in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| identical answers | " + " | ".join(f"{m[d]['vs_' + k]['identical_answers']:.1%}" for d, k in cols) + " |",
    ]
    for key, label in (
        ("max_abs_diff", "max"),
        ("mean_of_prompt_max", "mean of per-prompt max"),
        ("mean_abs_diff", "mean"),
    ):
        lines.append(
            f"| answer-token log-prob \\|diff\\| ({label}) | "
            + " | ".join(f"{m[d]['vs_' + k]['logprob'][key]:.4f}" for d, k in cols)
            + " |"
        )
    lines += [
        "",
        "| | toolkit serve | toolkit reference | merged bfloat16 | merged float32 |",
        "|---|---|---|---|---|",
        f"| regex match | {t['serve']['regex_match']:.1%} | {t['reference']['regex_match']:.1%} | "
        f"{m['bfloat16']['regex_match']:.1%} | {m['float32']['regex_match']:.1%} |",
        f"| export time, s (in process / wall) | - | - | {e['bfloat16']['seconds']:.1f} / "
        f"{e['bfloat16']['wall_seconds']:.1f} | {e['float32']['seconds']:.1f} / {e['float32']['wall_seconds']:.1f} |",
        f"| export peak RSS, MB (before the export) | - | - | {e['bfloat16']['peak_rss_mb']:.0f} "
        f"({e['bfloat16']['rss_before_mb']:.0f}) | {e['float32']['peak_rss_mb']:.0f} "
        f"({e['float32']['rss_before_mb']:.0f}) |",
        f"| folder size, GB | - | - | {e['bfloat16']['bytes'] / 1e9:.2f} | {e['float32']['bytes'] / 1e9:.2f} |",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- --quantize


def child_export_quantized(adapter_dir: str, out: str, base: str) -> None:
    from toolkit.lora.export_merged import write_merged
    from toolkit.lora.weights import load_lora

    adapter = load_lora(adapter_dir)
    before = rss_mb()
    start = time.perf_counter()
    write_merged(adapter, Path(out), base=Path(base), quantize=True, progress=lambda line: print(line, file=sys.stderr))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb(), "rss_before_mb": before}))


def answer_nll(model, processor, rows: list[dict]) -> tuple[float, int]:
    """Summed negative log-likelihood of the rows' reference answers (teacher-forced, labelled tokens: the
    answer and its <end_of_turn>) and their count."""
    import torch

    from toolkit.data.schema import check_messages
    from toolkit.data.template import IGNORE, encode_conversation

    total, count = 0.0, 0
    for r in rows:
        messages, problems = check_messages(r["messages"], purpose="train")
        assert not problems, problems
        e = encode_conversation(processor, messages, [])
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor(e.labels[1:])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
        keep = labels != IGNORE
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    return total, count


def main_quantize(out_root: Path) -> None:
    import math

    rows = load_rows()
    out_root.mkdir(parents=True, exist_ok=True)
    folders = {"gptq": out_root / "sft-270m-merged-gptq", "float32": out_root / "sft-270m-merged-float32"}
    exports = {}
    for kind, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        if kind == "gptq":
            exports[kind] = run_child("_export_quantized", str(ADAPTER), str(folder), str(BASE))
        else:
            exports[kind] = run_child("_export", str(ADAPTER), str(folder), kind, str(BASE))
        print(f"export {kind}: {exports[kind]}", file=sys.stderr)
    references = [r["messages"][-1]["content"].strip() for r in rows]
    systems = {}

    def record(label: str, texts: list[str], nll: tuple[float, int], note: str) -> None:
        systems[label] = {
            "note": note,
            "exact_match": sum(a == b for a, b in zip(texts, references, strict=True)) / len(rows),
            "regex_match": sum(bool(re.search(r["regex"], t)) for r, t in zip(rows, texts, strict=True)) / len(rows),
            "answer_perplexity": math.exp(nll[0] / nll[1]),
            "texts": texts,
        }

    for label, base_dir, adapter in (
        ("re-quantised merge (toolkit, no adapter)", folders["gptq"], None),
        ("4-bit base + adapter (toolkit)", BASE, ADAPTER),
    ):
        base, model, _, ids = toolkit_answers(rows, base_dir, adapter)
        texts = [base.tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]
        record(label, texts, answer_nll(model, base.processor, rows), f"kernel {base.kernel}, head {base.head}")
        processor = base.processor
        del base, model
    model, _, _, pl_ids = plain_answers(folders["float32"], rows)
    texts = [processor.tokenizer.decode(a, skip_special_tokens=True).strip() for a in pl_ids]
    record("merged float32 (plain transformers)", texts, answer_nll(model, processor, rows), "unquantised merge")
    del model
    merged = systems["merged float32 (plain transformers)"]["texts"]
    for s in systems.values():
        s["same_answer_as_float32_merge"] = sum(a == b for a, b in zip(s["texts"], merged, strict=True)) / len(rows)
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    result = {"rows": len(rows), "exports": exports, "systems": systems}
    (ROOT / "build" / "export-merged-270m-gptq.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| system | exact match | regex match | answer perplexity | same answer as the float32 merge |",
        "|---|---|---|---|---|",
    ]
    for label, s in systems.items():
        lines.append(
            f"| {label} | {s['exact_match']:.3f} | {s['regex_match']:.3f} | {s['answer_perplexity']:.4f} | "
            f"{s['same_answer_as_float32_merge']:.1%} |"
        )
    e = exports["gptq"]
    lines.append(f"\n--quantize export: {e['seconds']:.0f} s, peak RSS {e['peak_rss_mb']:.0f} MB")
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------- the 27B plan


def main_plan_27b(out_root: Path) -> None:
    from copy import deepcopy

    from toolkit.base import builder
    from toolkit.lora.export_merged import _scan, memory_plan

    text_layers, vision_layers, vocab = 62, 27, 262208  # google/gemma-3-27b-it's config (bench/memory_plan.py)
    out_root.mkdir(parents=True, exist_ok=True)
    base = out_root / "base-27b-shapes"
    if not (base / "config.json").exists():
        builder.build(base, size="27b-shapes", overwrite=True)
    tensors = _scan(base)[0]
    scaled = []
    for t in tensors:
        m = re.search(r"(language_model\.model\.layers|encoder\.layers)\.(\d+)\.", t.name)
        if m is None:
            if t.name.endswith("embed_tokens.weight"):
                t = deepcopy(t)
                t.shape = (vocab, t.shape[1])
            scaled.append(t)
            continue
        if m.group(2) != "0":
            continue
        for i in range(text_layers if m.group(1).startswith("language") else vision_layers):
            c = deepcopy(t)
            c.name = t.name.replace(f"{m.group(1)}.0.", f"{m.group(1)}.{i}.")
            scaled.append(c)
    plan = {dtype: memory_plan(scaled, dtype) for dtype in ("bfloat16", "float32")}
    projections = [t for t in scaled if t.kind != "dense" and "language_model" in t.name]
    lora_params = sum(16 * (t.shape[0] + t.shape[1]) for t in projections)
    folder = out_root / "merged-27b-shapes"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    measured = run_child("_export_synthetic", str(base), str(folder), "bfloat16")
    shutil.rmtree(folder, ignore_errors=True)
    result = {
        "shapes": "27b-shapes base headers, layers replicated to 62 text / 27 vision, vocabulary 262,208",
        "plan": plan,
        "rank16_all_projections": {"parameters": lora_params, "float32_bytes": lora_params * 4},
        "measured_27b_shapes_2_layers_bf16": measured,
        "estimated_27b_peak_rss_mb": measured["peak_rss_mb"] + lora_params * 4 / 1e6 - measured["adapter_mb"],
    }
    (ROOT / "build" / "export-merged-27b-plan.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_export":
        return child_export(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "_export_quantized":
        return child_export_quantized(*sys.argv[2:5])
    if len(sys.argv) > 1 and sys.argv[1] == "_export_synthetic":
        return child_export_synthetic(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/dev/shm/export-merged-bench"), help="scratch folder")
    p.add_argument("--plan-27b", action="store_true", help="the 27B's memory plan instead of the 270M run")
    p.add_argument("--quantize", action="store_true", help="the GPTQ re-quantised merge instead of the 270M run")
    args = p.parse_args()
    if args.quantize:
        main_quantize(args.out)
    elif args.plan_27b:
        main_plan_27b(args.out)
    else:
        main_270m(args.out)


if __name__ == "__main__":
    main()

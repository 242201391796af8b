"""Peak training memory of one long row: the chunked loss vs the model's own loss over the full logits.

    .venv/bin/python bench/long_row_memory.py [--tokens 1024] [--vocab 262208] [--base DIR | --size tiny --layers N]
                                                [--device auto] [--kernel auto]

Both variants run the training step `toolkit train` runs (toolkit/train/loss.py): the 4-bit base from the toolkit's
loader, a LoRA of the quickstart's shape, gradient checkpointing, one row of `--tokens` tokens whose second half
is the answer (labels), forward and backward. "chunked" calls the model as SFTTrainer's fused LM head does
(`fused_lm_head=True`: log-probabilities in [4096 x 32768] tiles, never the [tokens, vocab] logits); "plain"
calls it with labels, as transformers' Trainer does (`training.chunked_loss: off`). Each variant runs in a fresh
subprocess, so neither sees the other's allocations. Peak memory of the step:
  CUDA  torch.cuda.max_memory_allocated() during the step minus what was allocated before it (allocator bytes)
  CPU   the process's peak resident set (VmHWM, reset through /proc/self/clear_refs right before the step) minus
        its resident set before the step (RSS delta: includes allocator slack, so it is an upper bound)
The vocabulary is what makes the logits the largest term, and the tiny base has only 1,773 entries: by default
its tied embeddings (the LM head) are widened to the 27B's 262,208 rows of seeded random values (`--vocab 0`
keeps the base's own). The default base is the tiny base with 32,768 positions; `--base DIR` takes another
(the real 270M base, say). The loss and the LoRA gradients of the two variants are compared as well.
The last line printed is JSON: {"chunked_peak_bytes", "plain_peak_bytes", "ratio", ...}; bench/long_context.py
reads it. Goal: ratio <= 0.5. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_VOCAB = 262208  # the 27B checkpoint's vocabulary (embedding rows)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One variant in this process: load, one step, print {"peak_bytes", "loss", ...} as JSON."""
    import torch

    sys.path.insert(0, str(ROOT))
    from trl.trainer.utils import add_fused_lm_head

    from toolkit.base.loader import load_base
    from toolkit.lora.config import apply_lora
    from toolkit.recipe import LoraSection

    device = None if args.device == "auto" else args.device
    base = load_base(args.base, device=device, training=True, kernel=args.kernel)
    model = base.model
    text = model.config.get_text_config()
    torch.manual_seed(0)
    vocab_in_use = min(text.vocab_size, len(base.tokenizer))
    if args.vocab:
        model.resize_token_embeddings(args.vocab, mean_resizing=False)  # new rows: seeded random
    model = apply_lora(model, LoraSection(r=16, alpha=32, dropout=0.0))
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()

    device = base.device
    ids = torch.randint(10, vocab_in_use, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : args.tokens // 2] = -100  # the prompt half is not trained on
    batch = {
        "input_ids": ids.to(device),
        "token_type_ids": torch.zeros_like(ids).to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "use_cache": False,
    }
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _rss_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    try:
        out = model(**batch, fused_lm_head=args.mode == "chunked")
        out.loss.backward()
    except torch.OutOfMemoryError:
        print(json.dumps({"mode": args.mode, "peak_bytes": None, "error": "out of memory"}))
        return
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _rss_kb("VmHWM") * 1024 - before
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    if args.grads:
        torch.save(grads, args.grads)
    record = {
        "mode": args.mode,
        "peak_bytes": peak,
        "loss": float(out.loss),
        "step_s": round(seconds, 2),
        "device": device,
        "dtype": str(base.dtype).replace("torch.", ""),
        "vocab": model.get_input_embeddings().weight.shape[0],
    }
    print(json.dumps(record))


def run_variant(mode: str, args: argparse.Namespace, base: Path, grads: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--base", str(base), "--tokens", str(args.tokens)]
    cmd += ["--vocab", str(args.vocab), "--device", args.device, "--kernel", args.kernel, "--grads", str(grads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{mode} variant failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024, help="tokens in the row (half of them labelled)")
    ap.add_argument("--vocab", type=int, default=REAL_VOCAB, help="widen the LM head to this many rows (0: keep)")
    ap.add_argument("--base", default=None, help="base folder (default: the tiny base with 32,768 positions)")
    ap.add_argument("--size", default="tiny", help="shape of the built base (tiny, small, 27b-shapes)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the built base (default: the size's)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--kernel", default="auto", help="GPTQ kernel for the 4-bit layers (base.kernel)")
    ap.add_argument("--child", choices=["chunked", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--grads", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else None
        if base is None:
            sys.path.insert(0, str(ROOT))
            from toolkit.base import builder

            base = builder.build(Path(tmp) / "base", seed=0, size=args.size, layers=args.layers, context=32768)
        results = {m: run_variant(m, args, base, Path(tmp) / f"{m}.pt") for m in ("chunked", "plain")}
        import torch

        report = {
            "tokens": args.tokens,
            "vocab": results["chunked"]["vocab"],
            "device": results["chunked"]["device"],
            "dtype": results["chunked"]["dtype"],
            "measure": "cuda max_memory_allocated delta"
            if results["chunked"]["device"].startswith("cuda")
            else "peak RSS delta (VmHWM after clear_refs)",
            "step_s": {m: r["step_s"] for m, r in results.items() if "step_s" in r},
        }
        if results["plain"]["peak_bytes"] is not None:
            a, b = torch.load(Path(tmp) / "chunked.pt"), torch.load(Path(tmp) / "plain.pt")
            report["loss"] = {m: r["loss"] for m, r in results.items()}
            report["max_lora_grad_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
            report["max_lora_grad"] = max(float(b[k].abs().max()) for k in b)
    chunked, plain = results["chunked"]["peak_bytes"], results["plain"]["peak_bytes"]
    report["chunked_peak_bytes"], report["plain_peak_bytes"] = chunked, plain
    report["ratio"] = round(chunked / plain, 4) if plain else None  # None: the plain step ran out of memory
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""The CUDA path on a GPTQ Gemma 3 with the 27B's layer shapes but few layers (random weights).

    python bench/gpu_path.py [--layers 4] [--seq 2048] [--device cuda] [--kernels marlin,triton]
    python bench/gpu_path.py --from-json gpu_path.json --out docs/BENCHMARKS.md   # write the docs section later

Builds the base with the tiny-base builder (`--size 27b-shapes`, compressed-tensors like the real checkpoint) and:
  1. every CUDA kernel candidate (Marlin, ExLlama v2, Machete, Triton, torch; bfloat16) side by side through
     bench/kernels.py: decode tokens/s (1 and 16 rows, KV cache), prefill tokens/s, the logits' largest difference
     from the dequantised float32 reference, whether peft wraps it in LoRA, LoRA-weight and layer-input gradients
     against the reference, a LoRA step's tokens/s and peak GPU memory; a candidate that fails records its error
  2. the toolkit's own choice (load_base, kernel auto): which kernel and dtype it took, generation tokens/s through
     the serving engine at 1 and 16 sequences, and one QLoRA step (r=16, 7 projections, gradient checkpointing,
     AdamW) on `--seq` tokens: tokens/s and peak memory
Prints a JSON summary to stdout and to $OUT/gpu_path.json when OUT is set; `--out` writes the "GPU path" section of
docs/BENCHMARKS.md. `--device cpu` runs the same code on the tiny base as a smoke check. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def generation(base, device: str, rows: int, max_tokens: int) -> float:
    """Completion tokens/s of `rows` greedy requests decoded together by the serving engine."""
    from toolkit.engine.engine import Engine, Request, SamplingParams

    engine = Engine.for_base(base, max_batch=rows, max_queue=rows + 1, start=False)
    done = threading.Semaphore(0)
    counted = [0]

    def on_event(kind, value):
        if kind == "token":
            counted[0] += 1
        elif kind in ("done", "error"):
            done.release()

    prompt = list(range(10, 138))  # 128 prompt tokens
    for _ in range(rows):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.submit(Request(prompt, [0] * len(prompt), None, None, params, on_event))
    t = time.perf_counter()
    engine.start()
    for _ in range(rows):
        done.acquire()
    _sync(device)
    seconds = time.perf_counter() - t
    engine.close()
    return counted[0] / seconds


def train_step(base, device: str, seq: int) -> dict:
    import torch

    from toolkit.lora.config import apply_lora
    from toolkit.recipe import LoraSection

    model = apply_lora(base.model, LoraSection())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(10, 1000, (1, seq), device=base.device)
    batch = {"input_ids": ids, "labels": ids, "token_type_ids": torch.zeros_like(ids)}
    times = []
    for _ in range(3):  # the first step includes kernel warm-up
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    kernels = sorted({type(m.base_layer).__name__ for m in model.modules() if hasattr(m, "base_layer")})
    return {"tokens_per_s": seq / min(times[1:]), "loss": loss.item(), "lora_wraps": kernels}


def _guard(result: dict, key: str, fn, *args):
    """Run one measurement; a failure is recorded in the summary (with its error) instead of ending the run."""
    try:
        result[key] = fn(*args)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        result[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


def measure(args) -> dict:
    import torch

    from toolkit.base import builder as tiny_base
    from toolkit.base import gptq_backend
    from toolkit.base.loader import load_base

    sys.path.insert(0, str(ROOT / "bench"))
    import kernels as kernel_bench

    cuda = args.device.startswith("cuda")
    size = "27b-shapes" if cuda else "tiny"
    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "size": size,
        "layers": args.layers,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import gptqmodel

        result["gptqmodel"] = gptqmodel.__version__
    except Exception as exc:
        result["gptqmodel"] = f"import failed: {exc}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_base.build(Path(tmp) / "base", seed=0, size=size, layers=args.layers)
        only = args.kernels.split(",") if args.kernels else None
        _guard(result, "kernels", kernel_bench.measure, folder, args.device, args.rounds, only)
        if args.skip_toolkit:
            return result
        toolkit: dict = result.setdefault("toolkit", {})
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            base = load_base(folder, device=args.device)
            toolkit.update(
                kernel=base.kernel,
                dtype=str(base.dtype),
                gptq_kernels=gptq_backend.layer_kernels(base.model),
                load_s=time.perf_counter() - t,
                memory_after_load_gb=_peak_gb(args.device),
            )
            _guard(toolkit, "generate_tokens_per_s_1", generation, base, args.device, 1, args.max_tokens)
            _guard(toolkit, "generate_tokens_per_s_16", generation, base, args.device, 16, args.max_tokens)
            del base
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            train_base = load_base(folder, device=args.device, training=True)
            toolkit["train_kernel"] = train_base.kernel
            _guard(toolkit, "train", train_step, train_base, args.device, args.seq if cuda else 128)
            toolkit["train_peak_memory_gb"] = _peak_gb(args.device)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            toolkit["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return result


def section(r: dict, args) -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    import kernels as kernel_bench

    t = r.get("toolkit", {})
    lines = [
        "## GPU path (`bench/gpu_path.py`)",
        "",
        f"Measured {r.get('date')} on {r['device']} (torch {r.get('torch')}, GPTQModel {r.get('gptqmodel')}): a GPTQ "
        f"Gemma 3 with the 27B's layer shapes and {r['layers']} layers (random weights, compressed-tensors like the "
        "real checkpoint). Reference: the torch kernel in float32 (exact dequantisation).",
        "",
    ]
    if isinstance(r.get("kernels"), dict) and "error" not in r["kernels"]:
        lines += kernel_bench.table(r["kernels"]) + [""]
        peaks = [
            f"{n} {k.get('inference_peak_gb')} / {k.get('train_peak_gb')} GB"
            for n, k in r["kernels"].items()
            if "unavailable" not in k
        ]
        lines += ["Peak GPU memory (inference / LoRA step): " + ", ".join(peaks), ""]
    else:
        lines += [f"Kernel comparison failed: {r.get('kernels')}", ""]
    if "kernel" in t:
        train = t.get("train", {})
        lines += [
            f"- the toolkit's auto choice: {t['kernel']} for inference ({', '.join(t['gptq_kernels'])}, {t['dtype']}), "
            f"{t.get('train_kernel')} for training; load {t['load_s']:.1f} s; memory after load "
            f"{t['memory_after_load_gb']} GB",
            f"- generation (serving engine, 128-token prompt, {args.max_tokens} tokens): "
            f"{t.get('generate_tokens_per_s_1')} tokens/s for 1 sequence, {t.get('generate_tokens_per_s_16')} for 16",
            f"- QLoRA step (r=16, 7 projections, gradient checkpointing, AdamW, {args.seq} tokens): "
            f"{train.get('tokens_per_s', train)} tokens/s, peak memory {t.get('train_peak_memory_gb')} GB",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels", default=None, help="comma-separated subset of the candidates")
    ap.add_argument("--skip-toolkit", action="store_true", help="only the kernel comparison")
    ap.add_argument("--from-json", default=None, help="write the docs section from a saved summary, measure nothing")
    ap.add_argument("--out", default=None, help="write the GPU path section into this BENCHMARKS.md")
    args = ap.parse_args()

    result = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if os.environ.get("OUT") and not args.from_json:
        Path(os.environ["OUT"], "gpu_path.json").write_text(text)
    if args.out:
        sys.path.insert(0, str(ROOT / "bench"))
        from report import replace_section

        replace_section(Path(args.out), "## GPU path", section(result, args))


if __name__ == "__main__":
    main()

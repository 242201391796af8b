"""The CUDA path on a GPTQ Gemma 3 with the 27B's layer shapes but few layers (random weights).

    .venv/bin/python bench/gpu_path.py [--layers 4] [--seq 2048] [--device cuda]

Builds the base with the tiny-base builder (`--size 27b-shapes`, compressed-tensors like the real checkpoint),
loads it through the toolkit (repack -> GPTQModel, bfloat16 on CUDA), and measures:
  - which GPTQ kernel the language model's 4-bit layers run on, and the dtype
  - generation tokens/s through the serving engine, 1 and 16 concurrent sequences
  - one QLoRA training step (r=16, all 7 projections, gradient checkpointing, AdamW) on `--seq` tokens:
    tokens/s and peak memory
On CUDA the results go to docs/BENCHMARKS.md ("GPU path") with the device named; `--device cpu` runs the same
code small as a smoke check and writes nothing. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
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
    from toolkit.engine import Engine, Request, SamplingParams

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

    from toolkit.lora import apply_lora
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()
    import torch

    from toolkit import tiny_base
    from toolkit.base import load_base
    from toolkit.gptq_backend import is_quantized_linear

    cuda = args.device.startswith("cuda")
    size = "27b-shapes" if cuda else "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_base.build(Path(tmp) / "base", seed=0, size=size, layers=args.layers)
        t = time.perf_counter()
        base = load_base(folder, device=args.device)
        load_s = time.perf_counter() - t
        quant = sorted({type(m).__name__ for m in base.model.modules() if is_quantized_linear(m)})
        weights_gb = _peak_gb(args.device)
        result = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "size": size,
            "layers": args.layers,
            "dtype": str(base.dtype),
            "gptq_kernels": quant,
            "load_s": load_s,
            "memory_after_load_gb": weights_gb,
            "generate_tokens_per_s_1": generation(base, args.device, 1, args.max_tokens),
            "generate_tokens_per_s_16": generation(base, args.device, 16, args.max_tokens),
        }
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result["train"] = train_step(base, args.device, args.seq if cuda else 128)
        result["train_peak_memory_gb"] = _peak_gb(args.device)
    print(json.dumps(result, indent=2))
    if not cuda:
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from report import replace_section

    r = result
    text = "\n".join(
        [
            "## GPU path (`bench/gpu_path.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {r['device']}: a GPTQ Gemma 3 with the 27B's layer shapes and "
            f"{r['layers']} layers (random weights, compressed-tensors like the real checkpoint), loaded by the "
            "toolkit.",
            "",
            f"- dtype {r['dtype']}; 4-bit layers run on {', '.join(r['gptq_kernels'])}; load {r['load_s']:.1f} s; "
            f"memory after load {r['memory_after_load_gb']:.2f} GB",
            f"- generation (serving engine, 128-token prompt, {args.max_tokens} tokens): "
            f"{r['generate_tokens_per_s_1']:.0f} tokens/s for 1 sequence, {r['generate_tokens_per_s_16']:.0f} "
            "for 16 together",
            f"- QLoRA step (r=16, 7 projections, gradient checkpointing, AdamW, {args.seq} tokens): "
            f"{r['train']['tokens_per_s']:.0f} tokens/s, peak memory {r['train_peak_memory_gb']:.2f} GB; LoRA wraps "
            f"{', '.join(r['train']['lora_wraps'])}",
            "",
        ]
    )
    replace_section(Path(args.out), "## GPU path", text)


if __name__ == "__main__":
    main()

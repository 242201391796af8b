"""GPTQ kernel candidates side by side on one base: speed, LoRA, gradients and logits against the reference.

    .venv/bin/python bench/kernels.py [--size tiny|small|27b-shapes] [--layers N] [--base DIR] [--device cpu]
                                      [--rounds 3] [--out docs/BENCHMARKS.md]

For every kernel toolkit/base/kernels.py knows on the device (unavailable ones are listed with the reason):
  - inference: greedy decode tokens/s with a KV cache at 1 and 16 rows (64-token prompt, 16 new tokens), and
    prefill tokens/s (one 256-token prompt); timing rounds alternate between kernels, median reported
  - logits: largest absolute difference from the reference (the torch kernel in float32: each weight dequantised
    exactly) on one 64-token prompt, and the share of positions whose top token agrees
  - training: whether peft wraps every 4-bit layer in a LoRA layer, one LoRA forward+backward step's tokens/s
    (4 x 128 tokens), and the largest relative difference of the LoRA weights' gradients and of the gradient at
    the language model's input (the embeddings) from the reference, with the same LoRA weights
Prints a JSON summary (also to $OUT/kernels.json when OUT is set); on `--out` writes the table to
docs/BENCHMARKS.md ("Kernels (<size>)"). bench/gpu_path.py runs the same on CUDA. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".strip()


def load(folder: Path, device: str, kernel, training: bool):
    """Load `folder` with one kernels.Kernel (the loader's own path, dtype included)."""
    import torch

    from toolkit.base import gptq_backend, quant_format

    model = gptq_backend.load_gptq(quant_format.ensure_gptq(folder), device=device, kernel=kernel, training=training)
    model.eval()
    model.requires_grad_(False)
    model.toolkit_dtype = getattr(torch, kernel.dtype)
    return model


def reference_kernel(device: str):
    from toolkit.base import kernels

    return dataclasses.replace(kernels.get("torch", device), dtype="float32")


def decode_seconds(model, device: str, rows: int, prompt: int = 64, new: int = 16) -> float:
    """Seconds per decode step of `rows` sequences (greedy, KV cache), after a prompt of `prompt` tokens."""
    import torch

    ids = torch.randint(10, 200, (rows, prompt), device=device, generator=None)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
    return (time.perf_counter() - t) / new


def prefill_seconds(model, device: str, tokens: int = 256) -> float:
    import torch

    ids = torch.randint(10, 200, (1, tokens), device=device)
    with torch.no_grad():
        _sync(device)
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        _sync(device)
    return time.perf_counter() - t


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def lora_model(model, seed: int = 0):
    """peft LoRA r=16 on the 7 projections with a seeded non-zero B (so every LoRA weight gets a gradient)."""
    import torch

    from toolkit.lora.config import apply_lora
    from toolkit.recipe import LoraSection

    peft_model = apply_lora(model, LoraSection(dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    for _name, p in sorted(peft_model.named_parameters()):
        if p.requires_grad:
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    peft_model.train()
    return peft_model


def lora_wraps(peft_model) -> dict:
    """Whether every 4-bit layer got a LoRA wrapper, and the classes involved."""
    from toolkit.base.gptq_backend import is_quantized_linear

    quant = [n for n, m in peft_model.named_modules() if is_quantized_linear(m)]
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and is_quantized_linear(m.base_layer)]
    kinds = sorted({type(m).__name__ for m in peft_model.modules() if hasattr(m, "lora_A")})
    return {"quantized": len(quant), "wrapped": len(wrapped), "ok": len(wrapped) == len(quant) > 0, "lora": kinds}


def grads(peft_model, ids, device: str) -> tuple[dict, object, float]:
    """One LoRA forward+backward on `ids`: LoRA weight grads, the input-embedding grad, seconds."""
    import torch

    embed = peft_model.get_input_embeddings()
    inputs = embed(ids).detach().to(peft_model.toolkit_dtype).requires_grad_(True)
    _sync(device)
    t = time.perf_counter()
    out = peft_model(inputs_embeds=inputs, labels=ids, token_type_ids=torch.zeros_like(ids))
    out.loss.backward()
    _sync(device)
    seconds = time.perf_counter() - t
    g = {n: p.grad.float().cpu() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
    peft_model.zero_grad(set_to_none=True)
    return g, inputs.grad.float().cpu(), seconds


def rel_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if device.startswith("cuda") else None


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure(folder: Path, device: str, rounds: int = 3, only: list[str] | None = None) -> dict:
    """Every candidate kernel on `device` against the float32 dequantised reference; errors are recorded."""
    import torch

    from toolkit.base import gptq_backend, kernels

    torch.manual_seed(0)
    ids = torch.randint(10, 200, (1, 64)).to(device)
    train_ids = torch.randint(10, 200, (4, 128)).to(device)
    results: dict[str, dict] = {}
    candidates = [k for k in kernels.KERNELS if k.device == kernels.device_type(device)]
    if only:
        candidates = [k for k in candidates if k.name in only]

    try:
        ref_device = device
        ref_logits, ref_g, ref_in = _reference(folder, device, ids, train_ids)
    except Exception:  # e.g. a CUDA dequantiser that refuses float32: the reference is exact on the CPU too
        traceback.print_exc(file=sys.stderr)
        _free(device)
        ref_device = "cpu"
        ref_logits, ref_g, ref_in = _reference(folder, "cpu", ids.cpu(), train_ids.cpu())

    # inference: all loaded at once on CPU so the timing rounds can alternate (other work shares the cores);
    # one at a time on CUDA, where peak memory per kernel is wanted and the device is not shared
    loaded = {}
    for k in candidates:
        r = results[k.name] = {"kernel": k.name, "layer": k.layer, "dtype": k.dtype, "trains": k.trains}
        r["reference_device"] = ref_device
        why = gptq_backend.unavailable(k)
        if why:
            r["unavailable"] = why
            continue
        try:
            _peak_reset(device)
            model = load(folder, device, k, training=False)
            r["layers_loaded"] = gptq_backend.layer_kernels(model)
            out = logits(model, ids)
            r["logits_max_abs_diff"] = float((out - ref_logits).abs().max())
            r["logits_scale"] = float(ref_logits.abs().max())
            r["top1_agreement"] = float((out.argmax(-1) == ref_logits.argmax(-1)).float().mean())
            decode_seconds(model, device, 1, new=2)  # warm-up (aten kernels repack at the first forward)
            decode_seconds(model, device, 16, new=2)
            loaded[k.name] = model
            if device.startswith("cuda"):
                _time_inference({k.name: model}, results, device, rounds)
                r["inference_peak_gb"] = _peak_gb(device)
                del loaded[k.name], model
                _free(device)
        except Exception as exc:
            r["inference_error"] = _error(exc)
            traceback.print_exc(file=sys.stderr)
    if loaded:
        _time_inference(loaded, results, device, rounds)
    loaded.clear()
    _free(device)

    for k in candidates:
        r = results[k.name]
        if "unavailable" in r:
            continue
        try:
            _peak_reset(device)
            peft_model = lora_model(load(folder, device, k, training=True))
            r["lora_wrap"] = lora_wraps(peft_model)
            g, g_in, _ = grads(peft_model, train_ids, device)  # warm-up and the gradient check
            r["lora_grad_max_rel_diff"] = (
                max(rel_diff(g[n], ref_g[n]) for n in ref_g) if g.keys() == ref_g.keys() else None
            )
            r["lora_grads_present"] = f"{len(g)}/{len(ref_g)}"
            r["input_grad_max_rel_diff"] = rel_diff(g_in, ref_in)
            times = [grads(peft_model, train_ids, device)[2] for _ in range(rounds)]
            r["train_tokens_per_s"] = round(train_ids.numel() / statistics.median(times), 1)
            r["train_peak_gb"] = _peak_gb(device)
            del peft_model
        except Exception as exc:
            r["train_error"] = _error(exc)
            traceback.print_exc(file=sys.stderr)
        _free(device)
    return results


def _reference(folder: Path, device: str, ids, train_ids):
    """The torch kernel in float32 (each weight dequantised exactly): logits, LoRA grads, input-embedding grad."""
    ref_kernel = reference_kernel(device)
    ref = load(folder, device, ref_kernel, training=False)
    ref_logits = logits(ref, ids)
    del ref
    _free(device)
    ref_train = lora_model(load(folder, device, ref_kernel, training=True))
    ref_g, ref_in, _ = grads(ref_train, train_ids, device)
    del ref_train
    _free(device)
    return ref_logits, ref_g, ref_in


def _time_inference(models: dict, results: dict, device: str, rounds: int) -> None:
    times: dict[str, dict[str, list[float]]] = {n: {"d1": [], "d16": [], "pre": []} for n in models}
    for _ in range(rounds):  # alternate: each round runs every kernel once
        for name, model in models.items():
            times[name]["d1"].append(decode_seconds(model, device, 1))
            times[name]["d16"].append(decode_seconds(model, device, 16))
            times[name]["pre"].append(prefill_seconds(model, device))
    for name, t in times.items():
        r = results[name]
        r["decode_tokens_per_s_1"] = round(1 / statistics.median(t["d1"]), 1)
        r["decode_tokens_per_s_16"] = round(16 / statistics.median(t["d16"]), 1)
        r["prefill_tokens_per_s"] = round(256 / statistics.median(t["pre"]), 1)


def table(results: dict) -> list[str]:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))

    lines = [
        "| kernel | layer | dtype | decode tok/s (1 row) | decode tok/s (16 rows) | prefill tok/s | logits max diff "
        "| top-1 agree | LoRA wraps | LoRA grad rel diff | input grad rel diff | train tok/s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        if "unavailable" in r:
            lines.append(f"| {r['kernel']} | {r['layer']} | {r['dtype']} | unavailable here: {r['unavailable']} |")
            continue
        wrap = r.get("lora_wrap", {})
        lines.append(
            f"| {r['kernel']} | {r['layer']} | {r['dtype']} | {f(r.get('decode_tokens_per_s_1'))} "
            f"| {f(r.get('decode_tokens_per_s_16'))} | {f(r.get('prefill_tokens_per_s'))} "
            f"| {f(r.get('logits_max_abs_diff'), '{:.3g}')} | {f(r.get('top1_agreement'), '{:.2f}')} "
            f"| {'yes' if wrap.get('ok') else ('no' if wrap else '-')} "
            f"| {f(r.get('lora_grad_max_rel_diff'), '{:.2g}')} | {f(r.get('input_grad_max_rel_diff'), '{:.2g}')} "
            f"| {f(r.get('train_tokens_per_s'))} | {r.get('inference_error') or r.get('train_error') or ''} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", help="tiny-base preset to build (tiny, small, 27b-shapes)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--base", default=None, help="measure this base folder instead of building one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernels", default=None, help="comma-separated subset")
    ap.add_argument("--out", default=None, help="write the table into this BENCHMARKS.md")
    args = ap.parse_args()
    from report import cpu_label, cpus, replace_section

    from toolkit.base import builder, kernels

    only = args.kernels.split(",") if args.kernels else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            Path(args.base)
            if args.base
            else builder.build(Path(tmp) / "base", seed=0, size=args.size, layers=args.layers, fmt="gptq")
        )
        label = args.base or f"{args.size}" + (f", {args.layers} layers" if args.layers else "")
        results = measure(folder, args.device, args.rounds, only)
    summary = {
        "base": label,
        "device": args.device,
        "cpus": cpus(),
        "auto": {p: kernels.choose(args.device, p).kernel.name for p in kernels.PHASES},
        "kernels": results,
    }
    print(json.dumps(summary, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(table(results)), file=sys.stderr)
    if args.out:
        text = "\n".join(
            [
                f"## Kernels ({label}, {args.device})",
                "",
                f"`bench/kernels.py --size {args.size}{f' --layers {args.layers}' if args.layers else ''}`, "
                f"{time.strftime('%Y-%m-%d')}, {cpu_label()} with {cpus()} cores "
                "shared with other work (timing rounds alternate between kernels; median of "
                f"{args.rounds}). Reference: the torch kernel in float32. auto picks "
                f"{summary['auto']['inference']} for inference; for training "
                + (
                    "the fastest trainable kernel, timed on the base at its first training load on the machine "
                    "(toolkit/base/kernel_probe.py)."
                    if args.device == "cpu"
                    else f"{summary['auto']['training']}."
                ),
                "",
                *table(results),
                "",
            ]
        )
        replace_section(Path(args.out), f"## Kernels ({label}, {args.device})", text)


if __name__ == "__main__":
    main()

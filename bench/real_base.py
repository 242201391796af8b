"""Quality and build time of the real 270M base: perplexity of the 4-bit base / the dequantised GGUF weights.

    python bench/real_base.py                       # default GPTQ settings (the cached base, built if missing)
    python bench/real_base.py --samples 128 --mse 2.4 --true-sequential   # another setting (cached apart)

Prints, on held-out English (standard-library docstrings, never calibration data) and on the calibration text
(pydoc_data.topics): perplexity of the dequantised GGUF weights (float32, the reference), of round-to-nearest
4-bit (the tiny builder's quantiser, applied in memory to the same weights) and of the GPTQ base as the toolkit
loads it from disk; the ratios; and the build time. Goal: held-out GPTQ / reference <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def perplexity(model, ids: list[int], window: int, bos: int) -> float:
    """exp(mean next-token loss) over `ids`, cut into windows of `window` tokens, each opened with <bos>."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window - 1):
            chunk = [bos] + ids[start : start + window - 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk])
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(chunk) - 1
    return math.exp(total / count)


def rtn_in_place(model) -> None:
    """Round-to-nearest symmetric int4, group 128 (what compressed-tensors' absmax scales give), on every
    language-model linear, dequantised back in place."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight.float()
                g = w.reshape(w.shape[0], -1, 128)
                scale = (g.abs().amax(-1, keepdim=True) / 7.5).to(torch.bfloat16).float().clamp(min=1e-8)
                module.weight.copy_((torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape))


def main() -> None:
    from toolkit.base import real_weights as rw

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = rw.DEFAULT_SETTINGS
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    p.add_argument("--mse", type=float, default=d.mse)
    p.add_argument("--damp-percent", type=float, default=d.damp_percent)
    p.add_argument("--no-act-group-aware", action="store_true")
    p.add_argument("--true-sequential", action="store_true", default=d.true_sequential)
    p.add_argument("--tokens", type=int, default=2048, help="evaluation tokens per text")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--skip-rtn", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    settings = rw.GptqSettings(
        samples=args.samples,
        sample_tokens=args.sample_tokens,
        act_group_aware=not args.no_act_group_aware,
        true_sequential=args.true_sequential,
        mse=args.mse,
        damp_percent=args.damp_percent,
    )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.base.loader import load_base

    torch.manual_seed(0)
    start = time.perf_counter()
    folder = rw.cached_base(settings, progress=print)
    wall = time.perf_counter() - start
    meta = json.loads((folder / "toolkit_tiny_base.json").read_text())
    print(f"base {folder} (build {meta['build_seconds']} s; this call {wall:.1f} s)")

    reference = rw.reference_dir()
    tok = AutoTokenizer.from_pretrained(reference)
    texts = {"heldout": rw.heldout_text(), "calibration": rw.calibration_text()}
    ids = {k: tok(v, add_special_tokens=False)["input_ids"][: args.tokens] for k, v in texts.items()}
    results: dict[str, dict[str, float]] = {k: {} for k in texts}

    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    for k in texts:
        results[k]["reference"] = perplexity(ref, ids[k], args.window, tok.bos_token_id)
    if not args.skip_rtn:
        rtn_in_place(ref)
        for k in texts:
            results[k]["rtn"] = perplexity(ref, ids[k], args.window, tok.bos_token_id)
    del ref
    base = load_base(folder, device="cpu")
    for k in texts:
        results[k]["gptq"] = perplexity(base.model, ids[k], args.window, tok.bos_token_id)

    print(f"settings {settings}")
    for k, r in results.items():
        line = f"{k:12} ({len(ids[k])} tokens)  reference {r['reference']:.2f}"
        if "rtn" in r:
            line += f"  rtn {r['rtn']:.2f} ({r['rtn'] / r['reference']:.3f}x)"
        line += f"  gptq {r['gptq']:.2f} ({r['gptq'] / r['reference']:.3f}x)"
        print(line)
    ratio = results["heldout"]["gptq"] / results["heldout"]["reference"]
    print(
        f"perplexity ratio (held-out, gptq / dequantised GGUF): {ratio:.3f}x  "
        f"goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}"
    )
    print(f"build time: {meta['build_seconds']} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": meta["quantizer"],
                    "build_seconds": meta["build_seconds"],
                    "perplexity": results,
                    "ratio": ratio,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

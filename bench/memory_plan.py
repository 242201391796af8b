"""GPU memory plan for QLoRA on the real 27B base, computed from its shapes (arithmetic, no GPU).

    .venv/bin/python bench/memory_plan.py [--rank 16] [--out docs/SCALING.md]

Shapes from the checkpoint's config.json (google/gemma-3-27b-it text and SigLIP vision config). Writes the
"Memory plan" section of docs/SCALING.md. What it counts, per GPU (DDP keeps a whole copy on each):
  weights     int4 + one fp16 scale per 128 weights for the language model's projections (what the GPTQ
              kernels hold), bf16 for embeddings (tied with lm_head), vision tower and projector
  LoRA        the adapter in fp32 (peft upcasts it), its gradients, and AdamW's two moments
  activations with gradient checkpointing: each layer's bf16 input is kept; one layer's internals are
              rebuilt during backward (attention by SDPA/flash, so linear in tokens)
  masks       attention masks at long context ([tokens x tokens], boolean, and SDPA's bf16 bias)
  loss        the model's own loss holds fp32 logits over the 262k vocabulary (and copies): the largest term at
              long context; the chunked loss `toolkit train` uses holds one tile and the hidden states' gradient
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TEXT = {"hidden": 5376, "intermediate": 21504, "layers": 62, "heads": 32, "kv_heads": 16, "head_dim": 128}
VOCAB = 262208
VISION = {"hidden": 1152, "intermediate": 4304, "layers": 27, "patches": (896 // 14) ** 2}
GROUP = 128
GB = 1e9


def projections() -> dict[str, tuple[int, int]]:
    h, i, q, kv = TEXT["hidden"], TEXT["intermediate"], TEXT["heads"] * TEXT["head_dim"], TEXT["kv_heads"] * 128
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def weights_gb() -> dict[str, float]:
    quantized = TEXT["layers"] * sum(a * b for a, b in projections().values())
    vision = VISION["layers"] * (4 * VISION["hidden"] ** 2 + 2 * VISION["hidden"] * VISION["intermediate"])
    vision += VISION["patches"] * VISION["hidden"] + 3 * 14 * 14 * VISION["hidden"]  # position + patch embeddings
    return {
        "quantized_params_billion": quantized / 1e9,
        "language_model_int4": quantized * (4 + 16 / GROUP) / 8 / GB,
        "embeddings_bf16": VOCAB * TEXT["hidden"] * 2 / GB,
        "vision_and_projector_bf16": (vision + VISION["hidden"] * TEXT["hidden"]) * 2 / GB,
    }


def lora_gb(rank: int) -> dict[str, float]:
    params = TEXT["layers"] * sum(rank * (a + b) for a, b in projections().values())
    return {"params_million": params / 1e6, "weights_grads_adam_fp32": params * 4 * 4 / GB}


def per_token_gb() -> dict[str, float]:
    h, i = TEXT["hidden"], TEXT["intermediate"]
    return {
        "checkpointed_inputs": TEXT["layers"] * h * 2 / GB,
        "one_layer_rebuilt": (6 * h + 3 * i + 2 * TEXT["heads"] * TEXT["head_dim"]) * 2 / GB,
        "logits_fp32": VOCAB * 4 / GB,
        # TRL's fused LM head: the label positions' bf16 hidden states and their fp32 gradient
        "chunked_loss": h * (2 + 4) / GB,
    }


# The model's own loss holds bf16 logits, their fp32 copy, the fp32 log-softmax and its gradient: measured
# 30.27 GB for 8,192 tokens x 262,208 vocabulary on an H100 (bench/long_row_memory.py), 3.5x the fp32 logits.
FULL_LOGITS_FACTOR = 3.5
# TRL's fused LM head projects one [4096 tokens x 32768 vocabulary] bf16 tile at a time.
LOSS_TILE_GB = 4096 * 32768 * 2 / GB
# One step of one 27B-shape layer (the builder's `27b-shapes`, 1 layer, 262,208 vocabulary) on 16,384 tokens with
# gradient checkpointing and the chunked loss, measured on an H100 by bench/long_row_memory.py (2026-11-25).
MEASURED_ONE_LAYER = {"tokens": 16384, "peak_gb": 11.91}


def masks_gb(n: int) -> float:
    """Attention masks at n tokens: the sliding and the full layers' boolean [n, n] masks and, while one layer
    runs, SDPA's bf16 bias made from one of them. Text-only rows skip the full layers' mask (trainer.py)."""
    return n * n * (1 + 1 + 2) / GB


def plan(rank: int, contexts: tuple[int, ...] = (4096, 8192, 32768), overhead_gb: float = 2.0) -> list[dict]:
    w, lo, t = weights_gb(), lora_gb(rank), per_token_gb()
    fixed = (
        w["language_model_int4"] + w["embeddings_bf16"] + w["vision_and_projector_bf16"] + lo["weights_grads_adam_fp32"]
    )
    m = MEASURED_ONE_LAYER
    rows = []
    for n in contexts:
        acts = n * (t["checkpointed_inputs"] + t["one_layer_rebuilt"])
        full_loss = n * t["logits_fp32"] * FULL_LOGITS_FACTOR
        chunked = LOSS_TILE_GB + n * t["chunked_loss"]
        # calibrated: the measured one-layer step scaled to n tokens (its masks grow as n^2, the rest as n) on top
        # of the other 61 layers' checkpointed inputs
        step = (m["peak_gb"] - masks_gb(m["tokens"])) * n / m["tokens"] + masks_gb(n)
        calibrated = fixed + (TEXT["layers"] - 1) * n * TEXT["hidden"] * 2 / GB + step + overhead_gb
        rows.append(
            {
                "tokens": n,
                "fixed": fixed,
                "activations": acts,
                "masks": masks_gb(n),
                "full_logits_loss": full_loss,
                "chunked_loss": chunked,
                "total_full_logits": fixed + acts + masks_gb(n) + full_loss + overhead_gb,
                "total_chunked_loss": fixed + acts + masks_gb(n) + chunked + overhead_gb,
                "total_chunked_calibrated": calibrated,
            }
        )
    return rows


def _smallest(total: float) -> str:
    return next((f"{g} GB" for g in (24, 40, 48, 80, 141) if total <= g * 0.95), "more than one 141 GB GPU")


def section(rank: int) -> str:
    w, lo, t = weights_gb(), lora_gb(rank), per_token_gb()
    rows = plan(rank)
    base = w["language_model_int4"] + w["embeddings_bf16"] + w["vision_and_projector_bf16"]
    lines = [
        "## Memory plan for the 27B base (`bench/memory_plan.py`)",
        "",
        f"Computed from the checkpoint's shapes (62 layers, hidden 5376, MLP 21504, vocabulary {VOCAB}); per GPU,",
        f"batch of one sequence, LoRA r={rank} on all 7 projections, gradient checkpointing, AdamW, 2 GB for the",
        "CUDA context and allocator. DDP keeps all of this on every GPU: more GPUs add throughput, not room.",
        "",
        "| part | GB |",
        "|---|---|",
        f"| language-model projections, int4 + fp16 scales per 128 ({w['quantized_params_billion']:.1f} B weights) "
        f"| {w['language_model_int4']:.1f} |",
        f"| embeddings (tied lm_head), bf16 | {w['embeddings_bf16']:.1f} |",
        f"| vision tower and projector, bf16 | {w['vision_and_projector_bf16']:.1f} |",
        f"| **base weights** | **{base:.1f}** |",
        f"| LoRA: {lo['params_million']:.0f} M parameters, fp32 weights + gradients + 2 Adam moments "
        f"| {lo['weights_grads_adam_fp32']:.1f} |",
        f"| per token: checkpointed layer inputs {t['checkpointed_inputs'] * 1e6:.0f} KB, one rebuilt layer "
        f"{t['one_layer_rebuilt'] * 1e6:.0f} KB; full-logits loss {FULL_LOGITS_FACTOR} x {t['logits_fp32'] * 1e6:.0f} "
        f"KB fp32 logits; chunked loss {t['chunked_loss'] * 1e6:.0f} KB + one {LOSS_TILE_GB:.2f} GB tile | |",
        "",
        "| context | activations | masks | loss: full logits / chunked | total, full logits | total, chunked loss "
        "| total, chunked, calibrated on the H100 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens'] // 1024}k | {r['activations']:.1f} | {r['masks']:.1f} | {r['full_logits_loss']:.1f} / "
            f"{r['chunked_loss']:.1f} | {r['total_full_logits']:.1f} | **{r['total_chunked_loss']:.1f}** | "
            f"{r['total_chunked_calibrated']:.1f} |"
        )
    last = rows[-1]
    lines += [
        "",
        "Reading: with the model's own loss over the full logits the smallest GPU is "
        + "; ".join(f"{r['tokens'] // 1024}k: {_smallest(r['total_full_logits'])}" for r in rows)
        + ". `toolkit train` computes the loss in chunks (TRL's fused LM head, `training.chunked_loss`, on by "
        "default; toolkit/train/loss.py): "
        + "; ".join(f"{r['tokens'] // 1024}k: {_smallest(r['total_chunked_loss'])}" for r in rows)
        + f". At 32k that is {last['total_chunked_loss']:.0f} GB by arithmetic and "
        f"{last['total_chunked_calibrated']:.0f} GB calibrated on a measured step (one 27B-shape layer, 262k "
        f"vocabulary, {MEASURED_ONE_LAYER['tokens']} tokens: {MEASURED_ONE_LAYER['peak_gb']} GB on an H100, about "
        "twice the arithmetic for one rebuilt layer, since backward holds gradients of the MLP intermediates too): "
        "under 80 GB either way, with gradient checkpointing on (without it each layer keeps roughly 10x its "
        "input: off the table for 27B beyond short rows). Image rows add a [tokens x tokens] mask for the full "
        "layers too (counted). Estimates; the whole 27B has not been trained here.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "docs" / "SCALING.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from report import replace_section

    text = section(args.rank)
    print(text)
    replace_section(Path(args.out), "## Memory plan", text, header="# Scaling out\n")


if __name__ == "__main__":
    main()

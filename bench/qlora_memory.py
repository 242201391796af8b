"""Measure which QLoRA path keeps the base 4-bit: (a) transformers + compressed-tensors as shipped,
(b) the toolkit's repack to GPTQ layout loaded through GPTQModel. Prints a JSON report.

    python bench/qlora_memory.py [--size small] [--out build/qlora_memory.json]

Run on the CPU here; the numbers go into docs/DEPENDENCIES.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from toolkit.base import builder as tiny_base
from toolkit.base.loader import load_base
from toolkit.base.memory import dense_bf16_bytes, model_tensor_bytes

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora_step(model, ids) -> dict:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    out = model(input_ids=ids, labels=ids, token_type_ids=torch.zeros_like(ids))
    out.loss.backward()
    opt.step()
    wrapped = {type(m.base_layer).__name__ for m in model.modules() if hasattr(m, "base_layer")}
    return {
        "model": model,
        "loss": out.loss.item(),
        "wrapped_layer_types": sorted(wrapped),
        "trainable_params": sum(p.numel() for p in trainable),
    }


def path_a(ct_dir: Path, ids) -> dict:
    from transformers import Gemma3ForConditionalGeneration

    try:  # the checkpoint exactly as written (real checkpoint names in its ignore list)
        Gemma3ForConditionalGeneration.from_pretrained(ct_dir, dtype=torch.float32)
        as_shipped = "loads"
    except Exception as exc:
        as_shipped = f"{type(exc).__name__}: {exc}"[:300]
    # transformers 5 does not map the legacy names in `ignore` onto its module names, so measure on a copy
    # whose ignore list is written as regexes that match both namings.
    copy = ct_dir.parent / "ct-regex-ignore"
    shutil.copytree(ct_dir, copy, ignore=shutil.ignore_patterns(".toolkit-gptq"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    (copy / "config.json").write_text(json.dumps(cfg))
    model = Gemma3ForConditionalGeneration.from_pretrained(copy, dtype=torch.float32)
    before = model_tensor_bytes(model)
    with torch.no_grad():
        model(input_ids=ids)
    after_forward = model_tensor_bytes(model)
    model.requires_grad_(False)
    step = lora_step(model, ids)
    return {
        "load_as_shipped": as_shipped,
        "tensor_bytes_loaded": before,
        "tensor_bytes_after_forward": after_forward,
        "tensor_bytes_after_lora_step": model_tensor_bytes(step["model"]),
        "wrapped_layer_types": step["wrapped_layer_types"],
        "loss": step["loss"],
    }


def path_b(ct_dir: Path, ids) -> dict:
    base = load_base(ct_dir, device="cpu", training=True)
    before = model_tensor_bytes(base.model)
    with torch.no_grad():
        base.model(input_ids=ids)
    after_forward = model_tensor_bytes(base.model)
    step = lora_step(base.model, ids)
    return {
        "tensor_bytes_loaded": before,
        "tensor_bytes_after_forward": after_forward,
        "tensor_bytes_after_lora_step": model_tensor_bytes(step["model"]),
        "wrapped_layer_types": step["wrapped_layer_types"],
        "loss": step["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--out", default="build/qlora_memory.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ct_dir = tiny_base.build(Path(tmp) / "base", size=args.size)
        dense = dense_bf16_bytes(ct_dir)
        ids = torch.arange(3, 67).unsqueeze(0)
        report = {"size": args.size, "dense_bf16_bytes": dense}
        for name, fn in (("a_transformers_compressed_tensors", path_a), ("b_gptq_repack_gptqmodel", path_b)):
            t = time.time()
            try:
                r = fn(ct_dir, ids)
                r["ratio_after_lora_step"] = round(r["tensor_bytes_after_lora_step"] / dense, 3)
            except Exception as exc:  # a failing path is a result worth recording
                r = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            r["seconds"] = round(time.time() - t, 1)
            report[name] = r
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

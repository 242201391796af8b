"""The one module that imports GPTQModel (the GPTQ backend) and the shims it needs here.

Why GPTQModel and not auto-gptq (named by the model card): see docs/DEPENDENCIES.md. Only base.py calls this.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from toolkit.quiet import quiet_third_party


def load_gptq(folder: Path, device: str, dtype, training: bool):
    """Load a GPTQ-layout Gemma 3 folder with GPTQModel; return the transformers model inside it.

    CPU: the pure-torch kernel. CUDA: GPTQModel picks its fastest kernel (Marlin/ExLlama) for inference; for
    training the torch kernel, because it is the one that back-propagates to the layer input (LoRA needs that).
    """
    import torch

    quiet_third_party()
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    backend = BACKEND.TORCH if (device == "cpu" or training) else BACKEND.AUTO
    # GPTQModel's kernels accept only fp16/bf16 at load; on CPU we load bf16 and cast to fp32 below.
    load_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    with contextlib.redirect_stdout(io.StringIO()):  # GPTQModel print()s its adapter setting on every load
        wrapper = GPTQModel.load(str(folder), device=device, backend=backend, dtype=load_dtype)
    model = wrapper.model
    for module in model.modules():
        # Shim: TorchLinear.post_init wraps dequantize_weight in torch.compile. On CPU that compile costs ~20 s
        # and recompiles per layer shape (a 2-layer forward took 2.8 s instead of 17 ms, measured); the eager
        # method is exact and fast enough. Removing the instance attribute restores the class method.
        if isinstance(module, BaseQuantLinear) and "dequantize_weight" in vars(module) and device == "cpu":
            del module.dequantize_weight
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) == 1:
        # Shim: GPTQModel records a per-module device map even when every module is on one device; accelerate
        # reads any map with more than one entry as device_map="auto" and refuses distributed (DDP) training.
        model.hf_device_map = {"": devices.pop()}
    if dtype != load_dtype:
        model = model.to(dtype)  # scales are bf16 on disk, so fp32 holds them exactly
    return model


def is_quantized_linear(module) -> bool:
    """True for GPTQModel's packed 4-bit linear layers (what peft's GPTQ LoRA dispatcher wraps)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)

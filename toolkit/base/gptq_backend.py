"""The one module that imports GPTQModel (the GPTQ backend) and the shims it needs here.

Why GPTQModel and not auto-gptq (named by the model card): see docs/DEPENDENCIES.md. Only loader.py loads through
this; kernels.py names the kernels and asks `unavailable` which of them this machine runs.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

from toolkit.errors import brief, first_line
from toolkit.quiet import quiet_third_party

# Compute capability each CUDA kernel needs (GPTQModel checks it late, at load; asking first lets `auto` move on).
_MIN_CAPABILITY = {"gptq_marlin": (8, 0), "gptq_machete": (9, 0)}


def kernel_class(backend: str):
    """GPTQModel's layer class for a GPTQ int4 backend name."""
    quiet_third_party()
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import get_kernel_for_backend

    return get_kernel_for_backend(BACKEND(backend), METHOD.GPTQ, FORMAT.GPTQ)


def unavailable(kernel) -> str | None:
    """Why `kernel` (a kernels.Kernel) cannot run on this machine, or None when it can."""
    import torch

    if kernel.device == "cuda":
        if not torch.cuda.is_available():
            return "no GPU visible"
        need = _MIN_CAPABILITY.get(kernel.backend)
        if need and torch.cuda.get_device_capability() < need:
            return f"needs compute capability {need[0]}.{need[1]}"
    try:
        cls = kernel_class(kernel.backend)
        with contextlib.redirect_stdout(io.StringIO()):
            ok, err = cls.cached_validate_once()
    except Exception as exc:  # a kernel whose extension is missing or fails to import is just not available
        return brief(exc, 120)
    return None if ok else (first_line(str(err or ""), 160) or "not supported here")


def load_gptq(folder: Path, device: str, kernel, training: bool):
    """Load a GPTQ-layout Gemma 3 folder with GPTQModel on `kernel`; return the transformers model inside it."""
    import torch

    quiet_third_party()
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    dtype = getattr(torch, kernel.dtype)
    # GPTQModel's kernels accept only fp16/bf16 at load; a float32 model is loaded bf16 and cast below.
    load_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    with contextlib.redirect_stdout(io.StringIO()):  # GPTQModel print()s its adapter setting on every load
        wrapper = GPTQModel.load(str(folder), device=device, backend=BACKEND(kernel.backend), dtype=load_dtype)
    model = wrapper.model
    for module in model.modules():
        if not isinstance(module, BaseQuantLinear):
            continue
        # Shim: TorchLinear.post_init wraps dequantize_weight in torch.compile. On CPU that compile costs ~20 s
        # and recompiles per layer shape (a 2-layer forward took 2.8 s instead of 17 ms, measured); the eager
        # method is exact and fast enough. Removing the instance attribute restores the class method.
        if "dequantize_weight" in vars(module) and device == "cpu":
            del module.dequantize_weight
        # Shim: the aten int4 kernels pick their mode (packed inference or dequantise-and-train) at the first
        # forward and keep it; a training load pins "train" so an eval pass before training cannot repack the
        # weights into the inference-only layout (whose matmul runs under no_grad: no gradient to the input).
        if training and hasattr(module, "linear_mode"):
            module.linear_mode = "train"
        if device == "cpu" and training:
            _fast_training_dequant(module)
        elif device == "cpu" and type(module).__name__ in ("TorchFusedLinear", "TorchCpuAvx512Linear"):
            _lean_inference_forward(module)  # inference loads only
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) == 1:
        # Shim: GPTQModel records a per-module device map even when every module is on one device; accelerate
        # reads any map with more than one entry as device_map="auto" and refuses distributed (DDP) training.
        model.hf_device_map = {"": devices.pop()}
    if dtype != load_dtype:
        model = model.to(dtype)  # scales are bf16 on disk, so fp32 holds them exactly
    return model


def _fast_training_dequant(module) -> None:
    """Shim: a training forward of GPTQModel's CPU kernels dequantises every 4-bit weight (autograd keeps the dense
    result for the backward); do it without the two full-size gathers by `g_idx`.

    GPTQModel computes `scales[g_idx] * (codes - zeros[g_idx])`, gathering a scale and a zero per weight; for
    contiguous groups (`g_idx = i // group_size`: the 27B's format and every tiny base) the same product
    broadcasts one row of scales and zeros over each group of rows. The nibbles are read as bytes rather than
    shifted out of int32 words. Bit-identical to GPTQModel's result (tests/base/test_kernels.py); on the small
    base's 1024 x 4096 layers 2.2-2.7 ms instead of 21 in float32 (2 cores; GPTQModel's took a quarter of a
    training step).
    TorchFusedLinear multiplies in bfloat16 whatever the model's dtype (its training forward casts the input and
    then the dequantised weight to bfloat16), so for it the weight is produced in bfloat16 directly: a code minus
    its zero point (-15..15) times a bfloat16 scale is exact in float32, and bfloat16 arithmetic rounds that exact
    product once, as GPTQModel's float32 result's conversion does: the same bits, without the float32 matrix and
    the conversion pass (tested).
    Any other layout keeps GPTQModel's method.
    """
    import sys
    import types
    import weakref

    import torch

    groups = module.scales.shape[0] if getattr(module, "scales", None) is not None else 0
    if not (
        sys.byteorder == "little"  # the nibble order of an int32 viewed as bytes
        and getattr(module, "bits", None) == 4
        and not getattr(module, "planar", False)
        and getattr(module, "qweight", None) is not None
        and module.qweight.dtype == torch.int32
        and module.qzeros.dtype == torch.int32
        and module.qweight.shape == (module.in_features // 8, module.out_features)
        and module.qzeros.shape == (groups, module.out_features // 8)
        and groups * module.group_size == module.in_features
        and torch.equal(module.g_idx.long(), torch.arange(module.in_features) // module.group_size)
    ):
        return
    original = type(module).dequantize_weight
    # None: the scales' dtype (GPTQModel's); TorchFusedLinear's forward converts the weight to bfloat16 anyway
    out_dtype = torch.bfloat16 if type(module).__name__ == "TorchFusedLinear" else None

    def dequantize_weight(self, num_itr: int = 1):
        if num_itr != 1:
            return original(self, num_itr=num_itr)
        if not torch.is_grad_enabled():
            # A pass without gradients right after a training forward (DPO's and KTO's reference pass) needs the
            # very weight that forward dequantised and autograd still keeps for the backward: reuse it while it is
            # alive (no copy is kept here; the weights are frozen, so it is the same bits)
            kept = self._toolkit_dequantized() if self._toolkit_dequantized is not None else None
            if kept is not None:
                return kept
        rows, cols = self.qweight.shape
        # byte b holds values 2b (low nibble) and 2b+1, read as int8 (a masked nibble is 0..15 either way) and
        # written straight into their rows: no stack, permuted copy or int8 conversion of the full-size codes
        # (small base, 1024 x 4096: 2.2-2.7 ms instead of 7.7-10.3 for the whole dequantisation, bit for bit)
        packed = self.qweight.view(torch.int8).reshape(rows, cols, 4).permute(0, 2, 1)
        codes = torch.empty(rows, 8, cols, dtype=torch.int8, device=packed.device)
        torch.bitwise_and(packed, 15, out=codes[:, 0::2])
        torch.bitwise_and(packed >> 4, 15, out=codes[:, 1::2])
        zeros = self.qzeros.view(torch.uint8)
        zeros = torch.stack((zeros & 15, zeros >> 4), dim=-1).reshape(groups, cols).view(torch.int8)
        diff = codes.view(groups, -1, cols).sub_(zeros[:, None, :])
        scales = self.scales if out_dtype is None else self.scales.to(out_dtype)
        out = diff.to(scales.dtype)
        out.mul_(scales[:, None, :])
        weight = out.view(rows * 8, cols)
        if torch.is_grad_enabled():
            self._toolkit_dequantized = weakref.ref(weight)
        return weight

    module._toolkit_dequantized = None
    module.dequantize_weight = types.MethodType(dequantize_weight, module)


def _lean_inference_forward(module) -> None:
    """Shim: the CPU int4 kernels' inference forward (TorchFusedLinear, TorchCpuAvx512Linear) without the per-call
    work that is a no-op for our weights.

    After its one-time repack (first eval forward, GPTQModel's own code) each call reshapes, re-checks its mode,
    gathers the input columns by `ret_idx` (the act-order permutation: the identity for the 27B's format, whose
    groups are contiguous) and goes through one or two more Python frames under `no_grad`; on a decoding step of a
    small model that was ~40 us of a ~100 us call (126 calls per step for the 270M). Where the permutation is the
    identity and there is no bias or GPTQModel adapter, later calls go straight to the kernel's op: the same op on
    the same tensors (tests/base/test_kernels.py compares the logits). `module.lean_op` is that op, or None.
    """
    import types

    slow = module.forward
    module.lean_op = None

    def forward(self, x):
        if not hasattr(self, "_lean_checked"):
            out = slow(x)  # the first call repacks (or pins training mode); decide after it
            self._lean_checked = True
            self.lean_op = _direct_op(self)
            return out
        op = self.lean_op
        if op is None or self.training or x.requires_grad:
            return slow(x)
        return op(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)

    module.forward = types.MethodType(forward, module)


def _direct_op(module):
    """The kernel op alone for a repacked inference layer (2-D input in, 2-D output), as an `Int4Call`, or None where
    the layer's own forward does more than call it (a permutation, a bias, an adapter, training mode)."""
    import torch

    if module.linear_mode != "inference" or module.bias is not None or module.adapter:  # LinearMode: a str enum
        return None
    if type(module).__name__ == "TorchFusedLinear":
        op, ret = getattr(module, "torch_fused_op", None), getattr(module, "ret_idx", None)
        if op is None or ret is None or not torch.equal(ret.cpu(), torch.arange(ret.numel(), dtype=ret.dtype)):
            return None
        return Int4Call(_int4pack_apply(op.group_size), (op.qweight_uint8, op.scales_and_zeros))
    if type(module).__name__ == "TorchCpuAvx512Linear":
        kernel = module.gemm_int4_qzero_group_scaled_cpu_kernel
        if kernel is None or not module._ret_idx_is_identity():
            return None
        # the kernel's own forward refuses other dtypes than bfloat16 with a clear error
        tensors = (module.qweight, module.qzeros, module.scales)
        apply = _avx512_apply(kernel, module.group_size)
        return Int4Call(apply, tensors, fallback=(torch.bfloat16, module._fused_op_forward))
    return None


class Int4Call:
    """One int4 kernel call on fixed packed tensors: `call(x)`, 2-D in, 2-D out. `call.apply(x, *call.tensors)` is
    the same call with the tensors as arguments, and `apply` is one function object per kernel and group size:
    what lets one compiled graph serve every layer, its weights as inputs (engine/compiled_step.py). `fallback`:
    (the dtype the kernel takes, the layer's own forward for activations of any other)."""

    __slots__ = ("apply", "tensors", "fallback")

    def __init__(self, apply, tensors: tuple, fallback: tuple | None = None) -> None:
        self.apply, self.tensors, self.fallback = apply, tensors, fallback

    def __call__(self, x):
        if self.fallback is not None and x.dtype != self.fallback[0]:
            return self.fallback[1](x)
        return self.apply(x, *self.tensors)


@functools.cache
def _avx512_apply(kernel, group: int):
    """GPTQModel's AVX512 int4 op for one group size (cached: the same function for every layer)."""

    def apply(x, qweight, qzeros, scales):
        return kernel(x.contiguous(), qweight, qzeros, scales, group, None)

    return apply


@functools.cache
def _int4pack_apply(group: int):
    """aten's packed int4 matmul over TorchFusedLinear's tensors: bfloat16 activations in, the input's dtype out."""
    import torch

    mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def apply(x, qweight, scales_and_zeros):
        return mm(x.to(torch.bfloat16), qweight, group, scales_and_zeros).to(x.dtype)

    return apply


def fused_op(modules):
    """One kernel call for inference layers that read the same input (a layer's q/k/v, its MLP's gate/up): their
    packed weights joined along the output, so a decoding step makes one call where it made three (or two). Each
    output column is the same dot product over the same packed codes, so the result is the separate calls' side by
    side, bit for bit; that is checked here once on a random input, and where it does not hold (or the layers are
    not all repacked inference layers of one CPU kernel with a direct op) the answer is None: call them one by one.
    The joined copy costs the layers' packed size again (the 270M: ~1.5 MB a layer).
    """
    import torch

    if len(modules) < 2 or any(getattr(m, "lean_op", None) is None for m in modules):
        return None
    kind = {type(m).__name__ for m in modules}
    first = modules[0]
    if len(kind) != 1 or any(m.group_size != first.group_size or m.in_features != first.in_features for m in modules):
        return None
    if kind == {"TorchCpuAvx512Linear"}:
        qweight = torch.cat([m.qweight for m in modules])  # [out, in / 2], 32-row blocks: rows join as they are
        qzeros = torch.cat([m.qzeros for m in modules], dim=1)  # [groups, out]
        scales = torch.cat([m.scales for m in modules], dim=1)
        apply = _avx512_apply(first.gemm_int4_qzero_group_scaled_cpu_kernel, first.group_size)
        op = Int4Call(apply, (qweight, qzeros, scales))
    elif kind == {"TorchFusedLinear"}:
        ops = [m.torch_fused_op for m in modules]
        qweight = torch.cat([o.qweight_uint8 for o in ops])  # [out, in / 2]
        scales_and_zeros = torch.cat([o.scales_and_zeros for o in ops], dim=1)  # [groups, out, 2]
        op = Int4Call(_int4pack_apply(first.group_size), (qweight, scales_and_zeros))
    else:
        return None
    probe = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    try:
        joined, apart = op(probe), torch.cat([m.lean_op(probe) for m in modules], dim=1)
    except RuntimeError:  # a layout the join does not fit: the kernel refuses the joined tensors
        return None
    return op if torch.equal(joined.to(apart.dtype), apart) else None


def layer_kernels(model) -> list[str]:
    """The class names of the 4-bit layers in `model` (what actually runs)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})


def is_quantized_linear(module) -> bool:
    """True for GPTQModel's packed 4-bit linear layers (what peft's GPTQ LoRA dispatcher wraps)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)


def training_matmul_dtype(module, dtype):
    """The dtype a trainable 4-bit layer's own training forward multiplies activations of `dtype` in: GPTQModel's
    TorchFusedLinear casts float32 activations to bfloat16 for its matmul (and its output back to float32), the
    others multiply in the activations' dtype. What a stand-in for the layer must do to give its numbers
    (train/rollouts.py)."""
    import torch
    from gptqmodel.nn_modules.qlinear.torch_fused import TorchFusedLinear

    return torch.bfloat16 if isinstance(module, TorchFusedLinear) and dtype == torch.float32 else dtype


def quantize_gptq(dense_dir: Path, out_dir: Path, calibration: list[list[int]], settings: dict) -> None:
    """GPTQ-quantise a dense Gemma 3 text checkpoint with GPTQModel's own quantizer (CPU is fine); save GPTQ layout.

    `settings`: group_size, act_group_aware, true_sequential, mse, damp_percent (real_weights.GptqSettings).
    Symmetric int4, static contiguous groups (desc_act off): what compressed-tensors' pack-quantized format holds.
    """
    import os

    # GPTQModel sizes its CPU worker pool from this variable, else to half the cores; on a 2-core machine its
    # quantizer was found to need GPTQMODEL_CPU_WORKERS=2 (issue 18).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    quiet_third_party()
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=4,
        group_size=settings["group_size"],
        sym=True,
        desc_act=False,
        act_group_aware=settings["act_group_aware"],
        true_sequential=settings["true_sequential"],
        mse=settings["mse"],
        damp_percent=settings["damp_percent"],
        device="cpu",
        # GPTQModel's default writes each layer to disk and reads it back between stages; a 270M model fits in
        # memory many times over, and the round trips cost build time.
        offload_to_disk=False,
    )
    model = GPTQModel.load(str(dense_dir), config)
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
    # Batches of equal-length rows (no padding) give the same Hessians as one row at a time; on a CPU the
    # per-batch overhead dominates at batch 1 (GPTQModel's own estimate: 68 min vs minutes for the 270M).
    model.quantize(rows, batch_size=settings.get("batch_size", 16))
    model.save(str(out_dir))

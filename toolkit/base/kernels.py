"""Which GPTQ kernel (and model dtype) runs the 4-bit layers, per device and per phase (inference, training).

The candidates are GPTQModel's kernels for GPTQ int4, group 128. Each was measured side by side on the tiny base
and on bigger shapes (bench/kernels.py on CPU, bench/gpu_path.py on CUDA; figures and reasons in
docs/DEPENDENCIES.md): tokens/s, whether peft LoRA wraps it, whether gradients reach the LoRA weights and the
layer input as on the dequantised reference, and the logits' largest difference from that reference. `auto`
takes the first available kernel of the measured preference list; `--kernel` / `base.kernel` names one.
This module knows names, dtypes and the choice; only gptq_backend.py talks to GPTQModel.

The LM head's precision for serving is chosen here too (`choose_head`; lm_head.py holds the int8 head).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import ToolkitError

PHASES = ("inference", "training")


@dataclass(frozen=True)
class Kernel:
    """One candidate: the toolkit's name for it, GPTQModel's backend and layer class, and how it is loaded."""

    name: str
    device: str  # "cpu" or "cuda"
    backend: str  # GPTQModel BACKEND value
    layer: str  # the GPTQModel class that replaces each 4-bit linear
    dtype: str  # the model's dtype with this kernel: never float16 (Gemma 3 overflows it)
    trains: bool  # back-propagates to the layer input like the dequantised reference (tests/base/test_kernels.py)
    note: str


KERNELS: tuple[Kernel, ...] = (
    # float32: the reference. Dequantises each weight on every forward; exact, and the fastest to train on a CPU
    # without AVX512-BF16, where bfloat16 dense matmuls are emulated (slower than float32).
    Kernel("torch", "cpu", "gptq_torch", "TorchLinear", "float32", True, "dequantise + matmul (the reference)"),
    # aten's packed int4 matmul; needs bfloat16 activations, so the whole model runs in bfloat16.
    Kernel("torch_aten", "cpu", "gptq_torch_aten", "TorchAtenLinear", "bfloat16", True, "aten int4pack matmul"),
    # The same aten int4 matmul, but the layer casts float32 activations to bfloat16 and back itself, so the rest
    # of the model (attention, norms, the 262k-row LM head) stays float32.
    Kernel("torch_fused", "cpu", "gptq_torch_fused", "TorchFusedLinear", "float32", True, "aten int4pack matmul"),
    # Needs AVX512-BF16 (Sapphire Rapids, Zen 4 and later); inference only (no backward).
    Kernel("cpu_avx512", "cpu", "gptq_torch_cpu_avx512", "TorchCpuAvx512Linear", "bfloat16", False, "AVX512-BF16"),
    Kernel("marlin", "cuda", "gptq_marlin", "MarlinLinear", "bfloat16", False, "Marlin (SM80+), inference only"),
    Kernel("exllama_v2", "cuda", "gptq_exllama_v2", "ExllamaV2Linear", "bfloat16", False, "inference only"),
    Kernel("machete", "cuda", "gptq_machete", "MacheteLinear", "bfloat16", False, "CUTLASS (SM90+), inference only"),
    Kernel("triton", "cuda", "gptq_triton", "TritonV2Linear", "bfloat16", True, "Triton dequantise + matmul"),
    Kernel("torch", "cuda", "gptq_torch", "TorchLinear", "bfloat16", True, "dequantise + matmul"),
)

# `auto`: the measured preference per (device, phase); the first kernel this machine offers wins.
AUTO: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "inference"): ("cpu_avx512", "torch_fused", "torch"),
    # A fallback only: on a CPU the loader times the trainable kernels on the base itself (kernel_probe.py).
    ("cpu", "training"): ("torch",),
    # Measured on an H100 (bench/results/gpu_path_h100.json, 27b-shapes, bf16): ExLlama v2 decodes 160 tok/s at
    # one row and 2,588 at 16, Triton 126 / 2,010, torch 122 / 1,914; Marlin 32 / 490, since GPTQModel 7.7 built
    # without its CUDA extension runs Marlin's slow path. Marlin stays as the fallback after ExLlama v2.
    ("cuda", "inference"): ("exllama_v2", "marlin", "torch"),
    ("cuda", "training"): ("triton", "torch"),
}


@dataclass(frozen=True)
class Choice:
    """The kernel a load will use, the model dtype that goes with it, and why it was picked."""

    kernel: Kernel
    phase: str
    reason: str

    @property
    def dtype(self) -> str:
        return self.kernel.dtype

    def describe(self) -> str:
        return f"{self.kernel.name} ({self.kernel.layer}), {self.dtype}, {self.reason}"


def device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def names(device: str | None = None) -> list[str]:
    """Kernel names a user may pass (for one device type, or all)."""
    return sorted({k.name for k in KERNELS if device is None or k.device == device_type(device)})


def get(name: str, device: str) -> Kernel:
    for k in KERNELS:
        if k.name == name and k.device == device_type(device):
            return k
    raise ToolkitError(
        f"unknown kernel {name!r} for {device_type(device)}",
        where="kernel",
        fix=f"use auto or one of: {', '.join(names(device))}",
    )


def choose(device: str, phase: str = "inference", requested: str = "auto", *, available=None) -> Choice:
    """The kernel for `device` and `phase`: the one `requested`, or auto's first available one.

    `available(kernel) -> str | None` says why a kernel cannot run here (None: it can); the default asks
    GPTQModel (gptq_backend.unavailable). The training helper and `toolkit train` call this with phase
    "training"; serve, chat and eval with "inference".
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
    if available is None:
        from toolkit.base.gptq_backend import unavailable as available
    if requested and requested != "auto":
        kernel = get(requested, device)
        if phase == "training" and not kernel.trains:
            trainable = [k.name for k in KERNELS if k.trains and k.device == kernel.device]
            raise ToolkitError(
                f"kernel {kernel.name} cannot train: it has no backward pass to the layer input",
                where="kernel",
                fix=f"use auto or one of: {', '.join(trainable)}",
            )
        why = available(kernel)
        if why:
            raise ToolkitError(f"kernel {kernel.name} is not available here: {why}", where="kernel", fix="use auto")
        return Choice(kernel, phase, "asked for")
    skipped = []
    for name in AUTO[(device_type(device), phase)]:
        kernel = get(name, device)
        why = available(kernel)
        if not why:
            return Choice(kernel, phase, "auto" + (f" ({'; '.join(skipped)})" if skipped else ""))
        skipped.append(f"{name}: {why}")
    raise ToolkitError(f"no GPTQ kernel runs here: {'; '.join(skipped)}", where="kernel", fix="install GPTQModel")


# The LM head at serving time. On a CPU a decoding step of a small Gemma 3 is mostly the tied 262k-row head read
# from memory (the 270M's: 335 MB in bfloat16 per token, 178 MB as int8); llama.cpp keeps it as Q8_0. Measured on
# an AMD EPYC (AVX512-BF16, 2 cores): 14.5 ms in bfloat16 (F.linear), 4.2 ms as int8 (docs/BENCHMARKS.md, "LM
# head"). On a GPU the head is a small part of the 27B's bytes per step and stays exact (int8 unmeasured there).
# "int8" takes the faster of its two int8 kernels, timed once per machine (lm_head.choice_key); the last two name one
HEADS = ("auto", "exact", "int8", "int8-weight-only", "int8-dynamic")
INT8_HEAD_MIN = 1 << 22  # elements: a smaller head stays in the CPU's caches (the tiny base's 1,773 x 256)


@dataclass(frozen=True)
class HeadChoice:
    """The LM head a load serves with: "exact" (the model's own) or "int8" (lm_head.Int8Head), and why. `matmul`:
    the int8 product's kernel (lm_head.MATMULS: "auto" takes the faster here, timed once per machine)."""

    name: str
    reason: str
    matmul: str = "auto"


def choose_head(
    device: str, requested: str = "auto", *, elements: int | None = None, training: bool = False
) -> HeadChoice:
    """The serving LM head for `device`: int8 on a CPU for a head of at least INT8_HEAD_MIN `elements`, else exact.
    Training always keeps the exact head (its gradients and loss are the model's own)."""
    if requested not in HEADS:
        raise ToolkitError(f"unknown LM head {requested!r}", where="lm_head", fix=f"use one of: {', '.join(HEADS)}")
    if training:
        return HeadChoice("exact", "training keeps the exact head")
    why = _int8_unavailable(device)
    if requested.startswith("int8"):
        if why:
            raise ToolkitError(f"the int8 LM head is not available here: {why}", where="lm_head", fix="use exact")
        matmul = requested.removeprefix("int8").removeprefix("-").replace("-", "_") or "auto"
        if matmul == "dynamic":
            from toolkit.base.lm_head import dynamic_unavailable

            if missing := dynamic_unavailable():
                raise ToolkitError(
                    f"the int8 x int8 LM head is not available here: {missing}",
                    where="lm_head",
                    fix="use int8 or int8-weight-only",
                )
        return HeadChoice("int8", "asked for", matmul)
    if requested == "exact":
        return HeadChoice("exact", "asked for")
    if why:
        return HeadChoice("exact", f"auto ({why})")
    if elements is not None and elements < INT8_HEAD_MIN:
        return HeadChoice("exact", "auto (a small head: int8 saves nothing)")
    return HeadChoice(
        "int8",
        "auto (int8 rows, per-row scales; the top candidates rescored exactly; the faster of the weight-only and, "
        "with VNNI, the int8 x int8 product, timed at the first load on this machine and kept)",
    )


def _int8_unavailable(device: str) -> str | None:
    if device_type(device) != "cpu":
        return "int8 is the CPU's head (measured there only)"
    import torch

    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"torch {torch.__version__} has no _weight_int8pack_mm"
    return None

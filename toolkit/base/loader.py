"""Loads the frozen 4-bit Gemma 3 base (tiny or the real 27B) with its processor. Nothing else does.

Accepted: a local folder or a hub id (downloaded where the network allows) holding a Gemma 3 checkpoint
quantised to 4 bits in compressed-tensors pack-quantized format (the real checkpoint) or GPTQ (GPTQModel)
format. A compressed-tensors folder is repacked once, losslessly, to GPTQ layout (quant_format.py) and loaded
through GPTQModel so the weights stay packed 4-bit in memory, also while LoRA trains on top.
Device: CUDA when present, else CPU. Kernel and dtype: per device and phase (inference or training) as measured
(kernels.py); bfloat16 or float32, never float16 (Gemma 3 overflows it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import constants as C
from toolkit.base import quant_format
from toolkit.base.quant_format import QuantSpec
from toolkit.errors import ToolkitError, brief

GEMMA3_MODEL_TYPE = "gemma3"


@dataclass
class Base:
    """A loaded base: the transformers model (eval mode, frozen), its processor and what was checked."""

    model: Any
    processor: Any
    path: Path
    spec: QuantSpec
    device: str
    dtype: Any
    fingerprint: str
    config: dict = field(repr=False, default_factory=dict)
    kernel: str = "torch"
    """The GPTQ kernel running the 4-bit layers (kernels.py name), chosen per device and phase."""
    head: str = "exact"
    """The LM head it serves with: "exact" or "int8" (kernels.choose_head, lm_head.py)."""
    head_kernel: str = ""
    """The int8 head's kernel and how it was chosen (lm_head.Int8Head.describe); empty for the exact head."""

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def context_length(self) -> int:
        return context_length(self.config)


def context_length(config: dict) -> int:
    """The context a base is served with: its config's, capped at the card's 32k for the real 27B."""
    text = config.get("text_config", {})
    n = int(text.get("max_position_embeddings", 0))
    return min(n, C.REAL_CONTEXT_LEN) if text.get("hidden_size") == C.REAL_HIDDEN_SIZE else n


def served_name(base: str | Path) -> str:
    """The model name clients use for a base: a hub id as given, a folder by its name."""
    return str(base) if "/" in str(base) and not Path(base).exists() else Path(base).name


def resolve_path(path_or_id: str | Path) -> Path:
    """A local folder as is; `org/name` not present locally is fetched from the hub (clear error offline)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text))
        except Exception as exc:  # any hub failure (offline, gated, missing) is the same user problem
            raise ToolkitError(
                f"base {text!r} is not a local folder and could not be fetched from the hub ({brief(exc, 160)})",
                where="base",
                fix="download it where the network allows (`hf download ID --local-dir DIR`) and point at DIR",
            ) from None
    raise ToolkitError(
        f"base folder {str(path)!r} does not exist",
        where="base",
        fix="build a tiny base with `toolkit tiny-base DIR` or point at a downloaded checkpoint folder",
    )


def check_base(path: Path) -> tuple[dict, QuantSpec]:
    """Check that `path` holds a 4-bit Gemma 3 checkpoint; return its config and quantisation spec."""
    if not path.is_dir():
        raise ToolkitError(f"{path} is not a folder", where="base", fix="point at a checkpoint folder")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ToolkitError(f"no config.json in {path}", where="base", fix="point at a Hugging Face checkpoint folder")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"config.json is not valid JSON ({exc})", where=str(cfg_file)) from None
    model_type = config.get("model_type")
    if model_type != GEMMA3_MODEL_TYPE:
        raise ToolkitError(
            f"expected a Gemma 3 model (model_type 'gemma3'), found model_type {model_type!r}",
            where=str(cfg_file),
            fix="this toolkit serves Gemma 3 (Gemma3ForConditionalGeneration) checkpoints only",
        )
    spec = quant_format.read_quant_spec(config, where=str(cfg_file))
    files = quant_format.weight_files(path)
    if not files:
        raise ToolkitError(
            f"no *.safetensors weight files in {path}",
            where="base",
            fix="download the complete checkpoint (only safetensors weights are loaded)",
        )
    index = path / "model.safetensors.index.json"
    if index.exists():
        wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(wanted - {f.name for f in files})
        if missing:
            raise ToolkitError(
                f"weight files listed in model.safetensors.index.json are missing: {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                where=str(path),
                fix="finish downloading the checkpoint",
            )
    return config, spec


def fingerprint(config: dict) -> str:
    """Identity of a base for adapter manifests: hash of its config including the quantisation config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def pick_device(device: str | None = None) -> str:
    """The device to load on: CUDA when present (one GPU per process under accelerate/torchrun), else CPU."""
    import torch

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process under accelerate/torchrun (DDP)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ToolkitError("CUDA was asked for but no GPU is visible", where="--device", fix="use --device cpu")
    return device


def prepare_recipe_base(section: Any) -> Path:
    """The recipe's base folder; builds the tiny base there first when `tiny_seed` is set and it is missing."""
    path = Path(section.path)
    if section.tiny_seed is not None and not path.exists():
        from toolkit.base import builder as tiny_base
        from toolkit.base.file_lock import exclusive

        with exclusive(path, "build of the tiny base"):
            if not path.exists():  # not built meanwhile by another process (a DDP launch's other ranks)
                tiny_base.build(path, seed=section.tiny_seed)
    return resolve_path(section.path)


def load_processor(path_or_id: str | Path) -> Any:
    """The base's processor (tokenizer, chat template, image processor) without loading any weights."""
    path = resolve_path(path_or_id)
    check_base(path)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def load_without_weights(path_or_id: str | Path) -> Base:
    """A Base without its model (`model` None; device, dtype and kernel to be filled in): the processor and what
    was checked, for a process that serves a model loaded in another (serve/engine_process.py)."""
    path = resolve_path(path_or_id)
    config, spec = check_base(path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    return Base(None, processor, path, spec, "", None, fingerprint(config), config, kernel="")


def load_base(
    path_or_id: str | Path,
    *,
    device: str | None = None,
    training: bool = False,
    kernel: str = "auto",
    lm_head: str = "auto",
) -> Base:
    """Load a 4-bit Gemma 3 base and its processor, frozen, on `device` (default: CUDA if present, else CPU).

    `kernel`: auto (the measured choice for this device and phase, kernels.py) or a kernel name. `lm_head`: auto,
    exact, int8, int8-weight-only or int8-dynamic, the head it serves with (kernels.choose_head; a training load
    always keeps the exact one).
    """
    path = resolve_path(path_or_id)
    config, spec = check_base(path)  # before any heavy import: a bad base fails in milliseconds
    import torch
    from transformers import AutoProcessor

    from toolkit.base import gptq_backend, kernels

    device = pick_device(device)
    gptq_dir = quant_format.ensure_gptq(path)
    if training and kernel == "auto" and kernels.device_type(device) == "cpu":
        choice = _measured_training_choice(gptq_dir, config)
    else:
        choice = kernels.choose(device, "training" if training else "inference", kernel)
    try:
        model = gptq_backend.load_gptq(gptq_dir, device=device, kernel=choice.kernel, training=training)
    except (ValueError, KeyError, OSError) as exc:  # GPTQModel reports bad checkpoints as these
        raise ToolkitError(
            f"could not load the quantised weights: {brief(exc, 300)}",
            where=str(path),
            fix="check that the checkpoint is complete and is a 4-bit Gemma 3 (re-download or rebuild it)",
        ) from None
    model.eval()
    model.requires_grad_(False)  # the base is frozen; LoRA adds the only trainable weights
    if device == "cpu" and not training and choice.dtype == "float32":
        bfloat16_token_matrix(model)
    head = model.get_output_embeddings()
    elements = head.weight.numel() if head is not None else 0
    head_choice = kernels.choose_head(device, lm_head, elements=elements, training=training)
    if head_choice.name == "int8" and head is not None:
        from toolkit.base.lm_head import use_int8_head

        use_int8_head(model, head_choice.matmul)
    served_head = model.get_output_embeddings()
    processor = AutoProcessor.from_pretrained(path)
    dtype = getattr(torch, choice.dtype)
    return Base(
        model,
        processor,
        path,
        spec,
        device,
        dtype,
        fingerprint(config),
        config,
        kernel=choice.kernel.name,
        head=head_choice.name if head is not None else "exact",
        head_kernel=served_head.describe() if hasattr(served_head, "describe") else "",
    )


def _measured_training_choice(gptq_dir: Path, config: dict) -> Any:
    """On a CPU, auto trains with the kernel timed fastest on this base and machine (kernel_probe.py)."""
    import sys

    from toolkit.base import gptq_backend, kernel_probe, kernels

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()  # the launch's process group, now (the Trainer's arguments reuse it): ranks agree over it
    name, reason = kernel_probe.fastest_training_kernel(
        gptq_dir, config, gptq_backend.unavailable, progress=lambda line: print(line, file=sys.stderr)
    )
    return kernels.Choice(kernels.get(name, "cpu"), "training", reason)


HEAD_TILE = 1024  # LM head rows upcast per matmul: bf16 -> fp32 tiles of 1024 x hidden stay in the CPU's cache


def bfloat16_token_matrix(model: Any) -> None:
    """Hold the tied token embedding / LM head in bfloat16 (its dtype in the checkpoint) in a float32 CPU model,
    upcast tile by tile at use: the same float32 values and logits, half the memory read per decoding step.

    Why by hand: the matrix is most of a small Gemma 3 (262,208 x 640 for the 270M: 168M of its 268M parameters)
    and every decoding step reads all of it for the logits. Measured on 2 AVX2 cores (docs/DEPENDENCIES.md,
    "LM head"): float32 F.linear 68-76 ms at 1 row and 220-315 ms at 16; bfloat16 F.linear 26 ms at 1 row but
    340 ms at 16 (no native bf16 math) and it rounds the activations; these float32 tiles 43 ms and 100 ms, equal
    to the float32 result within 1e-6. No library op does "bf16 weight, fp32 math" on CPU.
    """
    import types

    import torch

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight or embed.weight.dtype != torch.float32:
        return  # untied (not Gemma 3's layout) or not float32: leave it
    embed.weight.data = embed.weight.data.to(torch.bfloat16)  # exact: the checkpoint stores it in bfloat16

    def lookup(self, input_ids):
        rows = torch.nn.functional.embedding(input_ids, self.weight, self.padding_idx).float()
        return rows * self.embed_scale.float()  # Gemma's sqrt(hidden) scale, in float32 as before

    def logits(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1]).float().t()
        out = torch.empty(self.weight.shape[0], flat.shape[1], dtype=torch.float32)
        for start in range(0, self.weight.shape[0], HEAD_TILE):
            torch.mm(self.weight[start : start + HEAD_TILE].float(), flat, out=out[start : start + HEAD_TILE])
        return out.t().reshape(*hidden.shape[:-1], -1)

    embed.forward = types.MethodType(lookup, embed)
    head.forward = types.MethodType(logits, head)

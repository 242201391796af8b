"""On-disk 4-bit formats of a Gemma 3 base: detect, write compressed-tensors, repack to GPTQ layout.

The real checkpoint is compressed-tensors pack-quantized (symmetric int4, group 128): per linear layer
`weight_packed` int32 [out, in/8] (8 nibbles, value+8, element i at bits 4i), `weight_scale` [out, in/128],
`weight_shape`. GPTQ layout (GPTQModel, v1 zero points) stores the same nibbles as `qweight` int32 [in/8, out]
(packed along the input dimension, same bit order), `scales` [in/128, out], `qzeros` (zero point 8, stored
as 7 by the v1 convention) and `g_idx`. So the repack is a transpose and a rename: lossless, bit for bit.

Why repack at all: GPTQModel's kernels (Marlin/ExLlama on CUDA, torch on CPU) run on packed weights and are
the layers peft's GPTQ LoRA wraps; transformers' compressed-tensors path decompresses every layer to a dense
copy on the first forward (docs/DEPENDENCIES.md has the measurements). This module knows formats only; base.py
decides when to repack and how to load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolkit import constants as C
from toolkit.base.file_lock import exclusive
from toolkit.errors import ToolkitError

COMPRESSED_TENSORS = "compressed-tensors"
GPTQ = "gptq"
_REPACK_VERSION = 1  # bump when the repack output changes, so stale caches are rebuilt

# Tensor names: the real checkpoint (written by transformers 4.5x) -> the module names of transformers 5's
# Gemma3ForConditionalGeneration, which GPTQModel expects in a GPTQ checkpoint.
_TO_MODULE_NAMES = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]


@dataclass(frozen=True)
class QuantSpec:
    """What the base folder's config says about its quantisation."""

    format: str  # COMPRESSED_TENSORS or GPTQ
    bits: int
    group_size: int
    symmetric: bool

    def as_dict(self) -> dict:
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def read_quant_spec(config: dict, where: str) -> QuantSpec:
    """Read and check the quantization_config of a config.json; raise ToolkitError unless it is 4-bit."""
    q = config.get("quantization_config")
    if not q:
        raise ToolkitError(
            "the model is not quantised (config.json has no quantization_config)",
            where=where,
            fix=f"point at a 4-bit GPTQ Gemma 3 checkpoint such as {C.REAL_BASE_ID}, or build one with "
            "`toolkit tiny-base DIR`",
        )
    method = q.get("quant_method")
    if method == COMPRESSED_TENSORS:
        groups = q.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values()]
        if q.get("format") != "pack-quantized" or not weights:
            raise ToolkitError(
                f"compressed-tensors format {q.get('format')!r} is not supported",
                where=where,
                fix="use a pack-quantized (W4A16) checkpoint",
            )
        w = weights[0]
        spec = QuantSpec(COMPRESSED_TENSORS, w.get("num_bits"), w.get("group_size"), bool(w.get("symmetric")))
        if w.get("type") != "int" or w.get("strategy") != "group" or not spec.symmetric:
            raise ToolkitError(
                f"compressed-tensors scheme {w.get('type')}/{w.get('strategy')}/symmetric={spec.symmetric} "
                "is not supported",
                where=where,
                fix="use a symmetric int4 group-quantised (W4A16) checkpoint",
            )
    elif method == GPTQ:
        spec = QuantSpec(GPTQ, q.get("bits"), q.get("group_size"), bool(q.get("sym", True)))
    else:
        raise ToolkitError(
            f"quantisation method {method!r} is not supported",
            where=where,
            fix="use a GPTQ-quantised checkpoint in compressed-tensors or GPTQ (GPTQModel) format",
        )
    if spec.bits != C.QUANT_BITS:
        raise ToolkitError(
            f"the model is quantised to {spec.bits} bits, not 4",
            where=where,
            fix="use a 4-bit checkpoint (QLoRA here assumes 4-bit weights)",
        )
    return spec


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------- writing


def save_compressed_tensors(model, out_dir: Path, scales: dict | None = None) -> None:
    """Quantise `model`'s language-model linears round-to-nearest and save as pack-quantized W4A16.

    The scales come from compressed-tensors' own `calculate_qparams` and the packing from its
    ModelCompressor, so the files are what compressed-tensors (and vLLM, transformers) read.
    `scales` (module name -> [out, in/128]) overrides them: a GPTQ pass chose its own scales and weights
    already on that grid (real_weights.py), and re-deriving the scales from those weights would move the grid.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(
        num_bits=C.QUANT_BITS, type="int", symmetric=True, strategy="group", group_size=C.QUANT_GROUP_SIZE
    )
    qconfig = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"],
    )
    apply_quantization_config(model, qconfig, show_progress=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            w = module.weight.float()
            groups = w.reshape(w.shape[0], -1, C.QUANT_GROUP_SIZE)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            if scales and name in scales:
                scale = scales[name].reshape(scale.shape)
            module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    with _without_library_bars():
        compressor.compress_model(model)
        model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    _use_real_checkpoint_names(out_dir)


@contextlib.contextmanager
def _without_library_bars() -> Iterator[None]:
    """Without the progress bars compressed-tensors' compress_model ("Compressing model") and transformers'
    save_pretrained ("Writing model shards") draw for a build that takes a second: the toolkit reports the build
    itself. compress_model has no switch for its bar, so its module's tqdm is swapped for a silent one meanwhile."""
    from functools import partial
    from unittest import mock

    from compressed_tensors.compressors.model_compressors import model_compressor
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(model_compressor, "tqdm", partial(model_compressor.tqdm, disable=True)):
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _use_real_checkpoint_names(out_dir: Path) -> None:
    """Rename tensors and the ignore list to the real checkpoint's names (`vision_tower.vision_model.*`).

    transformers 5 saves the vision tower without the `vision_model` hop; the real checkpoint has it.
    """
    from safetensors.torch import load_file, save_file

    def legacy(name: str) -> str:
        name = re.sub(r"^model\.vision_tower\.", "vision_tower.", name)
        name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
        name = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", name)
        name = re.sub(r"^lm_head$", "language_model.lm_head", name)
        return re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", name)

    index_file = out_dir / "model.safetensors.index.json"
    for f in weight_files(out_dir):
        tensors = load_file(f)
        save_file({legacy(k): v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    if index_file.exists():
        index = json.loads(index_file.read_text())
        index["weight_map"] = {legacy(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2))
    cfg_file = out_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["ignore"] = [legacy(n) for n in cfg["quantization_config"]["ignore"]]
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------- repacking


def module_name(name: str) -> str:
    """The transformers 5 module path of a tensor named either way (`language_model.model.layers.0...` or
    `model.language_model.layers.0...`): what peft's adapter keys use."""
    for pattern, repl in _TO_MODULE_NAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def source_fingerprint(path: Path) -> str:
    """Hash of what the repack reads: config.json and the names/sizes of the weight files."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in weight_files(path):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(f"repack-v{_REPACK_VERSION}".encode())
    return h.hexdigest()[:16]


def repack_to_gptq(src: Path, dst: Path) -> None:
    """Write the GPTQ layout of a compressed-tensors pack-quantized checkpoint (same nibbles, same scales)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    spec = read_quant_spec(config, where=str(src / "config.json"))
    if spec.format != COMPRESSED_TENSORS:
        raise ToolkitError(f"{src} is already in {spec.format} format", where=str(src), fix="load it directly")
    group = spec.group_size
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for f in weight_files(src):
        out: dict[str, torch.Tensor] = {}
        with safe_open(f, "pt") as st:
            names = set(st.keys())
            for name in sorted(names):
                if name.endswith(".weight_packed"):
                    prefix = name[: -len(".weight_packed")]
                    out_features, in_features = st.get_tensor(prefix + ".weight_shape").tolist()
                    target = module_name(prefix)
                    out[target + ".qweight"] = st.get_tensor(name).t().contiguous()
                    out[target + ".scales"] = st.get_tensor(prefix + ".weight_scale").t().contiguous()
                    # Symmetric int4: zero point 8 in every group; GPTQ v1 stores zero - 1 = 7 in each nibble.
                    out[target + ".qzeros"] = torch.full(
                        (in_features // group, out_features // 8), 0x77777777, dtype=torch.int32
                    )
                    out[target + ".g_idx"] = torch.arange(in_features, dtype=torch.int32) // group
                elif name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
                    continue
                else:
                    out[module_name(name)] = st.get_tensor(name)
        save_file(out, dst / f.name, metadata={"format": "pt"})
        weight_map.update({k: f.name for k in out})
    if (src / "model.safetensors.index.json").exists():
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )
    config["quantization_config"] = {
        "quant_method": GPTQ,
        "bits": spec.bits,
        "group_size": group,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "checkpoint_format": GPTQ,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["toolkit-repack:compressed-tensors"]},
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for item in src.iterdir():
        if (
            item.is_file()
            and item.suffix != ".safetensors"
            and item.name
            not in (
                "config.json",
                "model.safetensors.index.json",
            )
        ):
            shutil.copy2(item, dst / item.name)


def gptq_cache_dir(src: Path) -> Path:
    """Where the repack of `src` lives: beside the checkpoint if writable, else the user cache."""
    src = Path(src).resolve()
    if os.access(src, os.W_OK):
        return src / ".toolkit-gptq"
    root = Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit"))
    return root / "gptq" / hashlib.sha256(str(src).encode()).hexdigest()[:16]


def ensure_gptq(src: Path) -> Path:
    """Return a GPTQ-layout folder for `src`: `src` itself, or its (cached) repack; repacks at most once."""
    src = Path(src)
    spec = read_quant_spec(json.loads((src / "config.json").read_text()), where=str(src / "config.json"))
    if spec.format == GPTQ:
        return src
    cache = gptq_cache_dir(src)
    stamp = cache / "toolkit_repack.json"
    fingerprint = source_fingerprint(src)

    def current() -> bool:
        return stamp.exists() and json.loads(stamp.read_text()).get("source_fingerprint") == fingerprint

    if current():
        return cache
    with exclusive(cache, f"repack of {src} to GPTQ layout"):
        if current():  # another process's repack
            return cache
        # Write beside the target and rename, so an interrupted repack never leaves a half cache behind.
        with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".repack-") as tmp:
            repack_to_gptq(src, Path(tmp) / "out")
            (Path(tmp) / "out" / "toolkit_repack.json").write_text(
                json.dumps({"source": str(src.resolve()), "source_fingerprint": fingerprint}, indent=2) + "\n"
            )
            if cache.exists():
                shutil.rmtree(cache)
            os.replace(Path(tmp) / "out", cache)
    return cache


# --------------------------------------------------------------------------------------------------- dequantising
# For the merged export (lora/export_merged.py): the dense weight each 4-bit layer stands for, as the toolkit's
# kernels compute it: (code - zero) * scale in float32. That product is exact in float32 (a code minus its zero
# point needs 5 bits, a bfloat16 scale 8), so there is one right answer and GPTQModel's TorchLinear gives it too
# (tests/lora/test_export_merged.py compares them bit for bit).

_NIBBLE_SHIFTS = (0, 4, 8, 12, 16, 20, 24, 28)  # element i of an int32 word sits at bits 4i (both layouts)


def checkpoint_name(tensor_name: str) -> str:
    """The real checkpoint's name (transformers 4.5x, google/gemma-3-*'s own files: `language_model.model.*`,
    `vision_tower.vision_model.*`, `multi_modal_projector.*`) of a tensor named either way."""
    name = module_name(tensor_name)
    for prefix, legacy in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(prefix):
            return legacy + name[len(prefix) :]
    return name


def dequantize_packed(packed, scale, group_size: int = C.QUANT_GROUP_SIZE):
    """compressed-tensors pack-quantized symmetric int4 rows -> float32 [out, in]: (code - 8) * scale.

    `packed` int32 [out, in/8] (element i at bits 4i, stored as value + 8), `scale` [out, in/group_size]; any run
    of whole output rows may be passed (the export works through a big layer in row chunks).
    """
    import torch

    rows, words = packed.shape
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int32)
    codes = (packed[:, :, None] >> shifts) & 15  # arithmetic shift of a negative word: the mask keeps the nibble
    weight = codes.reshape(rows, words * 8).to(torch.float32).sub_(8)
    if weight.shape[1] != scale.shape[1] * group_size:
        raise ToolkitError(
            f"packed weight [{rows}, {words * 8}] does not match its scales {list(scale.shape)} (group {group_size})",
            fix="check that the checkpoint is complete and in pack-quantized W4A16 format",
        )
    weight.view(rows, -1, group_size).mul_(scale.to(torch.float32)[:, :, None])
    return weight


def dequantize_gptq(qweight, qzeros, scales, g_idx, *, zero_offset: int = 1):
    """GPTQ layout int4 -> float32 [out, in]: (code - zero[g_idx]) * scales[g_idx], per input row's group.

    `qweight` int32 [in/8, out], `qzeros` int32 [groups, out/8], `scales` [groups, out], `g_idx` [in]; any run of
    output columns (a multiple of 8 wide, so qzeros' words split cleanly) may be passed. `zero_offset`: 1 for
    GPTQ v1 checkpoints (checkpoint_format "gptq": the zero point stored minus one), 0 for "gptq_v2".
    """
    import torch

    words, cols = qweight.shape
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int32)
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(words * 8, cols)  # [in, out]
    zeros = ((qzeros[:, :, None] >> shifts) & 15).reshape(qzeros.shape[0], -1) + zero_offset  # [groups, out]
    groups = g_idx.long()
    weight = (codes - zeros[groups]).to(torch.float32).mul_(scales.to(torch.float32)[groups])
    return weight.t()

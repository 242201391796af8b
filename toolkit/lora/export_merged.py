"""`toolkit export ADAPTER --to merged`: the base dequantised with the adapter merged in, as a plain transformers
folder (`AutoModelForImageTextToText.from_pretrained` loads it with no toolkit, no peft and no GPTQ library).

Why not peft's `merge_and_unload`: peft refuses to merge into GPTQ layers, and dequantising a loaded model first
would hold the whole dense model in memory. Here the base's safetensors are read tensor by tensor, and a large
tensor in chunks of whole rows: each 4-bit linear becomes (code - zero) * scale in float32 (the weight the
toolkit's kernels compute, bit for bit: quant_format.dequantize_*), the LoRA update scale * B @ A is added in
float32, and the sum is rounded once to the output dtype and written straight into its shard. Everything else
(embeddings, norms, vision tower, projector) is copied, cast to the output dtype, a vision-tower LoRA added the
same way. Output dtype bfloat16 (the checkpoint's own) or float32, never float16: Gemma 3's activations overflow
it. Tensor names are the real checkpoint's (google/gemma-3-*'s own: `language_model.model.*`,
`vision_tower.vision_model.*`), which transformers 4.5x and 5, vLLM and llama.cpp's converter all read.

Shards are written by a streaming safetensors writer of our own (header first, since every shape is known from
the base's headers, then each chunk's bytes as it is computed) rather than `safetensors.torch.save_file`, which
takes a dict of whole tensors and copies each into a bytes object: a 2 GB shard would cost 4 GB resident, the
27B's embedding 5.6 GB. Each shard is written under a `.partial` name and renamed; the caller stages the folder.

Memory plan for the 27B (`bench/export_merged_270m.py --plan-27b`, build/export-merged-27b-plan.json: the
27b-shapes base's own headers read by `_scan`, its layers replicated to the 27B's 62 text and 27 vision layers with
the real 262,208-row vocabulary, shards assigned by `_assign_shards`): the output is 27.43B parameters, 54.86 GB in
bfloat16 (109.73 GB in float32) in 29 shards (57 in float32) of at most 2 GB, except the embedding, 262,208 x 5,376
= 1.41B elements, 2.82 GB in bfloat16, which is a shard of its own (a tensor cannot span files). The largest
linear layer (gate_proj / up_proj 21,504 x 5,376 and down_proj 5,376 x 21,504: 115.6M weights, 462 MB in float32)
is never whole in float32: it goes through in runs of CHUNK_ELEMENTS (down_proj: 780 rows, 67 MB per float32
buffer, a few buffers live at once), and so does the embedding, so the peak does not grow with any tensor.
Resident at the peak: the interpreter with torch (~0.5 GB), the adapter's A and B (rank 16 on all 7 projections of
62 layers: 113.5M parameters, 454 MB in float32) and one chunk's working set. Measured on the 27b-shapes base (2
layers, the 27B's largest linears, a random rank-16 adapter on every projection, bfloat16): peak RSS 827-865 MB in
two runs, 530 MB of it before the export began; with the 27B's larger adapter that plans to ~1.3 GB resident,
against 54.86 GB written (the output folder needs that much disk beside the ~16.9 GB 4-bit base). The 270M: 0.6 GB
(bfloat16) and 0.7 GB (float32) peak, about 1 s (bench/export_merged_270m.py). `quantize` is another matter: GPTQModel
holds the dense text model (the 270M: 2.7 GB peak, 95 s on 2 cores); for the 27B it needs a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.lora.weights import LoraAdapter, LoraModule

DTYPES = ("bfloat16", "float32")
SHARD_BYTES = 2_000_000_000  # ~2 GB per shard, as transformers' save_pretrained writes them (its max_shard_size)
CHUNK_ELEMENTS = 1 << 24  # weights dequantised and merged per step: 64 MB per float32 buffer
# The files a runtime needs beside the weights: tokenizer, processor, chat template, generation settings.
COPIED = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)
_ST_DTYPES = {  # torch dtype name -> safetensors' dtype code, element size
    "bfloat16": ("BF16", 2),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "float64": ("F64", 8),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
_FROM_ST = {code: name for name, (code, _) in _ST_DTYPES.items()}


@dataclass
class _Tensor:
    """One tensor of the merged folder and where its values come from."""

    name: str  # its name in the output (the real checkpoint's naming)
    kind: str  # "dense" (copied, cast), "packed" / "gptq" (int4 in either layout, dequantised), "given" (`value`)
    keys: dict[str, str]  # role -> tensor name in the base (dense: "value"; packed: packed/scale; gptq: 4 parts)
    shape: tuple[int, ...]
    source_dtype: str  # torch dtype name of a dense source; "float32" for a dequantised layer
    module: str | None = None  # the layer's transformers module path, for a `.weight` (what LoRA keys name)
    lora: LoraModule | None = None
    value: Any = None  # kind "given": the tensor itself (a re-quantised layer's packed weight, scale, shape)

    def out_dtype(self, dtype: str) -> str:
        floating = self.source_dtype in ("bfloat16", "float32", "float16", "float64")
        return dtype if floating else self.source_dtype

    def nbytes(self, dtype: str) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _ST_DTYPES[self.out_dtype(dtype)][1]


def merged_problems(adapter: LoraAdapter, *, base: Path | None = None) -> list[str]:
    """Why `adapter` cannot be merged (empty: it can). With `base`, also the modules the base has no weight for."""
    out = list(adapter.unsupported())
    if adapter.config.get("fan_in_fan_out"):
        out.append("fan_in_fan_out (Conv1D-style weights): Gemma 3 has none")
    for m in adapter.modules:
        if m.a.ndim != 2 or m.b.ndim != 2:
            out.append(f"{m.name}: LoRA on a convolution ({m.a.ndim}-d weights), not a linear layer")
        if m.name.endswith(("lm_head", "embed_tokens")):
            out.append(f"{m.name}: the LM head is tied to the embeddings; a merged update would change both")
    if base is not None and not out:
        tensors = {t.module: t for t in _scan(Path(base))[0] if t.module}
        for m in adapter.modules:
            t = tensors.get(m.name)
            if t is None:
                out.append(f"{m.name}: LoRA module whose weight is not in the base")
            elif t.shape != (m.b.shape[0], m.a.shape[1]):
                out.append(f"{m.name}: LoRA update {m.b.shape[0]}x{m.a.shape[1]} on a weight of shape {list(t.shape)}")
    return out


def write_merged(
    adapter: LoraAdapter,
    out: Path,
    *,
    base: Path,
    dtype: str = "bfloat16",
    progress: Callable[[str], Any] | None = None,
    quantize: bool = False,
    calibration: Path | None = None,
) -> list[str]:
    """Write `base` with `adapter` merged in as a plain transformers folder into `out` (an existing empty folder).

    Returns the names of the files written. `progress(line)` gets a line per stage; a tqdm bar over the tensors
    is drawn on stderr when it is a terminal. `quantize`: GPTQ-quantise the merged language model again into the
    base's own format (a new 4-bit base for `toolkit serve` / `toolkit train`: see `_write_quantized`), calibrated
    on the adapter's training rows or on the `calibration` file's (its other tensors are bfloat16 then, whatever
    `dtype` says: the checkpoint's own dtype).
    """
    if dtype not in DTYPES:
        raise ToolkitError(
            f"dtype {dtype!r} cannot hold a merged Gemma 3"
            + (": its activations overflow float16" if dtype == "float16" else ""),
            where="--dtype",
            fix=f"use one of: {', '.join(DTYPES)}",
        )
    base, out = Path(base), Path(out)
    reasons = merged_problems(adapter, base=base)
    if reasons:
        raise ToolkitError(
            f"{adapter.folder.name} cannot be merged: " + "; ".join(reasons[:4]),
            where=str(adapter.folder),
            fix="retrain without DoRA, biases or modules_to_save, on this base",
        )
    tensors, files, config = _scan(base)
    by_module = {m.name: m for m in adapter.modules}
    for t in tensors:
        t.lora = by_module.get(t.module) if t.module else None
    say = progress or (lambda line: None)
    if quantize:
        return _write_quantized(adapter, out, base, tensors, files, config, calibration, say)
    written = _write_tensors(out, tensors, files, dtype, say, f"merging {len(adapter.modules)} LoRA modules into")
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = dtype  # transformers 5 reads dtype, 4.x and vLLM torch_dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written.append("config.json")
    written += _copy_processor(base, out)
    (out / "README.md").write_text(_card(adapter, base, dtype, len(tensors)))
    written.append("README.md")
    return written


def _write_tensors(out: Path, tensors: list[_Tensor], files: dict[str, Path], dtype: str, say: Callable, what: str):
    """The tensors as safetensors shards + index in `out`; returns the file names."""
    from tqdm import tqdm

    shards = _assign_shards(tensors, dtype)
    total = sum(t.nbytes(dtype) for t in tensors)
    say(f"{what} {len(tensors)} tensors: {total / 1e9:.2f} GB of {dtype} in {len(shards)} shard(s)")
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    with tqdm(total=len(tensors), unit="tensor", desc="merge", disable=None) as bar:
        for name, shard in zip(names, shards, strict=True):
            _write_shard(out / name, shard, files, dtype, bar)
            weight_map.update({t.name: name for t in shard})
            say(f"wrote {name} ({sum(t.nbytes(dtype) for t in shard) / 1e9:.2f} GB)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def _copy_processor(base: Path, out: Path) -> list[str]:
    copied = []
    for item in COPIED:
        if (base / item).is_file():
            shutil.copy2(base / item, out / item)
            copied.append(item)
    return copied


def _card(adapter: LoraAdapter, base: Path, dtype: str, n_tensors: int) -> str:
    return (
        f"# {adapter.folder.name} merged into {base.name}\n\n"
        f"Written by `toolkit export {adapter.folder.name} --to merged --dtype {dtype}`: the 4-bit base's linear "
        f"layers dequantised and the LoRA update ({len(adapter.modules)} modules) added, {n_tensors} tensors "
        f"in {dtype}. "
        "A plain transformers folder:\n\n"
        "```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
        'model = AutoModelForImageTextToText.from_pretrained("THIS_FOLDER")\n'
        'processor = AutoProcessor.from_pretrained("THIS_FOLDER")\n```\n'
    )


# ------------------------------------------------------------------------------------------------ re-quantising

# The quantisation_config of the real checkpoint (ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g), which the re-quantised
# base carries whatever layout the source base had: the toolkit's loader reads it and repacks it to GPTQ layout.
_W4A16 = {
    "config_groups": {
        "group_0": {
            "format": "pack-quantized",
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "dynamic": False,
                "group_size": 128,
                "num_bits": 4,
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "global_compression_ratio": None,
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
}


def _write_quantized(
    adapter: LoraAdapter,
    out: Path,
    base: Path,
    tensors: list[_Tensor],
    files: dict[str, Path],
    config: dict,
    calibration: Path | None,
    say: Callable,
) -> list[str]:
    """The merged model GPTQ-quantised again, written as a 4-bit base in the 27B's format.

    As `toolkit tiny-base --weights gemma-3-270m` builds the 270M (real_weights.py): the merged language model is
    written as a float32 Gemma3ForCausalLM folder (a temporary beside `out`), GPTQModel quantises it
    (gptq_backend.quantize_gptq, real_weights' default settings: symmetric int4, group 128, contiguous groups)
    on token runs of the adapter's own training conversations, and its nibbles and scales are stored as
    compressed-tensors pack-quantized W4A16 (weight_packed = qweight transposed: the same nibbles, zero point 8;
    weight_scale = scales transposed, in bfloat16 as the checkpoint stores them). Everything else (embeddings,
    norms, vision tower with any vision LoRA merged, projector) is the merge in bfloat16. The config gains a
    `toolkit_merged` entry, so the new base has its own fingerprint: an adapter trained on the old base is refused
    on it (it is already inside). GPTQModel holds the dense text model in memory: fine for the 270M, not a plan
    for the 27B on a CPU.
    """
    import tempfile
    from dataclasses import asdict

    import torch

    from toolkit.base import gptq_backend, loader, real_weights
    from toolkit.base import quant_format as qf

    settings = {**asdict(real_weights.DEFAULT_SETTINGS), "group_size": qf.C.QUANT_GROUP_SIZE}
    ids = calibration_ids(adapter, base, calibration, settings["samples"], settings["sample_tokens"])
    say(f"calibration: {len(ids)} runs of {len(ids[0])} tokens")
    text_prefix = "language_model.model."
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-gptq-") as tmp:
        dense = Path(tmp) / "dense"
        dense.mkdir()
        text = []
        for t in tensors:
            if t.name.startswith(text_prefix):
                c = _Tensor(**{**t.__dict__, "name": "model." + t.name[len(text_prefix) :]})
                text.append(c)
        _write_tensors(dense, text, files, "float32", say, "writing the merged language model:")
        text_config = {**config["text_config"], "architectures": ["Gemma3ForCausalLM"], "dtype": "float32"}
        text_config.pop("quantization_config", None)
        (dense / "config.json").write_text(json.dumps(text_config, indent=2) + "\n")
        for item in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (base / item).is_file():
                shutil.copy2(base / item, dense / item)
        say("GPTQ-quantising the merged language model (GPTQModel; minutes for the 270M on a CPU)")
        gptq_dir = Path(tmp) / "gptq"
        gptq_backend.quantize_gptq(dense, gptq_dir, ids, settings)
        quantized = _read_gptq_output(gptq_dir)
    out_tensors: list[_Tensor] = []
    for t in tensors:
        if t.kind == "dense":
            out_tensors.append(t)
            continue
        stem = t.name.removesuffix(".weight")
        key = "model." + stem[len(text_prefix) :] if stem.startswith(text_prefix) else None
        if key not in quantized:
            raise ToolkitError(f"GPTQModel did not quantise {stem}", where=str(base), fix="report this as a bug")
        packed, scale = quantized.pop(key)
        if (packed.shape[0], packed.shape[1] * 8) != t.shape:
            raise ToolkitError(f"{stem}: GPTQ output {list(packed.shape)} for {list(t.shape)}", fix="report a bug")
        shape = torch.tensor(list(t.shape), dtype=torch.int64)
        for suffix, value in ((".weight_packed", packed), (".weight_scale", scale), (".weight_shape", shape)):
            dtype_name = str(value.dtype).removeprefix("torch.")
            out_tensors.append(_Tensor(stem + suffix, "given", {}, tuple(value.shape), dtype_name, value=value))
    out_tensors.sort(key=lambda t: t.name)
    written = _write_tensors(out, out_tensors, files, "bfloat16", say, "writing the re-quantised base:")
    dense_linears = sorted(
        t.name.removesuffix(".weight")
        for t in tensors
        if t.kind == "dense"
        and len(t.shape) == 2
        and t.name.endswith(".weight")
        and "vision_tower" in t.name
        and t.name.rsplit(".", 2)[-2].endswith(("proj", "fc1", "fc2"))
    )
    config["quantization_config"] = {**_W4A16, "ignore": [*dense_linears, "language_model.lm_head"]}
    config["dtype"] = "bfloat16"
    source_fingerprint = loader.fingerprint(json.loads((base / "config.json").read_text()))
    config["toolkit_merged"] = {"adapter": adapter.folder.name, "base_fingerprint": source_fingerprint}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written += ["config.json", *_copy_processor(base, out)]
    (out / "README.md").write_text(
        f"# {adapter.folder.name} merged into {base.name}, GPTQ 4-bit again\n\n"
        f"Written by `toolkit export {adapter.folder.name} --to merged --quantize gptq`: the merged model's language "
        "model GPTQ-quantised (symmetric int4, group 128) and stored as compressed-tensors pack-quantized W4A16, the "
        "27B checkpoint's format. It is a base: `toolkit serve THIS_FOLDER`, `base.path: THIS_FOLDER` in a recipe.\n"
    )
    return [*written, "README.md"]


def _read_gptq_output(folder: Path) -> dict[str, tuple[Any, Any]]:
    """GPTQModel's saved layers -> {module name: (weight_packed int32 [out, in/8], weight_scale bf16 [out, groups])}.

    The nibbles are the same in both layouts (unsigned codes, zero point 8 when symmetric), packed along the input
    in GPTQ layout and along the row in compressed-tensors: a transpose, as quant_format.repack_to_gptq undoes."""
    import torch
    from safetensors.torch import load_file

    from toolkit.base import quant_format as qf

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if config.get("desc_act") or not config.get("sym", True) or config.get("bits") != 4:
        raise ToolkitError(f"GPTQ output is not symmetric static-group int4: {config}", fix="report a bug")
    tensors: dict[str, Any] = {}
    for f in qf.weight_files(folder):
        tensors.update(load_file(f))
    out = {}
    for name in [n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")]:
        qweight, qzeros = tensors[name + ".qweight"], tensors[name + ".qzeros"]
        in_features = qweight.shape[0] * 8
        if not torch.equal(tensors[name + ".g_idx"].long(), torch.arange(in_features) // qf.C.QUANT_GROUP_SIZE):
            raise ToolkitError(f"{name}: GPTQ groups are not contiguous", fix="report a bug")
        zeros = (qzeros[:, :, None] >> torch.arange(0, 32, 4, dtype=torch.int32)) & 15
        if not bool((zeros == 7).all() or (zeros == 8).all()):  # v1 stores zero - 1
            raise ToolkitError(f"{name}: GPTQ zero points are not symmetric", fix="report a bug")
        out[name] = (qweight.t().contiguous(), tensors[name + ".scales"].t().to(torch.bfloat16).contiguous())
    return out


def calibration_ids(
    adapter: LoraAdapter, base: Path, file: Path | None = None, samples: int = 64, tokens: int = 256
) -> list[list[int]]:
    """GPTQ's calibration: the text conversations of `file` or of the adapter's training data (its toolkit.json
    recipe), encoded with the base's chat template, joined and cut into at most `samples` runs of `tokens`
    tokens, each opened with <bos> (equal lengths: GPTQModel batches them without padding). Image rows are
    skipped: GPTQModel runs the text model alone."""
    from toolkit.base.loader import load_processor
    from toolkit.data.datasets import read_rows
    from toolkit.data.template import encode_conversation
    from toolkit.lora.folder import read_manifest
    from toolkit.recipe import DataSection

    recipe = read_manifest(adapter.folder).get("recipe") or {}
    data = DataSection(**{k: v for k, v in (recipe.get("data") or {}).items() if k in DataSection.model_fields})
    source = str(file) if file is not None else data.train
    if not source or (not Path(source).exists() and file is not None):
        raise ToolkitError(
            f"no calibration data: {source or 'the adapter records no training data'}",
            where="--calibration",
            fix="pass --calibration FILE (rows of messages)",
        )
    processor = load_processor(base)
    _, rows = read_rows(source, data, [])
    stream: list[int] = []
    bos = processor.tokenizer.bos_token_id
    for row in rows:
        messages = getattr(row, "messages", None)
        if not messages or any(not isinstance(m.content, str) for m in messages if hasattr(m, "content")):
            continue
        encoded = encode_conversation(processor, messages, [])
        stream += [t for t in encoded.input_ids if t != bos]
        if len(stream) >= samples * (tokens - 1):
            break
    n = tokens - 1
    if len(stream) < n:
        raise ToolkitError(
            f"{source} has {len(stream)} text tokens, fewer than one calibration run of {tokens}",
            where="--calibration",
            fix="pass a larger --calibration FILE",
        )
    return [[bos, *stream[i * n : (i + 1) * n]] for i in range(min(samples, len(stream) // n))]


# ------------------------------------------------------------------------------------------------ reading the base


def _scan(base: Path) -> tuple[list[_Tensor], dict[str, Path], dict]:
    """The merged folder's tensors from the base's headers (no weights read), the file of every base tensor, and
    the base's config. A layer's 4-bit parts become one `.weight`, wherever the base's shards put them."""
    from safetensors import safe_open

    from toolkit.base import quant_format as qf

    config_file = base / "config.json"
    if not config_file.is_file():
        raise ToolkitError(f"no config.json in {base}", where="--base", fix="point at the adapter's base folder")
    config = json.loads(config_file.read_text())
    zero_offset = 1
    if config.get("quantization_config"):
        spec = qf.read_quant_spec(config, where=str(config_file))
        if spec.format == qf.GPTQ:
            layout = config["quantization_config"].get("checkpoint_format", "gptq")
            if layout not in ("gptq", "gptq_v2"):
                raise ToolkitError(
                    f"GPTQ checkpoint_format {layout!r} is not supported",
                    where=str(config_file),
                    fix="use a gptq (v1) or gptq_v2 checkpoint",
                )
            zero_offset = 1 if layout == "gptq" else 0
    files: dict[str, Path] = {}
    shapes: dict[str, tuple[list[int], str]] = {}
    for f in qf.weight_files(base):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                piece = st.get_slice(key)
                files[key] = f
                shapes[key] = (piece.get_shape(), _FROM_ST[piece.get_dtype()])
    if not files:
        raise ToolkitError(f"no *.safetensors weight files in {base}", where="--base", fix="point at a base folder")

    tensors: list[_Tensor] = []
    quant_parts = {".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point"}
    gptq_parts = {".qweight", ".qzeros", ".scales", ".g_idx"}
    for key in sorted(files):
        stem, dot, last = key.rpartition(".")
        suffix = dot + last
        if suffix == ".weight_packed":
            if stem + ".weight_scale" not in files:
                raise ToolkitError(f"{key} has no weight_scale", where=str(base), fix="re-download the checkpoint")
            words = shapes[key][0]
            shape = (words[0], words[1] * 8)
            if stem + ".weight_shape" in files:
                with safe_open(files[stem + ".weight_shape"], "pt") as st:
                    shape = tuple(st.get_tensor(stem + ".weight_shape").tolist())
            keys = {"packed": key, "scale": stem + ".weight_scale"}
            tensors.append(_Tensor(qf.checkpoint_name(stem) + ".weight", "packed", keys, shape, "float32"))
        elif suffix == ".qweight":
            missing = [p for p in (".qzeros", ".scales", ".g_idx") if stem + p not in files]
            if missing:
                raise ToolkitError(f"{key} has no {missing[0][1:]}", where=str(base), fix="re-download the checkpoint")
            words, cols = shapes[key][0]
            keys = {p[1:]: stem + p for p in gptq_parts}
            keys["zero_offset"] = str(zero_offset)
            tensors.append(_Tensor(qf.checkpoint_name(stem) + ".weight", "gptq", keys, (cols, words * 8), "float32"))
        elif (suffix in quant_parts and stem + ".weight_packed" in files) or (
            suffix in gptq_parts and stem + ".qweight" in files
        ):
            continue  # consumed with its layer's packed weight
        else:
            shape, source_dtype = shapes[key]
            tensors.append(_Tensor(qf.checkpoint_name(key), "dense", {"value": key}, tuple(shape), source_dtype))
    for t in tensors:
        if t.name.endswith(".weight"):
            t.module = qf.module_name(t.name.removesuffix(".weight"))
    return tensors, files, config


def _assign_shards(tensors: list[_Tensor], dtype: str, limit: int = SHARD_BYTES) -> list[list[_Tensor]]:
    """Tensors in order into shards of at most `limit` bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        n = t.nbytes(dtype)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


# ------------------------------------------------------------------------------------------------ computing, writing


def _rows_per_chunk(t: _Tensor) -> int:
    row = 1
    for d in t.shape[1:]:
        row *= d
    rows = max(1, CHUNK_ELEMENTS // max(row, 1))
    if t.kind == "gptq":  # output columns of qzeros are packed 8 to a word
        rows = max(8, rows - rows % 8)
    return min(rows, t.shape[0]) if t.shape else 1


def _read(files: dict[str, Path], key: str, rows: slice | None = None, columns: slice | None = None) -> Any:
    """One tensor, or a run of its rows or columns, from the base (each call opens and closes its file, so the
    mapped pages of a 4 GB shard are not all kept resident)."""
    from safetensors import safe_open

    with safe_open(files[key], "pt") as st:
        piece = st.get_slice(key)
        if rows is not None:
            return piece[rows]
        if columns is not None:
            return piece[:, columns]
        return piece[:]


def _chunks(t: _Tensor, files: dict[str, Path], dtype: str):
    """The merged values of `t` as runs of whole rows, in the output dtype."""
    import torch

    from toolkit.base import quant_format as qf

    out_dtype = getattr(torch, t.out_dtype(dtype))
    if t.kind == "given":
        yield t.value.to(out_dtype).contiguous()
        return
    if not t.shape:  # a scalar
        yield _read(files, t.keys["value"]).to(out_dtype)
        return
    step = _rows_per_chunk(t)
    for start in range(0, t.shape[0], step):
        rows = slice(start, min(start + step, t.shape[0]))
        if t.kind == "packed":
            value = qf.dequantize_packed(_read(files, t.keys["packed"], rows), _read(files, t.keys["scale"], rows))
        elif t.kind == "gptq":
            value = qf.dequantize_gptq(
                _read(files, t.keys["qweight"], columns=rows),
                _read(files, t.keys["qzeros"], columns=slice(rows.start // 8, (rows.stop + 7) // 8)),
                _read(files, t.keys["scales"], columns=rows),
                _read(files, t.keys["g_idx"]),
                zero_offset=int(t.keys["zero_offset"]),
            )
        else:
            value = _read(files, t.keys["value"], rows)
        if t.lora is not None:
            # peft's update, B @ A times the scale in float32 (LoraModule.delta), for these rows only
            value = value.to(torch.float32) + (t.lora.b[rows].float() @ t.lora.a.float()) * t.lora.scale
        yield value.to(out_dtype).contiguous()


def _write_shard(path: Path, shard: list[_Tensor], files: dict[str, Path], dtype: str, bar: Any) -> None:
    """A safetensors file written as its chunks are computed: the header (every shape is known), then the bytes."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        n = t.nbytes(dtype)
        header[t.name] = {
            "dtype": _ST_DTYPES[t.out_dtype(dtype)][0],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in shard:
            written = 0
            for chunk in _chunks(t, files, dtype):
                data = chunk.reshape(-1).view(torch.uint8).numpy()  # safetensors is little-endian, as x86/ARM
                f.write(data)
                written += data.nbytes
            if written != t.nbytes(dtype):  # a wrong count would shift every later tensor: never write that
                raise RuntimeError(f"{t.name}: wrote {written} bytes, planned {t.nbytes(dtype)}")
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def memory_plan(tensors: list[_Tensor], dtype: str, shard_bytes: int = SHARD_BYTES) -> dict:
    """What an export of these tensors writes and holds: sizes, shards, the largest tensor and chunk."""
    shards = _assign_shards(tensors, dtype, shard_bytes)
    largest = max(tensors, key=lambda t: t.nbytes(dtype))
    linears = [t for t in tensors if t.kind != "dense"] or tensors
    big = max(linears, key=lambda t: t.nbytes("float32"))
    elements = sum(t.nbytes("float32") // 4 for t in tensors)
    return {
        "parameters": elements,
        "bytes": sum(t.nbytes(dtype) for t in tensors),
        "shards": len(shards),
        "largest_shard_bytes": max(sum(t.nbytes(dtype) for t in s) for s in shards),
        "largest_tensor": {"name": largest.name, "shape": list(largest.shape), "bytes": largest.nbytes(dtype)},
        "largest_linear": {"name": big.name, "shape": list(big.shape), "float32_bytes": big.nbytes("float32")},
        "chunk_rows_of_largest_linear": _rows_per_chunk(big),
        "chunk_float32_bytes": min(big.nbytes("float32"), _rows_per_chunk(big) * big.nbytes("float32") // big.shape[0]),
    }

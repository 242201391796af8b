"""`toolkit export ADAPTER --to gguf`: the adapter as a llama.cpp GGUF LoRA file, with an Ollama Modelfile and a
README that load it (llama-server, llama-cpp-python, Ollama).

The format is what llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads:
- metadata general.architecture "gemma3", general.type "adapter", adapter.type "lora", adapter.lora.alpha (f32);
- per adapted base tensor `blk.N.attn_q.weight` the pair `blk.N.attn_q.weight.lora_a` (numpy [r, in], GGUF ne
  [in, r]) and `.lora_b` (numpy [out, r], GGUF ne [r, out]): peft's lora_A / lora_B as they are, since GGUF lists
  dims reversed (llama-adapter.cpp checks base ne[0] == a ne[0], base ne[1] == b ne[1], a ne[1] == b ne[0]);
- llama.cpp adds scale * B @ (A @ x) with scale = user_scale * alpha / rank, rank = lora_b's ne[0]
  (llama_adapter_lora_weight::get_scale; alpha 0 means scale = user_scale), one alpha for the whole file.
  peft's per-module scale (rsLoRA: alpha / sqrt(r); rank_pattern / alpha_pattern) is folded into lora_b, so the
  file's one alpha reproduces every module's trained update at user scale 1.
Gemma 3's q/k weights are not permuted by convert_hf_to_gguf.py (Gemma3Model derives from TextModel, not
LlamaModel, and llama.cpp ropes Gemma in NeoX order), so the LoRA needs no permutation either; that script's other
Gemma 3 changes (norm weights + 1, embedding rows trimmed) touch no adapted projection.
llama.cpp's gemma3 graph (src/models/gemma3.cpp) applies LoRA to the text decoder's q/k/v/o and gate/up/down only:
vision-tower and projector modules live in the separate mmproj file, which takes no LoRA, so they are refused.
"""

from __future__ import annotations

import math
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.lora.weights import LoraAdapter, LoraModule

ARCH = "gemma3"
# peft module (transformers name) -> llama.cpp tensor (gguf-py's tensor_mapping.py for Gemma 3)
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
FIX = (
    "retrain with lora.include_vision: false, lora.dora: false and lora.target_modules among "
    + ", ".join(GGUF_NAMES)
    + " (no biases, no modules_to_save)"
)
# peft settings whose adapters compute something other than scale * B @ A x on the base weight llama.cpp holds
_CONFIG_REFUSALS = {
    "fan_in_fan_out": "fan_in_fan_out (transposed weights): llama.cpp's LoRA is B @ A on [out, in] weights",
    "layer_replication": "layer_replication: the GGUF base has no replicated layers to adapt",
    "use_qalora": "QA-LoRA (use_qalora): A reads pooled input groups, llama.cpp's A reads the whole input",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens): not written by this export",
    "trainable_token_indices": "trainable_token_indices: trained embedding rows are not LoRA A/B weights",
    "target_parameters": "target_parameters: LoRA on bare parameters, not on linear layers",
    "arrow_config": "Arrow routing (arrow_config): llama.cpp applies each LoRA whole",
}
# init_lora_weights methods that rewrite the base weights at initialisation: the adapter only fits that new base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def gguf_problems(adapter: LoraAdapter) -> list[str]:
    """Every reason llama.cpp's GGUF LoRA cannot represent `adapter` (empty: it can)."""
    out = list(adapter.unsupported())
    c = adapter.config
    out += [why for key, why in _CONFIG_REFUSALS.items() if c.get(key)]
    init = c.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        out.append(f"init_lora_weights {init!r} rewrote the base weights: the adapter does not fit the GGUF base")
    vision = [n for n in adapter.vision_modules if "vision_tower" in n or "multi_modal_projector" in n]
    other = [n for n in adapter.vision_modules if n not in vision]
    if vision:
        out.append(
            f"{len(vision)} vision-tower/projector LoRA modules ({vision[0]}...): llama.cpp's gemma3 LoRA covers "
            "the text decoder only"
        )
    if other:
        out.append(
            f"{len(other)} LoRA modules outside the text decoder's projections ({other[0]}...): llama.cpp's gemma3 "
            f"LoRA covers {', '.join(GGUF_NAMES)}"
        )
    for m in adapter.modules:
        if m.a.ndim != 2 or m.b.ndim != 2 or m.a.shape[0] != m.b.shape[1]:
            out.append(
                f"{m.name}: lora_A {tuple(m.a.shape)} and lora_B {tuple(m.b.shape)} are not an r x in, out x r pair"
            )
        elif not math.isfinite(m.scale):
            out.append(f"{m.name}: scaling {m.scale} is not finite")
    if not adapter.modules:
        out.append("no LoRA modules")
    return out


def tensor_name(module: LoraModule) -> str:
    """The llama.cpp base tensor a text-decoder module adapts: blk.N.attn_q.weight ..."""
    return f"blk.{module.layer}.{GGUF_NAMES[module.projection]}.weight"


def llama_scale(alpha: float, rank: int) -> float:
    """What llama.cpp multiplies B @ A by at user scale 1 (llama_adapter_lora_weight::get_scale)."""
    return alpha / rank if alpha else 1.0


def file_alpha(adapter: LoraAdapter) -> float:
    """The file's one alpha: the adapter's lora_alpha (what llama.cpp's own converter writes), as float32."""
    import numpy as np

    return float(np.float32(adapter.config.get("lora_alpha", 8)))


def _expected_shapes(base_config: dict) -> tuple[int, dict[str, tuple[int, int]]]:
    """Layers, and (out, in) of each projection, from the base's config.json (Gemma 3: under text_config)."""
    text = base_config.get("text_config", base_config)
    try:
        hidden, inter = int(text["hidden_size"]), int(text["intermediate_size"])
        heads, kv_heads = int(text["num_attention_heads"]), int(text["num_key_value_heads"])
        head_dim = int(text.get("head_dim") or hidden // heads)
        layers = int(text["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ToolkitError(
            f"the base's config.json has no usable text_config ({exc})", where="config.json", fix="give a Gemma 3 base"
        ) from None
    q, kv = heads * head_dim, kv_heads * head_dim
    return layers, {
        "q_proj": (q, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, q),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def _check_fits(adapter: LoraAdapter, base_config: dict) -> None:
    """Every module names a layer the base has and matches its projection's shape (llama.cpp refuses a LoRA
    whose tensors miss or mismatch the base: 'does not exist in base model' / 'has incorrect shape')."""
    layers, shapes = _expected_shapes(base_config)
    for m in adapter.modules:
        out_in = (int(m.b.shape[0]), int(m.a.shape[1]))
        if m.layer >= layers or out_in != shapes[m.projection]:
            raise ToolkitError(
                f"{m.name} (out x in {out_in[0]} x {out_in[1]}) does not fit the base ({layers} layers, "
                f"{m.projection} {shapes[m.projection][0]} x {shapes[m.projection][1]})",
                where=str(adapter.folder),
                fix="export against the base the adapter was trained on (--base)",
            )


def _check_gguf_base(path: Path, tensors: dict[str, tuple[int, int]]) -> None:
    """The base GGUF the user named is a gemma3 model holding every tensor the LoRA adapts, at its shape."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"{path} is not a readable GGUF file ({exc})", where="--gguf-base") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != ARCH:
        raise ToolkitError(f"{path} is a {arch!r} model, not {ARCH}", where="--gguf-base", fix="give a Gemma 3 GGUF")
    held = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # GGUF ne order: (in, out)
    for name, (out, inp) in tensors.items():
        if held.get(name) != (inp, out):
            raise ToolkitError(
                f"{path} has {name} as {held.get(name)}, the LoRA needs (in, out) {(inp, out)}",
                where="--gguf-base",
                fix="give the GGUF of the base the adapter was trained on (e.g. the `real` extra's gemma-3-270m)",
            )


def _modelfile(name: str, from_line: str) -> str:
    # Ollama puts no chat template on a GGUF file without one (the `real` extra's has none): Gemma 3's turn format
    # is stated here, system text merged into the first user turn as Gemma 3's own template does.
    return f"""# Ollama: ollama create {name} -f Modelfile && ollama run {name}
{from_line}
ADAPTER ./{name}.gguf
TEMPLATE \"\"\"<start_of_turn>user
{{{{ if .System }}}}{{{{ .System }}}}

{{{{ end }}}}{{{{ .Prompt }}}}<end_of_turn>
<start_of_turn>model
{{{{ .Response }}}}<end_of_turn>
\"\"\"
PARAMETER stop "<end_of_turn>"
"""


def _readme(name: str, base: str, adapter: LoraAdapter, alpha: float, folded: int) -> str:
    ranks = sorted({int(m.a.shape[0]) for m in adapter.modules})
    n = len(adapter.modules)
    if folded:
        scaling = (
            f"For {folded} of the {n} modules peft's scaling (rsLoRA, rank_pattern / alpha_pattern) differs from\n"
            "llama.cpp's alpha / rank and is folded into lora_b, so scale 1.0 gives the trained update."
        )
    else:
        scaling = "peft's scaling is llama.cpp's alpha / rank for every module: the tensors are as trained."
    return f"""# {name}: GGUF LoRA adapter for llama.cpp / llama-cpp-python / Ollama

Written by `toolkit export {name} --to gguf` from {adapter.folder}: {len(adapter.modules)} LoRA modules of the
Gemma 3 text decoder (rank {", ".join(map(str, ranks))}, file alpha {alpha:g}), float32. {scaling}
Load it on the GGUF of the same base model the adapter was trained on (its weights, any quantisation):

    llama-server -m {base} --lora {name}.gguf
    llama-server -m {base} --lora-scaled {name}.gguf 0.5     # half strength

    from llama_cpp import Llama
    llm = Llama(model_path="{base}", lora_path="{name}.gguf")

    ollama create {name} -f Modelfile && ollama run {name}

Ollama reads the `Modelfile` beside this file (FROM the base GGUF, ADAPTER this file, Gemma 3's chat template).
Answers differ slightly from `toolkit serve`: the two runtimes quantise the base differently.
"""


def write_gguf(
    adapter: LoraAdapter, out: Path, *, name: str, base_config: dict, gguf_base: str | None = None
) -> list[str]:
    """Write `<name>.gguf`, `Modelfile` and `README.md` into the existing empty folder `out`; returns the file
    names. Refuses (ToolkitError) what llama.cpp cannot represent and modules that do not fit the base."""
    problems = gguf_problems(adapter)
    if problems:
        raise ToolkitError(f"cannot export to GGUF: {'; '.join(problems)}", where=str(adapter.folder), fix=FIX)
    _check_fits(adapter, base_config)
    try:
        import gguf
        import numpy as np
    except ImportError:
        raise ToolkitError(
            "the gguf package is not installed", where="--to gguf", fix="pip install gguf==0.19.0 (the `real` extra)"
        ) from None

    modules = sorted(adapter.modules, key=lambda m: (m.layer, list(GGUF_NAMES).index(m.projection)))
    base_line = "FROM ./BASE.gguf"
    base = "BASE.gguf"
    if gguf_base is not None:
        path = Path(gguf_base).expanduser()
        if path.is_file():
            _check_gguf_base(path, {tensor_name(m): (int(m.b.shape[0]), int(m.a.shape[1])) for m in modules})
            base = str(path.resolve())  # the Modelfile resolves relative paths from its own folder
        elif path.suffix == ".gguf" or "/" in gguf_base:
            raise ToolkitError(f"{gguf_base} is not a file", where="--gguf-base", fix="give the base model's GGUF")
        else:
            base = gguf_base  # an Ollama model name
        base_line = f"FROM {base}"
    else:
        base_line = (
            "# Put the path of the base model's GGUF here (the base this adapter was trained on, e.g. gemma-3-270m):\n"
            + base_line
        )

    alpha = file_alpha(adapter)
    writer = gguf.GGUFWriter(out / f"{name}.gguf", arch=ARCH)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    folded = 0
    for m in modules:
        a = m.a.detach().float().cpu().numpy()
        b = m.b.detach().float().cpu().numpy()
        factor = m.scale / llama_scale(alpha, a.shape[0])
        if not math.isclose(factor, 1.0, rel_tol=1e-12):  # plain LoRA stays bit for bit as trained
            b = b * np.float32(factor)
            folded += 1
        t = tensor_name(m)
        writer.add_tensor(f"{t}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{t}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    (out / "Modelfile").write_text(_modelfile(name, base_line))
    (out / "README.md").write_text(_readme(name, base, adapter, alpha, folded))
    return [f"{name}.gguf", "Modelfile", "README.md"]

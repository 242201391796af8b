"""What vLLM's LoRA loader does with an adapter folder for Gemma3ForConditionalGeneration, replayed on our files:
every reason it would drop a tensor (and then silently serve the base), refuse the adapter, or need a larger
--max-lora-rank. Used by `toolkit serve --engine vllm` and `toolkit export --to vllm`; vLLM itself is not imported
(an optional extra, often in its own environment).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# vLLM's Gemma3ForConditionalGeneration.hf_to_vllm_mapper (vllm/model_executor/models/gemma3_mm.py)
HF_TO_VLLM_PREFIX = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
# Its LoRA-capable language-model projections (packed as qkv_proj and gate_up_proj inside vLLM)
LORA_MODULE = re.compile(
    r"^language_model\.model\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))$"
)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM's --max-lora-rank accepts


def vllm_module_name(tensor: str) -> tuple[str, str] | None:
    """(module, kind) of a PEFT tensor name as vLLM's parse_fine_tuned_lora_name sees it after the mapper;
    None for names that are not LoRA A/B weights."""
    name = tensor.removeprefix("base_model.model.")
    for old, new in HF_TO_VLLM_PREFIX.items():
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2]
    return None


@dataclass
class AdapterCheck:
    name: str
    path: Path
    rank: int
    modules: int = 0
    problems: list[str] = field(default_factory=list)


def check_adapter(name: str, folder: Path, num_layers: int) -> AdapterCheck:
    """What vLLM's LoRA loader would read from `folder`, and every reason it would not apply it fully."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = [int(config.get("r", 0)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    check = AdapterCheck(name, folder, max(ranks))  # vLLM sizes its slots by the largest rank
    p = check.problems
    if config.get("peft_type") != "LORA":
        p.append(f"peft_type is {config.get('peft_type')!r}; vLLM loads LORA adapters only")
    if config.get("use_dora"):
        p.append("DoRA adapters are not supported by vLLM")
    if config.get("modules_to_save"):
        p.append(f"modules_to_save {config['modules_to_save']} would be refused by vLLM")
    if config.get("bias", "none") != "none":
        p.append(f"bias {config['bias']!r}: vLLM loads LoRA weights without biases")
    if not (folder / "adapter_model.safetensors").is_file():
        p.append("adapter_model.safetensors is missing")
        return check
    if check.rank > VLLM_LORA_RANKS[-1] or check.rank < 1:
        p.append(f"rank {check.rank} is outside what vLLM supports (1..{VLLM_LORA_RANKS[-1]})")
    pairs: dict[str, set[str]] = {}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        for tensor in f.keys():
            parsed = vllm_module_name(tensor)
            if parsed is None:
                p.append(f"{tensor}: not a LoRA A/B weight")
                continue
            module, kind = parsed
            m = LORA_MODULE.match(module)
            if m is None:
                where = "vision tower / projector" if module.startswith(("vision_tower", "multi_modal")) else "unknown"
                p.append(f"{tensor} -> {module}: not a language-model projection vLLM applies LoRA to ({where})")
                continue
            if int(m.group(1)) >= num_layers:
                p.append(f"{tensor}: layer {m.group(1)} does not exist (the base has {num_layers})")
                continue
            pairs.setdefault(module, set()).add(kind)
    for module, kinds in pairs.items():
        if kinds != {"lora_A", "lora_B"}:
            p.append(f"{module}: has {sorted(kinds)} only")
    check.modules = len(pairs)
    if not pairs and not p:
        p.append("no LoRA weights at all")
    return check


def num_layers(config: dict) -> int:
    """The text decoder's layers in a Gemma 3 config.json (what check_adapter's `num_layers` takes)."""
    return int(config.get("text_config", config).get("num_hidden_layers", 0))


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest value vLLM accepts for --max-lora-rank that fits every adapter."""
    need = max(ranks, default=8)
    return next(r for r in VLLM_LORA_RANKS if r >= need)

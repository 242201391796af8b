"""An adapter folder's LoRA weights as the exporters read them: one `LoraModule` per adapted linear layer, with its
A and B matrices and the scaling peft applies to it (rsLoRA, per-module rank and alpha resolved), and the reasons
an adapter holds something beyond plain LoRA on linear layers (DoRA, biases, modules_to_save...), which each export
target refuses by name rather than writing a file that silently drops it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

PEFT_PREFIX = "base_model.model."
# model.language_model.layers.N.self_attn.q_proj / .mlp.gate_proj (the text decoder's projections)
TEXT_MODULE = re.compile(
    r"^model\.language_model\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))$"
)


@dataclass
class LoraModule:
    name: str  # the module's name in the transformers model (model.language_model.layers.0.self_attn.q_proj)
    a: Any  # torch tensor [r, in]
    b: Any  # torch tensor [out, r]
    scale: float  # what peft multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def layer(self) -> int | None:
        m = TEXT_MODULE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def projection(self) -> str | None:
        """q_proj ... down_proj for a text-decoder projection, else None (vision tower, projector...)."""
        m = TEXT_MODULE.match(self.name)
        return (m.group(3) or m.group(4)) if m else None

    def delta(self) -> Any:
        """The weight update peft adds: scale * B @ A, [out, in] in float32."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass
class LoraAdapter:
    folder: Path
    config: dict
    modules: list[LoraModule]
    extra_tensors: list[str]  # tensors that are not LoRA A/B weights (DoRA magnitudes, biases, saved modules)

    def unsupported(self) -> list[str]:
        """What this adapter holds beyond plain LoRA on linear layers, one reason each."""
        c, out = self.config, []
        if c.get("peft_type") != "LORA":
            out.append(f"peft_type is {c.get('peft_type')!r}, not LORA")
        if c.get("use_dora"):
            out.append("DoRA (use_dora): its magnitude vectors are not a LoRA A/B pair")
        if c.get("bias", "none") != "none" or c.get("lora_bias"):
            out.append(f"LoRA biases (bias {c.get('bias')!r}, lora_bias {c.get('lora_bias')!r})")
        if c.get("modules_to_save"):
            out.append(f"modules_to_save {c['modules_to_save']}: whole trained copies of modules, not LoRA")
        if self.extra_tensors:
            out.append(f"{len(self.extra_tensors)} tensors that are not LoRA A/B weights ({self.extra_tensors[0]}...)")
        return out

    @property
    def vision_modules(self) -> list[str]:
        return [m.name for m in self.modules if m.projection is None]


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_lora(folder: str | Path) -> LoraAdapter:
    """Read adapter_config.json and adapter_model.safetensors of a PEFT LoRA folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ToolkitError(f"{f.name} is missing", where=str(folder), fix="give a folder written by toolkit train")
    config = json.loads(config_file.read_text())
    tensors = load_file(str(weights_file))
    pairs: dict[str, dict[str, Any]] = {}
    extra = []
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name)
        if m is None:
            extra.append(key)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    modules = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ToolkitError(f"{name} has {sorted(ab)} only", where=str(weights_file), fix="retrain the adapter")
        rank = _pattern_value(config.get("rank_pattern") or {}, name, r)
        alpha_m = _pattern_value(config.get("alpha_pattern") or {}, name, alpha)
        scale = alpha_m / math.sqrt(rank) if config.get("use_rslora") else alpha_m / rank
        modules.append(LoraModule(name, ab["lora_A"], ab["lora_B"], float(scale)))
    return LoraAdapter(folder, config, modules, extra)

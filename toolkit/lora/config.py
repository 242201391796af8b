"""The adapter's shape: a recipe's lora section -> a peft LoraConfig over the base's 4-bit linears."""

from __future__ import annotations

import re
from typing import Any

from toolkit.errors import ToolkitError, first_line

VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def target_regex(section: Any) -> str:
    """Full-name regex of the modules to adapt: the language model's projections (+ the vision tower's)."""
    names = "|".join(map(re.escape, section.target_modules))
    pattern = rf".*language_model\.layers\.\d+\..*\.({names})"
    if section.include_vision:
        vision = "|".join(VISION_TARGETS)
        pattern = rf"(?:{pattern}|.*vision_tower\..*\.({vision}))"
    return pattern


def apply_lora(model: Any, section: Any) -> Any:
    """Wrap `model` with a new LoRA adapter; only the LoRA weights require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=target_regex(section),
        use_rslora=section.rslora,
        use_dora=section.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if section.dora and "dora" in str(exc).lower():
            raise ToolkitError(
                f"DoRA is not available on 4-bit GPTQ layers here (peft: {exc})",
                where="lora.dora",
                fix="set lora.dora: false",
            ) from None
        raise ToolkitError(
            f"peft cannot build this adapter: {first_line(str(exc), 200)}",
            where="lora",
            fix="check lora.target_modules (names of linear layers) or turn off lora.dora",
        ) from None
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    if not wrapped:
        raise ToolkitError(
            f"no layer matches lora.target_modules {section.target_modules}",
            where="lora.target_modules",
            fix="use names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        )
    return peft_model

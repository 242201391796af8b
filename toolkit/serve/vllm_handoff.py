"""Hand-off to vLLM: the `vllm serve` command for the same base and adapters, and the checks that make sure
vLLM will really apply our adapters.

vLLM serves Gemma 3 (`Gemma3ForConditionalGeneration`) from the original compressed-tensors checkpoint and
loads PEFT LoRA folders (`--lora-modules name=path`). Its loader maps each tensor name with the model's
`hf_to_vllm_mapper` (`model.language_model.` -> `language_model.model.`, ...) and keeps only modules it knows;
a tensor whose name maps elsewhere is dropped and the adapter then changes nothing: vLLM silently serves the
base. `check_adapter` replays that mapping on our files and refuses what would be dropped. vLLM itself is not
imported here (it is an optional extra, often in its own environment: it pins its own torch).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from toolkit import constants as C
from toolkit.errors import ToolkitError

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
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM's --max-lora-rank accepts


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
    check = AdapterCheck(name, folder, int(config.get("r", 0)))
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


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest value vLLM accepts for --max-lora-rank that fits every adapter."""
    need = max(ranks, default=VLLM_LORA_RANKS[0])
    return next(r for r in VLLM_LORA_RANKS if r >= need)


@dataclass
class VllmCommand:
    argv: list[str]
    env: dict[str, str]
    checks: list[AdapterCheck]

    def shell(self) -> str:
        """The command as one shell line, the API key redacted (it travels in the environment, not argv)."""
        prefix = "VLLM_API_KEY=*** " if "VLLM_API_KEY" in self.env else ""
        return prefix + shlex.join(self.argv)


def build_command(
    base: str | Path,
    adapters: list[tuple[str, Path]],
    *,
    config: dict,
    served_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_model_len: int,
    max_images: int = C.MAX_IMAGES_PER_REQUEST,
    max_batch: int | None = None,
) -> VllmCommand:
    """`vllm serve` for the base and adapters, after checking every adapter against vLLM's loader."""
    num_layers = int(config.get("text_config", {}).get("num_hidden_layers", 0))
    checks = [check_adapter(name, Path(folder), num_layers) for name, folder in adapters]
    bad = [f"{c.name}: {'; '.join(c.problems[:3])}" for c in checks if c.problems]
    if bad:
        raise ToolkitError(
            "vLLM would not apply these adapters (it would serve the base instead): " + " | ".join(bad),
            where="--adapter",
            fix="retrain with the default lora.target_modules (language-model projections only, no DoRA)",
        )
    argv = [
        "vllm",
        "serve",
        str(base),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--limit-mm-per-prompt",
        json.dumps({"image": max_images}, separators=(",", ":")),
    ]
    if max_batch is not None:
        argv += ["--max-num-seqs", str(max_batch)]
    if adapters:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank([c.rank for c in checks]))]
        argv += ["--max-loras", str(len(adapters)), "--lora-modules"]
        argv += [f"{name}={Path(folder).resolve()}" for name, folder in adapters]
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    return VllmCommand(argv, env, checks)


def plan(
    base: str | None,
    adapter_specs: list[str],
    *,
    adapters_dir: str | Path = "adapters",
    **options: object,
) -> VllmCommand:
    """The vLLM command for what `toolkit serve` would serve: same base (the original checkpoint folder, which
    vLLM reads natively), same adapter names, same served model name, the same context and image limits."""
    from types import SimpleNamespace

    from toolkit.base.loader import check_base, context_length, fingerprint, resolve_path, served_name
    from toolkit.lora.registry import check_base_matches, resolve_serving

    base, resolved = resolve_serving(base, adapter_specs, adapters_dir)
    path = resolve_path(base)
    config, _ = check_base(path)
    for _, folder in resolved:
        check_base_matches(folder, SimpleNamespace(fingerprint=fingerprint(config), path=path))
    model = str(path.resolve()) if Path(base).exists() else base  # a hub id stays one: vLLM fetches it itself
    return build_command(
        model, resolved, config=config, served_name=served_name(base), max_model_len=context_length(config), **options
    )


def exec_vllm(command: VllmCommand) -> None:
    """Replace this process with vLLM (signals and exit code are vLLM's own)."""
    import os
    import shutil

    if shutil.which("vllm") is None:
        raise ToolkitError(
            "vLLM is not installed in this environment",
            where="--engine vllm",
            fix="pip install '.[vllm]' (or vLLM in its own environment), or print the command with --dry-run",
        )
    os.execvpe("vllm", command.argv, {**os.environ, **command.env})

"""Hand-off to vLLM: the `vllm serve` command for the same base and adapters, and the checks that make sure
vLLM will really apply our adapters.

vLLM serves Gemma 3 (`Gemma3ForConditionalGeneration`) from the original compressed-tensors checkpoint and
loads PEFT LoRA folders (`--lora-modules name=path`). Its loader maps each tensor name with the model's
`hf_to_vllm_mapper` (`model.language_model.` -> `language_model.model.`, ...) and keeps only modules it knows;
a tensor whose name maps elsewhere is dropped and the adapter then changes nothing: vLLM silently serves the
base. `check_adapter` (toolkit/lora/vllm_check.py, shared with `toolkit export --to vllm`) replays that mapping on
our files and refuses what would be dropped. vLLM itself is not
imported here (it is an optional extra, often in its own environment: it pins its own torch).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from toolkit import constants as C
from toolkit.errors import ToolkitError
from toolkit.lora.vllm_check import AdapterCheck, check_adapter, max_lora_rank, num_layers, vllm_module_name

__all__ = ["AdapterCheck", "VllmCommand", "build_command", "check_adapter", "max_lora_rank", "plan", "vllm_module_name"]


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
    layers = num_layers(config)
    checks = [check_adapter(name, Path(folder), layers) for name, folder in adapters]
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
    from toolkit.base.loader import context_length, served_name
    from toolkit.lora.registry import checked_base, resolve_serving

    base, resolved = resolve_serving(base, adapter_specs, adapters_dir)
    path, config = checked_base(base, [folder for _, folder in resolved])
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

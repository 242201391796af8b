"""`toolkit export ADAPTER --to gguf | merged | vllm`: an adapter folder taken where people run models.

One module per target (export_gguf.py, export_merged.py, and the vLLM check in vllm_check.py); this one resolves
the adapter and its base, says which targets can take it and why not (`problems`), and writes the chosen target
into a staging folder renamed into place (folder.write_dir_atomic): an existing output is replaced only with
`overwrite`, an interrupted export leaves nothing half-written. A target refuses by name what it cannot represent:
it never writes a file that loads and silently does nothing.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError

TARGETS = ("gguf", "merged", "vllm")
DEFAULT_OUT = Path("build/export")
VLLM_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "toolkit.json")


@dataclass
class Exported:
    target: str
    out: Path
    files: list[str]
    lines: list[str]  # what to tell the user: how to load it


def problems(adapter_dir: Path, base: Path, config: dict) -> dict[str, list[str]]:
    """Every target and the reasons it refuses this adapter (an empty list: it can go there)."""
    from toolkit.lora.export_gguf import gguf_problems
    from toolkit.lora.export_merged import merged_problems
    from toolkit.lora.vllm_check import check_adapter, num_layers
    from toolkit.lora.weights import load_lora

    adapter = load_lora(adapter_dir)
    return {
        "gguf": gguf_problems(adapter),
        "merged": merged_problems(adapter, base=base),
        "vllm": check_adapter(adapter_dir.name, adapter_dir, num_layers(config)).problems,
    }


def targets(spec: str, *, base: str | None = None, adapters_dir: str | Path = "adapters") -> dict[str, list[str]]:
    """`toolkit export --check` and `toolkit info ADAPTER`: which targets adapter `spec` can go to and why not."""
    from toolkit.lora.registry import checked_base, resolve_serving

    base, [(_, adapter_dir)] = resolve_serving(base, [spec], adapters_dir)
    return problems(adapter_dir, *checked_base(base, [adapter_dir]))


def target_lines(found: dict[str, list[str]]) -> list[str]:
    return [f"{t}: " + ("ok" if not why else "no: " + "; ".join(why)) for t, why in found.items()]


def _refuse(target: str, name: str, reasons: list[str], fix: str) -> None:
    if reasons:
        raise ToolkitError(f"{name} cannot go to {target}: " + "; ".join(reasons[:4]), where=name, fix=fix)


def _vllm(
    adapter_dir: Path, name: str, base: Path, config: dict, staging: Path, final: Path, max_lora_rank: int | None
) -> list[str]:
    """The adapter folder as vLLM loads it, and the `vllm serve` line. Our tensor names already map onto vLLM's
    modules (checked), so the files are copied as they are."""
    from toolkit.lora.vllm_check import VLLM_LORA_RANKS, check_adapter, num_layers
    from toolkit.lora.vllm_check import max_lora_rank as fitting_rank

    check = check_adapter(name, adapter_dir, num_layers(config))
    _refuse("vllm", name, check.problems, "retrain with lora.target_modules on language-model projections, no DoRA")
    rank = fitting_rank([check.rank])
    if max_lora_rank is not None:
        if max_lora_rank not in VLLM_LORA_RANKS or max_lora_rank < check.rank:
            raise ToolkitError(
                f"--max-lora-rank {max_lora_rank} cannot serve rank {check.rank}",
                where="--max-lora-rank",
                fix=f"use one of {[r for r in VLLM_LORA_RANKS if r >= check.rank]}",
            )
        rank = max_lora_rank
    for f in VLLM_FILES:
        if (adapter_dir / f).is_file():
            shutil.copy2(adapter_dir / f, staging / f)
    argv = ["vllm", "serve", str(base.resolve()), "--enable-lora", "--max-lora-rank", str(rank)]
    argv += ["--lora-modules", f"{name}={final.resolve()}"]  # where the staging folder is renamed to
    script = staging / "vllm-serve.sh"
    script.write_text(f"#!/bin/sh\n# checked by toolkit export: {check.modules} LoRA modules\n{shlex.join(argv)}\n")
    script.chmod(0o755)
    return [f for f in VLLM_FILES if (staging / f).exists()] + ["vllm-serve.sh"]


def export(
    spec: str,
    to: str,
    *,
    out: Path | None = None,
    base: str | None = None,
    overwrite: bool = False,
    adapters_dir: str | Path = "adapters",
    gguf_base: str | None = None,
    dtype: str = "bfloat16",
    max_lora_rank: int | None = None,
    quantize: str | None = None,
    calibration: Path | None = None,
    progress: Callable | None = None,
) -> Exported:
    """Write adapter `spec` (a name under adapters_dir, NAME=PATH or a path) for target `to` into `out`
    (default build/export/<name>-<target>)."""
    from toolkit.lora.folder import write_dir_atomic
    from toolkit.lora.registry import checked_base, resolve_serving
    from toolkit.lora.weights import load_lora

    if to not in TARGETS:
        raise ToolkitError(f"unknown export target {to!r}", where="--to", fix=f"use one of {', '.join(TARGETS)}")
    base, [(name, adapter_dir)] = resolve_serving(base, [spec], adapters_dir)
    base_path, config = checked_base(base, [adapter_dir])
    if quantize not in (None, "gptq") or (quantize and to != "merged"):
        raise ToolkitError(
            f"--quantize {quantize} with --to {to}", where="--quantize", fix="use --to merged --quantize gptq"
        )
    out = Path(out) if out is not None else DEFAULT_OUT / f"{name}-{to}{'-gptq' if quantize else ''}"
    files: list[str] = []
    lines: list[str] = []

    if to == "gguf":
        from toolkit.lora.export_gguf import FIX, gguf_problems, write_gguf

        adapter = load_lora(adapter_dir)
        _refuse("gguf", name, gguf_problems(adapter), FIX)

        def fill(staging: Path) -> None:
            staging.mkdir()
            files.extend(write_gguf(adapter, staging, name=name, base_config=config, gguf_base=gguf_base))

        model = gguf_base if gguf_base and Path(gguf_base).is_file() else "BASE.gguf"
        gguf = out / f"{name}.gguf"
        lines.append(f"llama-server -m {model} --lora {gguf}   (Ollama, llama-cpp-python: {out}/README.md)")
    elif to == "merged":
        from toolkit.lora.export_merged import merged_problems, write_merged

        adapter = load_lora(adapter_dir)
        _refuse(
            "merged", name, merged_problems(adapter, base=base_path), "retrain without DoRA, biases or modules_to_save"
        )

        def fill(staging: Path) -> None:
            staging.mkdir()
            files.extend(
                write_merged(
                    adapter, staging, base=base_path, dtype=dtype, progress=progress,
                    quantize=quantize == "gptq", calibration=calibration,
                )
            )  # fmt: skip

        if quantize:
            lines.append(f"toolkit serve --base {out}   (a 4-bit base like the original: serve, evaluate, train on)")
        else:
            lines.append(f"AutoModelForImageTextToText.from_pretrained({str(out)!r})  (plain transformers, no peft)")
    else:

        def fill(staging: Path) -> None:
            staging.mkdir()
            files.extend(_vllm(adapter_dir, name, base_path, config, staging, out, max_lora_rank))

        lines.append(f"sh {out / 'vllm-serve.sh'}")
    write_dir_atomic(out, fill, overwrite=overwrite, what="export")
    return Exported(to, out, files, lines)

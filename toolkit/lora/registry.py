"""Finding trained adapters and attaching them to a loaded base (chat now; the server later).

A name resolves to `<adapters_dir>/<name>/`; an explicit path is taken as is. Names are plain folder names
(no separators, no leading dot), so a request or flag cannot reach outside the adapters folder. An adapter
whose manifest names another base (by fingerprint) is refused: it would load but compute nonsense.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.lora.folder import read_manifest

ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # and no ".." (checked apart: the pattern stays portable)
_NAME = re.compile(ADAPTER_NAME)


def resolve_adapter(spec: str, adapters_dir: str | Path = "adapters") -> tuple[str, Path]:
    """`NAME`, `NAME=PATH` or `PATH` -> (name, folder); checks the name and that the folder is an adapter."""
    name, sep, path = spec.partition("=")
    if not sep:
        candidate = Path(spec)
        if candidate.is_dir() and (candidate / "adapter_config.json").exists() and ("/" in spec or "\\" in spec):
            name, path = candidate.name, spec
        else:
            name, path = spec, ""
    if not _NAME.match(name) or ".." in name:
        raise ToolkitError(
            f"adapter name {name!r} is not allowed",
            where="--adapter",
            fix="use letters, digits, '.', '_' or '-' (no path separators, no leading dot)",
        )
    folder = Path(path) if path else Path(adapters_dir) / name
    if not (folder / "adapter_config.json").is_file():
        raise ToolkitError(
            f"no adapter at {str(folder)!r} (adapter_config.json missing)",
            where="--adapter",
            fix="train one with `toolkit train RECIPE` or pass NAME=PATH",
        )
    if not (folder / "adapter_model.safetensors").is_file():
        raise ToolkitError(
            f"{folder} has no adapter_model.safetensors (only safetensors weights are loaded)", where="--adapter"
        )
    return name, folder


def resolve_serving(
    base: str | None, specs: list[str], adapters_dir: str | Path = "adapters"
) -> tuple[str, list[tuple[str, Path]]]:
    """The base to serve (given, or the one the first adapter was trained on) and the adapters, checked."""
    resolved = [resolve_adapter(spec, adapters_dir) for spec in specs]
    if len({name for name, _ in resolved}) != len(resolved):
        raise ToolkitError("two adapters have the same name", where="--adapter", fix="use NAME=PATH to rename one")
    if base is None:
        if not resolved:
            raise ToolkitError("no base to serve", where="--base", fix="pass --base DIR (or --adapter NAME)")
        folder = resolved[0][1]
        base = read_manifest(folder).get("base", {}).get("path")
        if not base:
            raise ToolkitError(f"{folder} names no base (toolkit.json)", where="--base", fix="pass --base DIR")
    return str(base), resolved


def checked_base(base: str, folders: list[Path]) -> tuple[Path, dict]:
    """The base's folder and config.json, checked as a Gemma 3 base and matched by fingerprint against every
    adapter folder's manifest, without loading any weight (the vLLM hand-off, the exports)."""
    from types import SimpleNamespace

    from toolkit.base.loader import check_base, fingerprint, resolve_path

    path = resolve_path(base)
    config, _ = check_base(path)
    for folder in folders:
        check_base_matches(folder, SimpleNamespace(fingerprint=fingerprint(config), path=path))
    return path, config


def check_base_matches(folder: Path, base: Any) -> None:
    manifest = read_manifest(folder)
    expected = manifest.get("base", {}).get("fingerprint")
    if expected != base.fingerprint:
        raise ToolkitError(
            f"adapter {folder.name!r} was trained on base {expected} ({manifest.get('base', {}).get('path')}), "
            f"not on the served base {base.fingerprint} ({base.path})",
            where="--adapter",
            fix="serve it with the base it was trained on, or retrain it on this base",
        )


def enable_mixed_adapter_batches() -> None:
    """Shim: peft 0.21's GPTQ LoRA layer (GPTQLoraLinear.forward(x)) takes no `adapter_names`, so peft's
    mixed-adapter batches fail on 4-bit layers. Its parent LoraLayer already implements the per-row logic
    (`_mixed_batch_forward`, which calls base_layer and adds each row's LoRA); route to it when asked."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    if getattr(GPTQLoraLinear.forward, "_toolkit_mixed", False):
        return
    original = GPTQLoraLinear.forward

    def forward(self, x, *args, adapter_names=None, **kwargs):
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, adapter_names=adapter_names)
        return original(self, x)

    forward._toolkit_mixed = True
    GPTQLoraLinear.forward = forward


def attach(base: Any, adapters: list[tuple[str, Path]]) -> Any:
    """The base model with each adapter loaded under its name (peft); the first is active."""
    from peft import PeftModel

    enable_mixed_adapter_batches()
    model = base.model
    for i, (name, folder) in enumerate(adapters):
        check_base_matches(folder, base)
        if i == 0:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    model.eval()
    return model

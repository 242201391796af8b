"""Summary of a base folder read from its config and safetensors headers, without loading the model."""

from __future__ import annotations

import json
from pathlib import Path

from toolkit import constants as C
from toolkit.base import loader as base_mod
from toolkit.base import quant_format
from toolkit.errors import ToolkitError


def _count_params(path: Path) -> tuple[int, int]:
    """(logical parameter count, number of quantised linear layers) from the weight files' headers."""
    from safetensors import safe_open

    total, quantised = 0, 0
    for f in quant_format.weight_files(path):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                if name.endswith(".weight_shape"):  # compressed-tensors: the dense shape is stored
                    out_f, in_f = st.get_tensor(name).tolist()
                    total += out_f * in_f
                    quantised += 1
                elif name.endswith(".qweight"):  # GPTQ: int32 [in/8, out] for 4 bits
                    total += shape[0] * 8 * shape[1]
                    quantised += 1
                elif name.endswith(
                    (".weight_packed", ".weight_scale", ".weight_zero_point", ".scales", ".qzeros", ".g_idx")
                ):
                    continue
                else:
                    n = 1
                    for d in shape:
                        n *= d
                    total += n
    return total, quantised


def describe(path_or_id: str | Path) -> dict:
    """Architecture, size, quantisation, vision, context and special tokens of a 4-bit Gemma 3 base folder."""
    path = base_mod.resolve_path(path_or_id)
    config, spec = base_mod.check_base(path)
    text = config.get("text_config", {})
    params, quantised = _count_params(path)
    tok_cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.exists() else {}
    vocab = {}
    tok_file = path / "tokenizer.json"
    if tok_file.exists():
        tok_json = json.loads(tok_file.read_text())
        vocab = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
        vocab.update(tok_json.get("model", {}).get("vocab", {}) or {})
    names = [C.BOS, C.EOS, C.PAD, C.START_OF_TURN, C.END_OF_TURN, C.START_OF_IMAGE, C.END_OF_IMAGE, C.IMAGE_SOFT_TOKEN]
    return {
        "path": str(path),
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "parameters": params,
        "quantization": {**spec.as_dict(), "quantized_layers": quantised},
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "vocab_size": text.get("vocab_size"),
        "vision": bool(config.get("vision_config")),
        "tokens_per_image": config.get("mm_tokens_per_image"),
        "context_length": base_mod.context_length(config),
        "special_tokens": {n: vocab.get(n) for n in names},
        "chat_template": bool(tok_cfg.get("chat_template")) or (path / "chat_template.jinja").exists(),
        "fingerprint": base_mod.fingerprint(config),
        "built": _built_by_toolkit(path),
    }


def _built_by_toolkit(path: Path) -> dict | None:
    """What `toolkit tiny-base` recorded about a base it built (weights, source, terms, random vision tower)."""
    meta_file = path / "toolkit_tiny_base.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    keep = ("source", "terms", "quantizer")
    extra = {k: meta[k] for k in keep if k in meta}
    return {"weights": meta.get("weights", "random"), "vision_tower": "random", **extra}


def _built_lines(built: dict | None) -> list[str]:
    if not built:
        return []
    if built["weights"] == "random":
        return ["  weights        random (toolkit tiny-base): answers come only from what an adapter learns"]
    q = built.get("quantizer", {})
    return [
        f"  weights        {built.get('source', built['weights'])}; {built.get('terms', '')}",
        f"  quantiser      {q.get('method', '?')} ({q.get('samples', '?')} calibration samples)",
        "  vision tower   RANDOM (toolkit tiny-base): image answers come only from what a LoRA learns",
    ]


def kernel_choice(device: str | None = None, kernel: str = "auto", base: str | Path | None = None) -> dict:
    """The GPTQ kernel and dtype a load on `device` would use, for inference and for training (kernels.py).

    On a CPU auto's training kernel is timed on the base at its first training load (kernel_probe.py): given the
    `base` folder, the timing kept for it on this machine is reported; before one exists, what auto will do.
    """
    from toolkit.base import kernel_probe, kernels

    device = base_mod.pick_device(device)
    if kernel != "auto":
        kernels.get(kernel, device)  # an unknown name is an error; an inference-only one is noted for training
    out: dict = {"device": device}
    for phase in kernels.PHASES:
        if phase == "training" and kernel == "auto" and kernels.device_type(device) == "cpu":
            hit = _kept_timing(base_mod.check_base(base_mod.resolve_path(base))[0]) if base else None
            if hit:
                k = kernels.get(hit[0], device)
                out[phase] = {"kernel": k.name, "layer": k.layer, "dtype": k.dtype, "reason": hit[1]}
            else:
                timed = ", ".join(kernel_probe.CANDIDATES)
                out[phase] = {"note": f"auto: the fastest of {timed}, timed at the first training run on this machine"}
            continue
        try:
            c = kernels.choose(device, phase, kernel)
            out[phase] = {"kernel": c.kernel.name, "layer": c.kernel.layer, "dtype": c.dtype, "reason": c.reason}
        except ToolkitError as exc:  # e.g. an inference-only kernel asked for: training cannot use it
            out[phase] = {"error": exc.what}
    return out


def head_choice(device: str | None, lm_head: str, info: dict) -> dict:
    """The LM head a serving load on `device` would use for this base (kernels.choose_head)."""
    from toolkit.base import kernels

    device = base_mod.pick_device(device)
    choice = kernels.choose_head(device, lm_head, elements=info["vocab_size"] * info["hidden_size"])
    out = {"device": device, "head": choice.name, "reason": choice.reason}
    if choice.name == "int8" and choice.matmul == "auto":
        from toolkit.base.lm_head import auto_kernel

        out["kernel"] = auto_kernel(info["vocab_size"], info["hidden_size"])  # (the head's rows x hidden)
    return out


def _kept_timing(config: dict) -> tuple[str, str] | None:
    """The training kernel kept for this base at this process's thread count, else one kept at another count.

    A multi-process launch's rank 0 times for all its ranks (kernel_probe.fastest_training_kernel) with fewer
    threads than a plain run has, so after such a run the only timing on record is under that count."""
    import torch

    from toolkit.base import kernel_probe

    threads, kept = torch.get_num_threads(), kernel_probe.cached_by_threads(config)
    if threads in kept or not kept:
        return kept.get(threads)
    n, (name, reason) = next(iter(kept.items()))
    timed = f"timed with {n} thread{'s' if n > 1 else ''} per process"
    return name, f"{reason}, {timed}; a run with {threads} times again"


def summary_lines(info: dict) -> list[str]:
    q = info["quantization"]
    specials = ", ".join(f"{k}={v}" for k, v in info["special_tokens"].items())
    return (
        [
            f"{info['path']}",
            f"  architecture   {info['architecture']} ({info['layers']} layers, hidden {info['hidden_size']}, "
            f"vocab {info['vocab_size']})",
            f"  parameters     {info['parameters']:,}",
            f"  quantisation   {q['format']}, {q['bits']}-bit, group size {q['group_size']}, "
            f"{'symmetric' if q['symmetric'] else 'asymmetric'}, {q['quantized_layers']} quantised linear layers",
            f"  vision         {'yes' if info['vision'] else 'no'}"
            + (f" ({info['tokens_per_image']} tokens per image)" if info["vision"] else ""),
            f"  context        {info['context_length']} tokens",
            f"  special tokens {specials}",
            f"  fingerprint    {info['fingerprint']}",
        ]
        + _built_lines(info.get("built"))
        + [
            f"  kernel         {phase} on {k['device']}: "
            + (
                f"{c['kernel']} ({c['layer']}), {c['dtype']}, {c['reason']}"
                if "kernel" in c
                else c.get("error", c.get("note"))
            )
            for k in [info.get("kernel") or {}]
            for phase, c in k.items()
            if phase != "device"
        ]
        + [f"  lm head        serving on {h['device']}: {h['head']}, {h['reason']}" for h in [info.get("lm_head")] if h]
        + [f"  lm head kernel {h['kernel']}" for h in [info.get("lm_head")] if h and "kernel" in h]
    )

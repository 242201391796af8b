"""`toolkit eval`: what to evaluate (rows, base, adapters or a URL), scoring, the gate, the report files."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.eval import evaluate as evaluation
from toolkit.eval import report as eval_report


@dataclass
class EvalResult:
    report: dict
    out_dir: Path
    failures: list[str]


def _file_fingerprint(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_eval(
    recipe: Any,
    *,
    adapters: list[str] | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    mins: list[str] | None = None,
    maxs: list[str] | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> EvalResult:
    """Evaluate the base and adapters (default: the recipe's own, if trained) and write the report files."""
    from toolkit.base.loader import load_processor, prepare_recipe_base
    from toolkit.data.datasets import load_eval_rows
    from toolkit.lora.folder import library_versions, read_manifest
    from toolkit.lora.registry import resolve_adapter

    thresholds = [evaluation.Threshold.parse(t, "min") for t in mins or []]
    thresholds += [evaluation.Threshold.parse(t, "max") for t in maxs or []]
    cfg = recipe.eval
    for t in thresholds:
        t.validate(list(cfg.metrics))
    base_path = prepare_recipe_base(recipe.base)
    rows, data_desc = load_eval_rows(recipe.data, load_processor(base_path), data)
    models: dict[str, dict] = {}

    if url:
        served = evaluation.served_models(url, api_key)
        ids = [m["id"] for m in served]
        base_name = next((m["id"] for m in served if not m.get("parent")), None)
        names = adapters or [n for n in [recipe.adapter_name] if n in ids]
        unknown = [n for n in names if n not in ids]
        if unknown or base_name is None:
            raise ToolkitError(
                f"{url} does not serve {unknown or 'a base model'}", where="--adapter", fix=f"served models: {ids}"
            )
        labels = {"base": base_name, **{n: n for n in names}}
        models = {label: {"served_as": name} for label, name in labels.items()}
        outcome = evaluation.score_http(url, api_key, rows, labels, cfg)
    else:
        from toolkit.base.loader import load_base
        from toolkit.lora.registry import attach

        if adapters:
            resolved = [resolve_adapter(a, recipe.output.dir) for a in adapters]
        else:  # the recipe's own adapter, when it has been trained
            own = Path(recipe.output.dir) / recipe.adapter_name
            resolved = [resolve_adapter(f"{recipe.adapter_name}={own}")] if own.is_dir() else []
        if any(name == "base" for name, _ in resolved):
            raise ToolkitError("an adapter may not be called 'base' here", where="--adapter", fix="use NAME=PATH")
        device = None if recipe.base.device == "auto" else recipe.base.device
        base = load_base(base_path, device=device, kernel=recipe.base.kernel, lm_head=recipe.base.lm_head)
        model = attach(base, resolved) if resolved else base.model
        models["base"] = {"path": str(base.path), "fingerprint": base.fingerprint}
        for name, folder in resolved:
            models[name] = {
                "path": str(folder),
                "fingerprint": _file_fingerprint(folder / "adapter_model.safetensors"),
                "base_fingerprint": read_manifest(folder)["base"]["fingerprint"],
            }
        labels = {"base": None, **{name: name for name, _ in resolved}}
        outcome = evaluation.score_in_process(base, model, rows, labels, cfg)

    gated = [label for label in models if label != "base"] or ["base"]
    failures = evaluation.gate(outcome, thresholds, gated) if thresholds else []
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe.source,
        "mode": "http" if url else "in-process",
        "url": url,
        "data": data_desc,
        "metrics_selected": list(cfg.metrics),
        "max_new_tokens": cfg.max_new_tokens,
        "models": models,
        "metrics": outcome.metrics,
        "thresholds": [{"metric": t.metric, t.kind: t.value, "models": gated} for t in thresholds],
        "failures": failures,
        "passed": not failures,
        "versions": {**library_versions(), "rouge-score": metadata.version("rouge-score")},
    }
    out_dir = Path(out) if out else Path("build") / "eval" / Path(recipe.source).stem
    eval_report.write(out_dir, report, rows, outcome.rows)
    return EvalResult(report, out_dir, failures)

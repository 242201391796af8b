"""`toolkit eval`: what to evaluate (rows, base, adapters or a URL), scoring, the gate, the report files."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.eval import evaluate as evaluation
from toolkit.eval import preference as pair_scoring
from toolkit.eval import report as eval_report


@dataclass
class EvalResult:
    report: dict
    out_dir: Path
    failures: list[str]


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
    reference: str | None = None,
) -> EvalResult:
    """Evaluate the base and adapters (default: the recipe's own, if trained) and write the report files.

    The rows decide what is measured: conversation rows get loss and generation metrics (eval.metrics);
    preference items (load_eval_rows gives them for preference data) get the pair metrics, and DPO's implicit
    rewards against `reference` (an adapter name, or "base"; default: the base when adapters are evaluated); a grpo
    recipe's prompt rows get its rewards of the greedy answers (`reward` and `reward_NAME`).
    """
    from toolkit.base.loader import load_processor, prepare_recipe_base
    from toolkit.data.datasets import load_eval_rows
    from toolkit.lora.folder import library_versions

    thresholds = [evaluation.Threshold.parse(t, "min") for t in mins or []]
    thresholds += [evaluation.Threshold.parse(t, "max") for t in maxs or []]
    cfg = recipe.eval
    grpo = recipe.training.method == "grpo"
    rewards = _rewards(recipe) if grpo else None  # a reward that does not load stops before any model loads
    base_path = prepare_recipe_base(recipe.base)
    rows, data_desc = load_eval_rows(recipe.data, load_processor(base_path), data, prompts=grpo)
    pairs = pair_scoring.is_preference(rows)
    _check_rows_and_reference(reference, pairs, rows)
    if url:
        labels = _served_labels(url, api_key, recipe, adapters, reference)
    else:
        resolved, reference = _local_adapters(recipe, adapters, reference)
        labels = {"base": None, **{name: name for name, _ in resolved}}
    ref = _reference_label(reference, labels) if pairs else None
    selected = _reward_metric_names(rewards) if grpo else list(cfg.metrics)
    for t in thresholds:  # before any model is loaded or asked
        t.validate(selected, preference=pairs, reference=ref is not None)
    if pairs and url:
        pair_scoring.check_http(rows)

    if url:
        models: dict[str, dict] = {label: {"served_as": name} for label, name in labels.items()}
        if pairs:
            outcome = pair_scoring.score_preferences_http(url, api_key, rows, labels, ref, cfg.batch_size)
        elif grpo:
            tokenizer = load_processor(base_path).tokenizer
            outcome = evaluation.score_rewards_http(url, api_key, rows, labels, rewards, cfg, tokenizer)
        else:
            outcome = evaluation.score_http(url, api_key, rows, labels, cfg)
    else:
        base, model, models = _load_models(recipe, base_path, resolved)
        if pairs:
            outcome = pair_scoring.score_preferences_in_process(base, model, rows, labels, ref, cfg.batch_size)
        elif grpo:
            outcome = evaluation.score_rewards_in_process(base, model, rows, labels, rewards, cfg)
        else:
            outcome = evaluation.score_in_process(base, model, rows, labels, cfg)

    gated = (
        [label for label in models if label not in ("base", ref)]
        or [label for label in models if label != "base"]
        or ["base"]
    )
    failures = evaluation.gate(outcome, thresholds, gated) if thresholds else []
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe.source,
        "mode": "http" if url else "in-process",
        "url": url,
        "data": data_desc,
        "scoring": "preference pairs" if pairs else "rewards" if grpo else "conversations",
        "reference": ref,
        "metrics_selected": _pair_metric_names(ref) if pairs else selected,
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


def _rewards(recipe: Any) -> list:
    from toolkit.eval.rewards import build_rewards

    return build_rewards(recipe.training.rewards, Path(recipe.source).parent)


def _reward_metric_names(rewards: list) -> list[str]:
    """A grpo recipe's metrics: `reward` (the weighted sum, as trained) and `reward_NAME` per reward."""
    return ["reward", *[f"reward_{r.name}" for r in rewards]]


def _pair_metric_names(reference: str | None) -> list[str]:
    from toolkit.eval import metrics

    return list(metrics.PREFERENCE_METRICS) + (list(metrics.REWARD_METRICS) if reference else [])


def _check_rows_and_reference(reference: str | None, pairs: bool, rows: list) -> None:
    if pairs and not any(item.paired for item in rows):
        raise ToolkitError(
            "the preference rows hold no pair (a chosen and a rejected answer): nothing to compare",
            where="--data",
            fix="evaluate on paired preference rows (KTO rows label one answer each)",
        )
    if reference is not None and not pairs:
        raise ToolkitError(
            "--reference applies to preference pairs; these rows are conversations",
            where="--reference",
            fix="leave --reference out, or evaluate on preference data",
        )


def _reference_label(reference: str | None, labels: dict) -> str | None:
    """The model label implicit rewards are measured against: as asked, else the base when adapters are
    evaluated (DPO's usual reference), else none."""
    if reference is not None:
        return reference
    return "base" if len(labels) > 1 else None


def _local_adapters(
    recipe: Any, adapters: list[str] | None, reference: str | None
) -> tuple[list[tuple[str, Path]], str | None]:
    """The adapters to load: as asked (default: the recipe's own, when it has been trained) and the reference
    (NAME, NAME=PATH or PATH, scored and reported like the others), and the reference's name."""
    from toolkit.lora.registry import resolve_adapter

    if adapters:
        resolved = [resolve_adapter(a, recipe.output.dir) for a in adapters]
    else:  # the recipe's own adapter, when it has been trained
        own = Path(recipe.output.dir) / recipe.adapter_name
        resolved = [resolve_adapter(f"{recipe.adapter_name}={own}")] if own.is_dir() else []
    if reference not in (None, "base"):
        name, folder = resolve_adapter(reference, recipe.output.dir)
        if name not in [n for n, _ in resolved]:
            resolved.append((name, folder))
        reference = name
    if any(name == "base" for name, _ in resolved):
        raise ToolkitError("an adapter may not be called 'base' here", where="--adapter", fix="use NAME=PATH")
    return resolved, reference


def _served_labels(
    url: str, api_key: str | None, recipe: Any, adapters: list[str] | None, reference: str | None
) -> dict[str, str]:
    """Model label -> served model name: the base, and the adapters asked for (default: the recipe's, if served)."""
    served = evaluation.served_models(url, api_key)
    ids = [m["id"] for m in served]
    base_name = next((m["id"] for m in served if not m.get("parent")), None)
    names = list(adapters or [n for n in [recipe.adapter_name] if n in ids])
    if reference not in (None, "base") and reference not in names:
        names.append(reference)
    unknown = [n for n in names if n not in ids]
    if unknown or base_name is None:
        raise ToolkitError(
            f"{url} does not serve {unknown or 'a base model'}", where="--adapter", fix=f"served models: {ids}"
        )
    return {"base": base_name, **{n: n for n in names}}


def _load_models(recipe: Any, base_path: Path, resolved: list[tuple[str, Path]]) -> tuple[Any, Any, dict]:
    """The base loaded as the recipe says, the model with the adapters attached, and their report entries."""
    from toolkit.base.loader import load_base
    from toolkit.lora.folder import read_manifest, weights_fingerprint
    from toolkit.lora.registry import attach

    device = None if recipe.base.device == "auto" else recipe.base.device
    base = load_base(base_path, device=device, kernel=recipe.base.kernel, lm_head=recipe.base.lm_head)
    model = attach(base, resolved) if resolved else base.model
    models = {"base": {"path": str(base.path), "fingerprint": base.fingerprint}}
    for name, folder in resolved:
        models[name] = {
            "path": str(folder),
            "fingerprint": weights_fingerprint(folder),
            "base_fingerprint": read_manifest(folder)["base"]["fingerprint"],
        }
    return base, model, models

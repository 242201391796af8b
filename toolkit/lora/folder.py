"""An adapter folder: plain PEFT files plus the toolkit's manifest, loss curve, metrics and model card.

    adapter_config.json, adapter_model.safetensors   what peft.PeftModel.from_pretrained and vLLM load
    toolkit.json                                     base fingerprint, resolved recipe, dataset hash, metrics,
                                                     library versions
    metrics.jsonl, loss.png, tensorboard/, README.md training log, loss curve, model card

Written in a temporary folder beside the target and renamed into place, so the name holds either the old
adapter or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

MANIFEST = "toolkit.json"
VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "gptqmodel", "compressed-tensors")


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("gemma3-lora-toolkit", *VERSIONED):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def weights_fingerprint(adapter_dir: str | Path) -> str:
    """sha256 (16 hex digits) of an adapter's weights file: which weights a report or a continued adapter used."""
    import hashlib

    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def read_manifest(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise ToolkitError(f"{path} not found: not an adapter written by toolkit train", where=str(adapter_dir))
    return json.loads(path.read_text())


def _plot(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    accuracy = [(r["step"], r["rewards/accuracies"]) for r in rows if "rewards/accuracies" in r]
    if accuracy:  # the preference methods: how often the chosen answer out-rewards the rejected one
        ax2 = ax.twinx()
        ax2.plot(*zip(*accuracy, strict=True), color="tab:green", label="reward accuracy")
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_ylabel("reward accuracy")
        ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _reward_term(spec: dict) -> str:
    name = spec.get("name") or (spec["path"].split(":")[-1] if spec.get("type") == "function" else spec.get("type"))
    return f"{spec.get('weight', 1.0):g} x {name}"


def _method_line(training: dict) -> str:
    method = training.get("method", "sft")
    if method == "sft":
        return "sft (supervised fine-tuning)"
    beta = training.get("beta")
    settings = {
        "dpo": [f"loss {'+'.join(training.get('loss_type') or ['sigmoid'])}"]
        + ([f"rpo_alpha {training['rpo_alpha']}"] if training.get("rpo_alpha") is not None else []),
        "kto": [
            f"desirable_weight {training.get('desirable_weight')}",
            f"undesirable_weight {training.get('undesirable_weight')}",
        ],
        "simpo": [f"gamma {training.get('gamma')}"],
        "orpo": [],
        "grpo": [
            f"loss {(training.get('loss_type') or ['dapo'])[0]}",
            f"num_generations {training.get('num_generations')}",
            "rewards " + " + ".join(_reward_term(r) for r in training.get("rewards", [])),
        ],
    }[method]
    return ", ".join([method, f"beta {beta if beta is not None else 'default'}", *settings])


def _model_card(name: str, manifest: dict, metrics_table: list[str] | None) -> str:
    m, recipe = manifest["metrics"], manifest["recipe"]
    lines = [
        f"# {name}",
        "",
        f"LoRA adapter for `{manifest['base']['path']}` (4-bit Gemma 3, base fingerprint "
        f"`{manifest['base']['fingerprint']}`), trained with `toolkit train`.",
        "",
        f"- LoRA: r {recipe['lora']['r']}, alpha {recipe['lora']['alpha']}, targets "
        f"{', '.join(recipe['lora']['target_modules'])}",
        f"- Data: {manifest['dataset']['train_rows']} training rows, {manifest['dataset']['eval_rows']} held-out rows "
        f"(sha256 {manifest['dataset']['sha256']})",
        f"- Method: {_method_line(recipe['training'])}",
        f"- Steps: {m['train']['steps']}, final train loss {_fmt(m['train']['train_loss'])}",
        "",
    ]
    if manifest.get("init_adapter"):
        start = manifest["init_adapter"]
        lines[-1:-1] = [
            f"- Started from adapter `{start['name']}` ({start['method']}, weights sha256 {start['fingerprint']}), "
            "which was also the frozen reference"
            if recipe["training"]["method"] in ("dpo", "kto")
            else f"- Started from adapter `{start['name']}` ({start['method']}, weights sha256 {start['fingerprint']})"
        ]
    if metrics_table:  # rendered by the caller (eval owns the table): the folder writer knows no metrics
        lines += [*metrics_table, ""]
    lines += [
        "![loss](loss.png)",
        "",
        "Use:",
        "",
        "    toolkit serve --adapter " + name,
        "",
        "or with plain peft: `PeftModel.from_pretrained(base_model, path)` on the base loaded by "
        "`toolkit.base.loader.load_base`.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class AdapterContents:
    """What goes into an adapter folder. `metrics_table` is the held-out table (markdown lines) for the model card,
    rendered by the caller."""

    model: Any
    recipe: Any
    name: str
    base: Any
    data: Any
    metrics: dict
    run_dir: Path
    metrics_table: list[str] | None = None
    started_from: dict | None = None  # training.init_adapter: name, path, weights' fingerprint, its method


def _fill(staging: Path, contents: AdapterContents) -> None:
    c = contents
    c.model.save_pretrained(str(staging), safe_serialization=True)
    manifest = {
        "name": c.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"path": str(c.base.path), "fingerprint": c.base.fingerprint, "quantization": c.base.spec.as_dict()},
        "recipe": c.recipe.model_dump(mode="json"),
        "dataset": {
            "sha256": c.data.sha256,
            "train_rows": len(c.data.train),
            "eval_rows": len(c.data.eval),
            "skipped": len(c.data.skipped),
            "truncated": len(c.data.truncated),
            "dropped": len(c.data.dropped),
        },
        "metrics": c.metrics,
        "init_adapter": c.started_from,
        "versions": library_versions(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for log in ("metrics.jsonl", "completions.jsonl"):  # completions.jsonl: GRPO's sampled answers and rewards
        if (c.run_dir / log).exists():
            shutil.copy2(c.run_dir / log, staging / log)
    if (c.run_dir / "tensorboard").exists():
        shutil.copytree(c.run_dir / "tensorboard", staging / "tensorboard")
    _plot(staging / "metrics.jsonl", staging / "loss.png")
    (staging / "README.md").write_text(_model_card(c.name, manifest, c.metrics_table))
    if c.data.skipped:
        (staging / "skipped_rows.json").write_text(
            json.dumps([{"where": s.where, "reason": s.reason} for s in c.data.skipped], indent=2) + "\n"
        )


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    return True


def write_dir_atomic(final: Path, fill: Callable[[Path], object], *, overwrite: bool, what: str = "folder") -> Path:
    """Fill a temporary sibling of `final` with `fill(staging)`, then rename it to `final` in one step: an
    interrupted writer leaves no half-written `final` (its staging folder is removed by the next writer once its
    process is gone). An existing `final` is replaced only with `overwrite` (checked first too: an export may take
    minutes) and stays whole until the new one is in place. Adapters and exports are written this way."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)

    def refuse_existing() -> None:
        if final.exists() and not overwrite:
            raise ToolkitError(f"{what} {str(final)!r} already exists", where="output", fix="pass --overwrite")

    refuse_existing()
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        if not _alive(stale.name.rsplit("-", 1)[1]):
            shutil.rmtree(stale, ignore_errors=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fill(staging)  # creates the folder (save_pretrained does)
        refuse_existing()  # made meanwhile by another writer
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the target name was never touched
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_adapter(final: Path, contents: AdapterContents, *, overwrite: bool) -> Path:
    """Assemble the adapter folder in a temporary sibling, then rename it to `final` in one step."""
    return write_dir_atomic(final, lambda staging: _fill(staging, contents), overwrite=overwrite, what="adapter")

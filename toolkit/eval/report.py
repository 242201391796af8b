"""The files and tables of an evaluation: report.json, report.md, answers.jsonl, chart.png, the terminal table.

Nothing here computes a metric; everything is a view of evaluation.Outcome plus the run's description.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.eval.evaluate import last_question, reference
from toolkit.eval.metrics import higher_is_better, is_margin


def table_rows(metrics: dict[str, dict], labels: list[str]) -> list[list[str]]:
    """[metric, value per label, delta vs base per adapter] for every metric, in a stable order."""
    names = list(dict.fromkeys(name for label in labels for name in metrics[label]))
    others = [lab for lab in labels if lab != "base"]
    rows = []
    for name in names:
        values = [metrics[lab].get(name) for lab in labels]
        row = [name] + [_fmt(v) for v in values]
        if "base" in labels:
            b = metrics["base"].get(name)
            row += [_delta(metrics[lab].get(name), b, name) for lab in others]
        rows.append(row)
    return rows


def markdown_table(metrics: dict[str, dict], labels: list[str]) -> list[str]:
    """The metrics table as markdown lines (report.md, the adapter's model card)."""
    head = headers(labels)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in table_rows(metrics, labels)]


def headers(labels: list[str]) -> list[str]:
    others = [lab for lab in labels if lab != "base"]
    return ["metric", *labels, *([f"Δ {lab}" for lab in others] if "base" in labels else [])]


def _fmt(v: float | None, sign: str = "") -> str:
    return "n/a" if v is None else f"{v:{sign}.4f}" if abs(v) < 1e4 else f"{v:{sign}.4g}"


def _delta(v: float | None, b: float | None, name: str) -> str:
    if v is None or b is None:
        return "n/a"
    d = v - b
    better = d > 0 if higher_is_better(name) else d < 0
    return _fmt(d, "+") + (" ✓" if better else "")


def rich_table(title: str, metrics: dict[str, dict], labels: list[str]) -> Any:
    """Rows = metrics, columns = models and each adapter's delta vs the base (✓ where it is better)."""
    from rich.table import Table

    table = Table(title=title, highlight=False)
    for i, h in enumerate(headers(labels)):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(metrics, labels):
        table.add_row(*row)
    return table


def report_table(report: dict) -> Any:
    title = f"eval on {report['data']['rows']} rows of {report['data']['source']}"
    return rich_table(title, report["metrics"], list(report["models"]))


def markdown(report: dict) -> str:
    labels = list(report["models"])
    lines = [
        "# Evaluation report",
        "",
        f"- Data: {report['data']['source']} ({report['data']['rows']} rows, sha256 {report['data']['sha256']})",
        f"- Mode: {report['mode']}" + (f" ({report['url']})" if report.get("url") else ""),
        _scoring_line(report),
    ]
    for label, m in report["models"].items():
        lines.append(f"- {label}: " + ", ".join(f"{k} `{v}`" for k, v in m.items()))
    lines += ["", *markdown_table(report["metrics"], labels)]
    if report["thresholds"]:
        lines += ["", "Gate: " + ("passed" if report["passed"] else "FAILED"), ""]
        lines += [f"- {t}" for t in report["failures"]] or ["- every threshold met"]
    lines += ["", "![chart](chart.png)", ""]
    return "\n".join(lines)


def _scoring_line(report: dict) -> str:
    if report.get("scoring") == "rewards":
        return f"- Scoring: the recipe's rewards of the greedy answer (at most {report['max_new_tokens']} tokens)"
    if report.get("scoring") != "preference pairs":
        return f"- Generation: greedy, at most {report['max_new_tokens']} tokens"
    ref = report.get("reference")
    return "- Scoring: preference pairs, summed log-probability of each answer (teacher-forced)" + (
        f"; implicit rewards against `{ref}`" if ref else ""
    )


def chart(report: dict, png: Path) -> None:
    """Grouped bars, one colour per model: the metrics of 0..1 (generation, pair accuracies), the margins in nats,
    the loss; a panel for each kind the run computed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = list(report["models"])
    metrics = report["metrics"]
    names = list(dict.fromkeys(n for lab in labels for n in metrics[lab]))
    panels = [
        (
            "rewards"
            if report.get("scoring") == "rewards"
            else "accuracies"
            if any(n.startswith(("preference", "reward")) for n in names)
            else "generation metrics",
            [n for n in names if higher_is_better(n) and not is_margin(n)],
        ),
        ("margins (nats)", [n for n in names if is_margin(n)]),
        ("assistant-token loss", [n for n in names if n.startswith("loss")]),
    ]
    panels = [(t, ns) for t, ns in panels if ns]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 + 3 * len(panels), 3.8), dpi=100, squeeze=False)
    width = 0.8 / len(labels)
    for ax, (title, ns) in zip(axes[0], panels, strict=True):
        for k, lab in enumerate(labels):
            xs = [i + k * width for i in range(len(ns))]
            ax.bar(xs, [metrics[lab].get(n) or 0.0 for n in ns], width, label=lab)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(ns))], ns, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(png, metadata={"Software": None})  # no version stamp: reruns give the same bytes
    plt.close(fig)


def _row_fields(item: Any) -> dict:
    """Where an evaluated item comes from, its question (text, images), and a conversation row's reference answer
    (a preference pair has two)."""
    prompt, images = last_question(item)
    if hasattr(item, "chosen"):
        return {"row": item.where, "prompt": prompt, "images": images}
    if item.row.is_prompt:  # the columns its rewards read
        answer = item.row.columns.get("answer")
        fields = {"reference": None if answer is None else str(answer), "columns": item.row.columns}
        return {"row": item.row.where, "prompt": prompt, "images": images, **fields}
    return {"row": item.row.where, "prompt": prompt, "images": images, "reference": reference(item.row)}


def write(out: Path, report: dict, rows: list, per_row: dict[str, list[dict]]) -> None:
    """report.json, report.md, answers.jsonl (one line per row, or preference item, and model) and chart.png
    under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    with open(out / "answers.jsonl", "w") as f:
        for label, scored in per_row.items():
            for r, s in zip(rows, scored, strict=True):
                line = {"model": label, **_row_fields(r), **s}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    chart(report, out / "chart.png")

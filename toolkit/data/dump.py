"""What the model is trained on, made visible: encoded rows as JSON lines, or as text with the trained tokens marked.

Used by `toolkit validate --dump FILE` / `--show N`. Knows the encoded rows (datasets.py) and a tokenizer; it
encodes nothing itself, so what it prints is exactly what training sees. Preference items show and dump each side
(the prompt, then that answer) as training feeds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.data.preference import Preference, prompt_length
from toolkit.data.template import IGNORE

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # around each run of tokens that carries a label (the loss sees it)


def _rows(report: Any):
    for split in ("train", "eval"):
        for item in getattr(report, split):
            yield split, item


def dump_rows(report: Any, path: str | Path) -> int:
    """Write one JSON line per encoded row: split, where (file:row), input_ids, labels (-100: not trained). A
    preference item's line holds `chosen` and `rejected`, each {input_ids, labels} or null (KTO: the other side)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for split, item in _rows(report):
            if isinstance(item, Preference):
                sides = {"chosen": item.chosen, "rejected": item.rejected}
                line = {"split": split, "where": item.where}
                line |= {name: _ids(side.encoded) if side else None for name, side in sides.items()}
            else:
                line = {"split": split, "where": item.row.where, **_ids(item.encoded)}
            f.write(json.dumps(line) + "\n")
            n += 1
    return n


def _ids(enc: Any) -> dict:
    return {"input_ids": enc.input_ids, "labels": enc.labels}


def _squeeze_repeats(pieces: list[str]) -> list[str]:
    """`<image_soft_token>` x 256 reads better as one piece with a count."""
    out: list[str] = []
    count = 0
    for i, piece in enumerate(pieces):
        count += 1
        if i + 1 < len(pieces) and pieces[i + 1] == piece and piece.startswith("<"):
            continue
        out.append(piece if count == 1 else f"{piece}x{count}")
        count = 0
    return out


def render_row(input_ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """The row's text token by token, each run of trained tokens between [[ and ]]."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, label in zip(input_ids, labels, strict=True):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    parts = []
    for trained, ids in runs:
        pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        text = "".join(_squeeze_repeats(pieces))
        parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(parts)


def show_rows(report: Any, tokenizer: Any, n: int) -> list[str]:
    """The first `n` rows (train, then eval), each as a header line and its marked text; a preference item as a
    header, then `chosen:` and `rejected:` each with its whole marked conversation."""
    out = []
    for split, item in _rows(report):
        if len(out) >= n:
            break
        if isinstance(item, Preference):
            out.append(_show_preference(split, item, tokenizer))
            continue
        enc = item.encoded
        header = (
            f"--- {split} {item.row.where}: {len(enc.input_ids)} tokens, {enc.num_label_tokens} trained "
            f"(between {TRAINED_OPEN} {TRAINED_CLOSE})"
        )
        out.append(header + "\n" + render_row(enc.input_ids, enc.labels, tokenizer))
    return out


def _show_preference(split: str, item: Preference, tokenizer: Any) -> str:
    sides = item.sides()
    what = "pair" if item.paired else "desirable answer" if item.chosen else "undesirable answer"
    counts = "; ".join(
        f"{name} {len(side.encoded.input_ids)} tokens, {side.encoded.num_label_tokens} trained" for name, side in sides
    )
    header = (
        f"--- {split} {item.where}: {what}, prompt {prompt_length(sides[0][1].encoded)} tokens; {counts} "
        f"(between {TRAINED_OPEN} {TRAINED_CLOSE})"
    )
    shown = [f"{name}:\n" + render_row(side.encoded.input_ids, side.encoded.labels, tokenizer) for name, side in sides]
    return "\n".join([header, *shown])

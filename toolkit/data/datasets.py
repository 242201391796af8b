"""Datasets of chat rows -> validated, encoded conversations, with every bad row named by file:row.

A row is converted by its format's door (formats.py: messages, sharegpt, alpaca, prompt_completion; `auto`
decides from the first row) into `{"messages": [...]}` (the schema of schema.py) whose last message is the
assistant answer, then checked; errors name the field as the user wrote it. An eval row may add `"regex"` (a
pattern its answer should match). Other top-level keys are ignored. Sources: local .jsonl, .json (a list of
rows), .parquet, a `datasets.save_to_disk` folder, or a hub dataset name. Image paths in rows are relative to
the dataset file. Bad rows raise (on_bad_row: error) or are skipped, counted and listed (skip); over-long rows
follow `overlong` (error / truncate / drop, counted).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.data import formats
from toolkit.data.images import ImagePolicy, load_image
from toolkit.data.schema import FIX_HINT, check_messages, image_urls
from toolkit.data.template import Encoded, encode_conversation
from toolkit.errors import ToolkitError
from toolkit.recipe import DataSection

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Row:
    where: str  # "file:row"
    messages: list
    regex: str | None = None
    base_dir: Path | None = None
    train_from: int = 0  # assistant messages before this index are context only (prompt_completion rows)
    fields: dict[str, str] = field(default_factory=dict)  # schema path -> the field as the user wrote it

    def field_of(self, path: str) -> str:
        """The user's name of a schema field path (`messages[2].role` -> `conversations[2].from`)."""
        return formats.field_of(self.fields, path)


@dataclass
class EncodedRow:
    row: Row
    encoded: Encoded


@dataclass
class Skipped:
    where: str
    reason: str


@dataclass
class DataReport:
    """What `load_data` read: encoded train/eval rows, what was skipped, truncated or dropped, and a hash."""

    train: list[EncodedRow]
    eval: list[EncodedRow]
    skipped: list[Skipped] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    sha256: str = ""
    formats: dict[str, str] = field(default_factory=dict)  # "train" / "eval" -> the rows' format

    def summary(self) -> dict:
        def stats(rows: list[EncodedRow]) -> dict:
            longest = max(rows, key=lambda r: len(r.encoded.input_ids), default=None)
            return {
                "rows": len(rows),
                "tokens": sum(len(r.encoded.input_ids) for r in rows),
                "answer_tokens": sum(r.encoded.num_label_tokens for r in rows),
                "images": sum(r.encoded.num_images for r in rows),
                "longest_row": {"where": longest.row.where, "tokens": len(longest.encoded.input_ids)}
                if longest
                else None,
            }

        return {
            "format": self.formats,
            "train": stats(self.train),
            "eval": stats(self.eval),
            "skipped": len(self.skipped),
            "truncated": len(self.truncated),
            "dropped": len(self.dropped),
            "skipped_rows": [{"where": s.where, "reason": s.reason} for s in self.skipped],
            "sha256": self.sha256,
        }


# ----------------------------------------------------------------------------------------------------- reading


def _drop_nulls(value: Any) -> Any:
    """Arrow-backed rows carry every struct field, None where absent; the schema wants them absent."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def read_raw_rows(source: str, hub_split: str = "train") -> tuple[list[tuple[str, Any]], Path | None]:
    """[(where, raw row)] of a dataset source, and the folder that relative image paths are relative to."""
    path = Path(source).expanduser()
    if path.is_file():
        label = str(path)
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{label}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    rows.append((f"{label}:{n}", ToolkitError(f"not valid JSON ({exc.msg} at column {exc.colno})")))
            return rows, path.parent
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ToolkitError(f"not valid JSON ({exc.msg})", where=f"{label}:{exc.lineno}") from None
            if not isinstance(data, list):
                raise ToolkitError(
                    "a .json dataset must be a list of rows",
                    where=label,
                    fix='write [{"messages": [...]}, ...] or use .jsonl',
                )
            return [(f"{label}:{i}", r) for i, r in enumerate(data, start=1)], path.parent
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return [(f"{label}:{i}", _drop_nulls(r)) for i, r in enumerate(table.to_pylist(), start=1)], path.parent
        raise ToolkitError(
            f"unsupported dataset file type {path.suffix!r}",
            where=label,
            fix="use .jsonl, .json, .parquet or a datasets.save_to_disk folder",
        )
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise ToolkitError(f"not a datasets.save_to_disk folder ({exc})", where=str(path)) from None
        if hasattr(ds, "keys"):  # a DatasetDict: take the requested split
            if hub_split not in ds:
                raise ToolkitError(
                    f"split {hub_split!r} not in {list(ds.keys())}", where=str(path), fix="set data.hub_split"
                )
            ds = ds[hub_split]
        return [(f"{path}:{i}", _drop_nulls(r)) for i, r in enumerate(_plain_rows(ds), start=1)], path.parent
    if path.suffix in _FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise ToolkitError(f"dataset file {source!r} not found", where="data", fix="check the path")
    return _read_hub(source, hub_split), None


def _read_hub(name: str, split: str) -> list[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, gated: all the same user problem
        raise ToolkitError(
            f"dataset {name!r} is not a local file or folder and could not be loaded from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
            where="data",
            fix="check the name and the network, or download it and point at a local file",
        ) from None
    return [(f"{name}[{split}]:{i}", _drop_nulls(r)) for i, r in enumerate(_plain_rows(ds), start=1)]


def _plain_rows(ds: Any) -> list[dict]:
    """A `datasets.Dataset`'s rows as stored: Image features stay {"bytes", "path"} (iterating would decode
    every picture to PIL only for the door to encode it again)."""
    return ds.to_list()


def detect_format(raw_rows: list[tuple[str, Any]], cfg: DataSection) -> str:
    """The recipe's data.format, or (auto) the format the first row's fields say."""
    if cfg.format != "auto":
        return cfg.format
    first = next(((w, r) for w, r in raw_rows if isinstance(r, dict)), None)
    if first is None:
        return "messages"  # no object row at all: every row fails with the messages form's error
    fmt = formats.detect_format(first[1], cfg.columns)
    if fmt is None:
        raise ToolkitError(
            f"cannot tell the rows' format from the first row's fields {sorted(first[1])[:8]}",
            where=first[0],
            fix="set data.format (messages, sharegpt, alpaca or prompt_completion) and data.columns for other "
            "field names; docs/DATA.md shows each format",
        )
    return fmt


def parse_row(where: str, raw: Any, base_dir: Path | None, cfg: DataSection, fmt: str = "messages") -> Row:
    """Convert one raw row through its format's door, then check it against the message schema."""
    if isinstance(raw, ToolkitError):
        raise ToolkitError(raw.what, where=where)
    columns, fix = cfg.columns, FIX_HINT if fmt == "messages" else _FIX_FORMAT.format(fmt=fmt)
    if fmt == "messages" and (not isinstance(raw, dict) or columns.get("messages", "messages") not in raw):
        name = columns.get("messages", "messages")
        raise ToolkitError(
            f'row must be an object with a "{name}" list', where=where, fix=f'write {{"{name}": [...]}} per row'
        )
    if not isinstance(raw, dict):
        raise ToolkitError(f"row must be an object (a {fmt} row)", where=where, fix=fix)
    try:
        converted = formats.convert_row(raw, fmt, columns, cfg.roles)
    except ToolkitError as err:
        raise ToolkitError(err.what, where=where, fix=err.fix or fix) from None
    messages, problems = check_messages(converted.messages, purpose="train", max_images=cfg.max_images_per_conversation)
    if problems:
        text = "; ".join(f"{converted.field_of(p.path)}: {p.message}" for p in problems)
        raise ToolkitError(text, where=where, fix=fix)
    regex_field = columns.get("regex", "regex")
    regex = raw.get(regex_field)
    if regex is not None:
        try:
            re.compile(regex)
        except (re.error, TypeError) as exc:
            raise ToolkitError(f"regex is not a valid pattern ({exc})", where=f"{where}: {regex_field}") from None
    # keep only what later errors can name (image loading, encoding): a field map per message of a large
    # dataset would cost more memory than its text
    keep = {"messages", *(path for path, _ in image_urls(messages))}
    fields = {k: v for k, v in converted.fields.items() if k in keep and k != v}
    return Row(where, messages, regex, base_dir, converted.train_from, fields)


_FIX_FORMAT = (
    "see docs/DATA.md for the {fmt} row shape; data.columns and data.roles map other field and role names, "
    "data.format sets the format"
)


def read_rows(source: str, cfg: DataSection, skipped: list[Skipped]) -> tuple[str, list[Row]]:
    """(format, rows) of a source; bad rows raise or are skipped into `skipped` (data.on_bad_row)."""
    raw_rows, base_dir = read_raw_rows(source, cfg.hub_split)
    fmt = detect_format(raw_rows, cfg)
    rows = []
    for where, raw in raw_rows:
        try:
            rows.append(parse_row(where, raw, base_dir, cfg, fmt))
        except ToolkitError as err:
            if cfg.on_bad_row == "error":
                raise
            skipped.append(Skipped(err.where or where, err.what))
    return fmt, rows


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded train/eval split: the same rows, fraction and seed always give the same split."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _hash_rows(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([m.model_dump(exclude_none=True) for m in r.messages], sort_keys=True).encode())
        if r.train_from:  # the same messages with fewer trained answers are different training data
            h.update(f"train_from={r.train_from}".encode())
    return h.hexdigest()


def encode_rows(rows: list[Row], processor: Any, cfg: DataSection, report: DataReport, desc: str) -> list[EncodedRow]:
    from tqdm.auto import tqdm

    policy = ImagePolicy(
        max_bytes=cfg.max_image_bytes,
        max_pixels=cfg.max_image_pixels,
        timeout_s=cfg.image_timeout_s,
        allow_private_urls=True,
    )
    out = []
    for row in tqdm(rows, desc=desc, unit="row", disable=len(rows) < 50, leave=False):
        try:
            images = [
                load_image(url, base_dir=row.base_dir, policy=policy, where=f"{row.where}: {row.field_of(path)}")
                for path, url in image_urls(row.messages)
            ]
            encoded = encode_conversation(
                processor,
                row.messages,
                images,
                max_len=cfg.max_seq_len,
                overlong=cfg.overlong,
                train_from=row.train_from,
            )
        except ToolkitError as err:
            inner = row.field_of(err.where) if err.where else err.where
            where = err.where if err.where and err.where.startswith(row.where) else f"{row.where}: {inner}"
            if cfg.on_bad_row == "error":
                raise ToolkitError(err.what, where=where, fix=err.fix) from None
            report.skipped.append(Skipped(where, err.what))
            continue
        if encoded is None:
            report.dropped.append(row.where)
            continue
        if encoded.truncated:
            report.truncated.append(row.where)
        out.append(EncodedRow(row, encoded))
    return out


def load_data(cfg: DataSection, processor: Any) -> DataReport:
    """Read, validate, split and encode the recipe's data (train and eval)."""
    report = DataReport(train=[], eval=[])
    report.formats["train"], train_rows = read_rows(cfg.train, cfg, report.skipped)
    if cfg.eval:
        report.formats["eval"], eval_rows = read_rows(cfg.eval, cfg, report.skipped)
    else:
        train_rows, eval_rows = split_rows(train_rows, cfg.eval_fraction, cfg.split_seed)
    report.train = encode_rows(train_rows, processor, cfg, report, "encoding train rows")
    report.eval = encode_rows(eval_rows, processor, cfg, report, "encoding eval rows")
    if not report.train:
        raise ToolkitError(
            "no usable training rows",
            where=cfg.train,
            fix="check the file (skipped rows are listed by `toolkit validate`)",
        )
    report.sha256 = _hash_rows([r.row for r in report.train + report.eval])[:16]
    return report


def load_recipe_data(recipe: Any) -> DataReport:
    """Read and encode a recipe's whole dataset with its base's processor (no model weights are loaded)."""
    from toolkit.base.loader import load_processor, prepare_recipe_base

    return load_data(recipe.data, load_processor(prepare_recipe_base(recipe.base)))


def load_eval_rows(cfg: DataSection, processor: Any, source: str | None = None) -> tuple[list[EncodedRow], dict]:
    """The rows to evaluate on: `source` (a file of rows), else the recipe's eval file, else its seeded held-out
    split of the training rows. A bad row always stops with file:row: an evaluation that silently skips rows
    could pass a gate it should fail. Returns the rows and a description (source, count, hash)."""
    strict = cfg.model_copy(update={"on_bad_row": "error"})
    report = DataReport(train=[], eval=[])
    if source or cfg.eval:
        label = source or cfg.eval
        fmt, rows = read_rows(label, strict, report.skipped)
    else:
        label = f"{cfg.train} (held-out split: {cfg.eval_fraction} with seed {cfg.split_seed})"
        fmt, rows = read_rows(cfg.train, strict, report.skipped)
        _, rows = split_rows(rows, cfg.eval_fraction, cfg.split_seed)
    encoded = encode_rows(rows, processor, strict, report, "encoding eval rows")
    if not encoded:
        raise ToolkitError("no rows to evaluate", where=label, fix="give a file of rows with --data")
    return encoded, {
        "source": label,
        "format": fmt,
        "rows": len(encoded),
        "sha256": _hash_rows(rows)[:16],
        "dropped": report.dropped,
    }

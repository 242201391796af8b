"""Datasets of chat rows -> validated, encoded conversations (or preference items), bad rows named by file:row.

A row is converted by its format's door (formats.py: messages, sharegpt, alpaca, prompt_completion; `auto`
decides from the first row) into `{"messages": [...]}` (the schema of schema.py) whose last message is the
assistant answer, then checked; errors name the field as the user wrote it. An eval row may add `"regex"` (a
pattern its answer should match). Other top-level keys are ignored, except in prompt rows (GRPO: `load_data(...,
"grpo")`), where they are the row's columns for the reward functions and the conversation ends with the user.
Sources: local .jsonl, .json (a list of rows), .parquet, a `datasets.save_to_disk` folder, or a hub dataset
name. Image paths in rows are relative to the dataset file. Bad rows raise (on_bad_row: error) or are skipped,
counted and listed (skip); over-long rows follow `overlong` (error / truncate / drop, counted).

Preference rows (`preference`: pairs; `kto`: answers labelled true / false) come through preference.py's door:
each side is a conversation (the prompt, then that answer) checked and encoded like any row, and an item is a
`Preference`. The training method says which rows it takes (`load_data(..., method)`): sft conversations;
dpo, orpo and simpo pairs; kto labelled answers, or pairs unpaired (chosen desirable, rejected undesirable).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from toolkit.data import formats, preference
from toolkit.data.formats import CONVERSATION_FORMATS, Converted, EncodedRow, Row
from toolkit.data.images import ImagePolicy, load_image
from toolkit.data.preference import Preference, RowPair
from toolkit.data.schema import FIX_HINT, check_messages, image_urls
from toolkit.data.template import IGNORE, Encoded, encode_conversation, encode_prompt
from toolkit.errors import ToolkitError, brief
from toolkit.recipe import DataSection

# Row and EncodedRow live in formats.py (preference.py's items hold them, and this module imports preference.py);
# callers import them from here as before

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
Item = TypeVar("Item")


@dataclass
class Skipped:
    where: str
    reason: str


@dataclass
class DataReport:
    """What `load_data` read: encoded train/eval items, what was skipped, truncated or dropped, and a hash.

    `kind` says what the items are: conversations (EncodedRow, for sft), pairs (Preference with both sides, for
    dpo / orpo / simpo) or unpaired (Preference with one side: chosen desirable, rejected undesirable, for kto).
    """

    train: list  # list[EncodedRow] for conversations, list[Preference] for pairs and unpaired answers
    eval: list
    skipped: list[Skipped] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    sha256: str = ""
    formats: dict[str, str] = field(default_factory=dict)  # "train" / "eval" -> the rows' format
    kind: str = "conversations"  # one of preference.KINDS

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

        def split(items: list) -> dict:
            return stats(items) if self.kind in ("conversations", "prompts") else preference.stats(items, self.kind)

        return {
            "format": self.formats,
            "kind": self.kind,
            "train": split(self.train),
            "eval": split(self.eval),
            "skipped": len(self.skipped),
            "truncated": len(self.truncated),
            "dropped": len(self.dropped),
            "skipped_rows": [{"where": s.where, "reason": s.reason} for s in self.skipped],
            "sha256": self.sha256,
        }


def summary_lines(summary: dict, *, detected: bool = True) -> list[str]:
    """What `toolkit validate` prints of a `DataReport.summary()` under its first line: the formats (`detected`:
    data.format was auto), each split, then skipped / truncated / dropped and every skipped row."""
    kind = summary.get("kind", "conversations")
    how = "detected from the first row" if detected else "data.format"
    unpaired = ", pairs unpaired for kto" if kind == "unpaired" and "preference" in summary["format"].values() else ""
    lines = ["  format " + ", ".join(f"{k} {v}" for k, v in summary["format"].items()) + f" ({how}){unpaired}"]
    lines += [f"  {split:5} {split_line(summary[split], kind)}" for split in ("train", "eval")]
    lines.append(f"  skipped {summary['skipped']}, truncated {summary['truncated']}, dropped {summary['dropped']}")
    lines += [f"  skipped {item['where']}: {item['reason']}" for item in summary["skipped_rows"]]
    return lines


def split_line(stats: dict, kind: str = "conversations") -> str:
    """One split of a summary in words (`4 rows, 160 tokens (12 answer tokens), 3 images, longest ...`)."""
    s, longest = stats, ""
    if s["rows"]:
        side = f", {s['longest_row']['side']}" if "side" in s["longest_row"] else ""
        longest = f", longest {s['longest_row']['tokens']} tokens ({s['longest_row']['where']}{side})"
    if kind == "pairs":
        answers = f"{s['chosen_tokens']} chosen and {s['rejected_tokens']} rejected answer tokens"
        counted = f"{s['rows']} pairs, {s['tokens']} tokens ({s['prompt_tokens']} prompt, {answers})"
    elif kind == "unpaired":
        labels = f"{s['desirable']} desirable, {s['undesirable']} undesirable"
        counted = f"{s['rows']} answers ({labels}), {s['tokens']} tokens ({s['prompt_tokens']} prompt, "
        counted += f"{s['answer_tokens']} answer tokens)"
    elif kind == "prompts":
        counted = f"{s['rows']} prompts, {s['tokens']} prompt tokens"
    else:
        counted = f"{s['rows']} rows, {s['tokens']} tokens ({s['answer_tokens']} answer tokens)"
    return f"{counted}, {s['images']} images{longest}"


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
            f"dataset {name!r} is not a local file or folder and could not be loaded from the hub ({brief(exc, 160)})",
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
            fix="set data.format (messages, sharegpt, alpaca, prompt_completion, preference or kto) and "
            "data.columns for other field names; docs/DATA.md shows each format",
        )
    return fmt


def _kept_fields(converted: Converted, messages: list) -> dict[str, str]:
    """The field map a Row keeps: only what later errors can name (image loading, encoding); a field map per
    message of a large dataset would cost more memory than its text."""
    keep = {"messages", *(path for path, _ in image_urls(messages))}
    return {k: v for k, v in converted.fields.items() if k in keep and k != v}


def parse_row(
    where: str, raw: Any, base_dir: Path | None, cfg: DataSection, fmt: str = "messages", prompts: bool = False
) -> Row:
    """Convert one raw row through its format's door, then check it against the message schema. `prompts` (grpo):
    the conversation is a prompt, ending with the user's turn, and the row's other fields are kept as columns."""
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
        converted = formats.convert_row(raw, fmt, columns, cfg.roles, prompt_only=prompts)
    except ToolkitError as err:
        raise ToolkitError(err.what, where=where, fix=err.fix or fix) from None
    purpose = "request" if prompts else "train"
    messages, problems = check_messages(converted.messages, purpose=purpose, max_images=cfg.max_images_per_conversation)
    if problems:
        text = "; ".join(f"{converted.field_of(p.path)}: {p.message}" for p in problems)
        raise ToolkitError(text, where=where, fix=_FIX_PROMPT if prompts else fix)
    regex_field = columns.get("regex", "regex")
    regex = raw.get(regex_field)
    if regex is not None:
        try:
            re.compile(regex)
        except (re.error, TypeError) as exc:
            raise ToolkitError(f"regex is not a valid pattern ({exc})", where=f"{where}: {regex_field}") from None
    row = Row(where, messages, regex, base_dir, converted.train_from, _kept_fields(converted, messages))
    if prompts:
        row.columns, row.text_prompt = formats.extra_columns(raw, fmt, columns), converted.text_prompt
    return row


def parse_pair(where: str, raw: Any, base_dir: Path | None, cfg: DataSection, fmt: str) -> RowPair:
    """Convert one preference or KTO row through preference.py's door; check each side (the prompt, then that
    answer) against the message schema, and a pair's answers against each other."""
    if isinstance(raw, ToolkitError):
        raise ToolkitError(raw.what, where=where)
    fix = _FIX_FORMAT.format(fmt=fmt)
    if not isinstance(raw, dict):
        raise ToolkitError(f"row must be an object (a {fmt} row)", where=where, fix=fix)
    try:
        converted = preference.convert_pair(raw, fmt, cfg.columns, cfg.roles)
    except ToolkitError as err:
        raise ToolkitError(err.what, where=where, fix=err.fix or fix) from None
    rows, problems = {}, {}  # problems as a dict: the prompt's own show up on both sides, said once
    for side, conversation in converted.sides():
        messages, found = check_messages(
            conversation.messages, purpose="train", max_images=cfg.max_images_per_conversation
        )
        problems.update(dict.fromkeys(f"{conversation.field_of(p.path)}: {p.message}" for p in found))
        fields = _kept_fields(conversation, messages)
        rows[side] = Row(where, messages, None, base_dir, conversation.train_from, fields)
    if problems:
        raise ToolkitError("; ".join(problems), where=where, fix=fix)
    pair = RowPair(where, rows.get("chosen"), rows.get("rejected"))
    if pair.chosen and pair.rejected and preference.same_answers(pair.chosen, pair.rejected):
        names = converted.answer_fields
        what = f"{names['rejected']}: equals {names['chosen']}; a pair needs two different answers"
        raise ToolkitError(what, where=where, fix="drop the row, or give the rejected answer it was compared with")
    return pair


_FIX_PROMPT = (
    'a grpo row is a prompt: {"prompt": "..."} or messages ending with the user\'s turn (the model writes the '
    "answer); put reference answers in a column such as `answer` for the rewards (docs/DATA.md)"
)
_FIX_FORMAT = (
    "see docs/DATA.md for the {fmt} row shape; data.columns and data.roles map other field and role names, "
    "data.format sets the format"
)


def read_rows(
    source: str,
    cfg: DataSection,
    skipped: list[Skipped],
    accept: Callable[[str], object] | None = None,
    prompts: bool = False,
) -> tuple[str, list]:
    """(format, rows) of a source: Rows, or RowPairs for preference / kto rows; bad rows raise or are skipped into
    `skipped` (data.on_bad_row). `accept(format)` may refuse the format before a row is parsed. `prompts`: the
    rows are GRPO's prompts (parse_row)."""
    raw_rows, base_dir = read_raw_rows(source, cfg.hub_split)
    fmt = detect_format(raw_rows, cfg)
    if accept is not None:
        accept(fmt)
    rows = []
    for where, raw in raw_rows:
        try:
            if fmt in CONVERSATION_FORMATS:
                rows.append(parse_row(where, raw, base_dir, cfg, fmt, prompts))
            else:
                rows.append(parse_pair(where, raw, base_dir, cfg, fmt))
        except ToolkitError as err:
            if cfg.on_bad_row == "error":
                raise
            skipped.append(Skipped(err.where or where, err.what))
    return fmt, rows


def split_rows(rows: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Seeded train/eval split: the same rows (or pairs), fraction and seed always give the same split."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _sides(item: Any) -> list[tuple[str, Row]]:
    """The conversations of a Row, EncodedRow, RowPair or Preference, each with its side ("" for plain rows)."""
    if isinstance(item, Row):
        return [("", item)]
    if isinstance(item, EncodedRow):
        return [("", item.row)]
    return [(side, s if isinstance(s, Row) else s.row) for side, s in item.sides()]


def _hash_rows(items: list) -> str:
    """sha256 of what trains: every conversation, how much of it is context, and (pairs, KTO) which side it is."""
    h = hashlib.sha256()
    for item in items:
        for side, r in _sides(item):
            if side:  # plain rows hash as they always did
                h.update(f"side={side}".encode())
            h.update(json.dumps([m.model_dump(exclude_none=True) for m in r.messages], sort_keys=True).encode())
            if r.columns:  # what a prompt's rewards read is part of the data
                h.update(json.dumps(r.columns, sort_keys=True, default=str).encode())
            if r.train_from:  # the same messages with fewer trained answers are different training data
                h.update(f"train_from={r.train_from}".encode())
    return h.hexdigest()


def _image_policy(cfg: DataSection) -> ImagePolicy:
    return ImagePolicy(
        max_bytes=cfg.max_image_bytes,
        max_pixels=cfg.max_image_pixels,
        timeout_s=cfg.image_timeout_s,
        allow_private_urls=True,
    )


def _encode_row(
    row: Row, processor: Any, cfg: DataSection, policy: ImagePolicy, prompt: bool = False
) -> Encoded | None:
    """One conversation's tokens and labels (None: dropped as over-long); errors name file:row and the field.
    `prompt`: a GRPO prompt, encoded as the engine is fed it (template + generation prompt, no labels)."""
    try:
        images = [
            load_image(url, base_dir=row.base_dir, policy=policy, where=f"{row.where}: {row.field_of(path)}")
            for path, url in image_urls(row.messages)
        ]
        if prompt:
            return _encode_prompt(processor, row.messages, images, cfg)
        return encode_conversation(
            processor, row.messages, images, max_len=cfg.max_seq_len, overlong=cfg.overlong, train_from=row.train_from
        )
    except ToolkitError as err:
        inner = row.field_of(err.where) if err.where else err.where
        where = err.where if err.where and err.where.startswith(row.where) else f"{row.where}: {inner}"
        raise ToolkitError(err.what, where=where, fix=err.fix) from None


def _encode_prompt(processor: Any, messages: list, images: list, cfg: DataSection) -> Encoded | None:
    """A GRPO prompt's tokens; over max_seq_len: error or drop (a prompt cut short would lose its question, so
    truncate is refused)."""
    encoded = encode_prompt(processor, messages, images)
    encoded.labels = [IGNORE] * len(encoded.labels)  # earlier answers in a prompt are context: GRPO trains its own
    if len(encoded.input_ids) <= cfg.max_seq_len:
        return encoded
    if cfg.overlong == "drop":
        return None
    raise ToolkitError(
        f"prompt is {len(encoded.input_ids)} tokens, over max_seq_len {cfg.max_seq_len}"
        + (" (a prompt is never truncated: its end is the question)" if cfg.overlong == "truncate" else ""),
        where="messages",
        fix="raise data.max_seq_len, or set data.overlong: drop",
    )


def encode_rows(
    rows: list[Row], processor: Any, cfg: DataSection, report: DataReport, desc: str, prompts: bool = False
) -> list[EncodedRow]:
    from tqdm.auto import tqdm

    policy = _image_policy(cfg)
    out = []
    for row in tqdm(rows, desc=desc, unit="row", disable=len(rows) < 50, leave=False):
        try:
            encoded = _encode_row(row, processor, cfg, policy, prompts)
        except ToolkitError as err:
            if cfg.on_bad_row == "error":
                raise
            report.skipped.append(Skipped(err.where, err.what))
            continue
        if encoded is None:
            report.dropped.append(row.where)
            continue
        if encoded.truncated:
            report.truncated.append(row.where)
        out.append(EncodedRow(row, encoded))
    return out


def encode_pairs(
    pairs: list[RowPair], processor: Any, cfg: DataSection, report: DataReport, desc: str
) -> list[Preference]:
    """Encode each side of each pair (or KTO answer) as SFT would encode that conversation, labels on its answer
    only. data.overlong holds per side: a pair with a side over max_seq_len errors, is dropped or is truncated."""
    from tqdm.auto import tqdm

    policy = _image_policy(cfg)
    out = []
    for pair in tqdm(pairs, desc=desc, unit="pair", disable=len(pairs) < 50, leave=False):
        try:
            encoded = {side: _encode_row(row, processor, cfg, policy) for side, row in pair.sides()}
        except ToolkitError as err:
            if cfg.on_bad_row == "error":
                raise
            report.skipped.append(Skipped(err.where, err.what))
            continue
        if any(e is None for e in encoded.values()):
            report.dropped.append(pair.where)
            continue
        if any(e.truncated for e in encoded.values()):
            report.truncated.append(pair.where)
        chosen = EncodedRow(pair.chosen, encoded["chosen"]) if pair.chosen else None
        rejected = EncodedRow(pair.rejected, encoded["rejected"]) if pair.rejected else None
        item = Preference(pair.where, chosen, rejected)
        preference.check_same_prompt(item)
        out.append(item)
    return out


def _encode(rows: list, processor: Any, cfg: DataSection, report: DataReport, kind: str, desc: str) -> list:
    if kind in ("conversations", "prompts"):
        return encode_rows(rows, processor, cfg, report, desc, prompts=kind == "prompts")
    items = encode_pairs(rows, processor, cfg, report, desc)
    return preference.unpair(items) if kind == "unpaired" else items


def load_data(cfg: DataSection, processor: Any, method: str = "sft") -> DataReport:
    """Read, validate, split and encode the recipe's data (train and eval) for training.method `method`: sft
    takes conversations (EncodedRow items), dpo / orpo / simpo pairs and kto labelled answers (Preference items;
    pairs are unpaired for kto after the split, so both answers of a pair stay on one side of it). Rows the method
    cannot train on stop with a ToolkitError before they are read."""
    report = DataReport(train=[], eval=[])
    prompts = method == "grpo"
    report.formats["train"], train_rows = read_rows(cfg.train, cfg, report.skipped, _accept(method, cfg.train), prompts)
    report.kind = preference.data_kind(method, report.formats["train"], cfg.train)  # the eval file's is the same
    if cfg.eval:
        report.formats["eval"], eval_rows = read_rows(cfg.eval, cfg, report.skipped, _accept(method, cfg.eval), prompts)
    else:
        train_rows, eval_rows = split_rows(train_rows, cfg.eval_fraction, cfg.split_seed)
    report.train = _encode(train_rows, processor, cfg, report, report.kind, "encoding train rows")
    report.eval = _encode(eval_rows, processor, cfg, report, report.kind, "encoding eval rows")
    if not report.train:
        raise ToolkitError(
            "no usable training rows",
            where=cfg.train,
            fix="check the file (skipped rows are listed by `toolkit validate`)",
        )
    report.sha256 = _hash_rows(report.train + report.eval)[:16]
    return report


def _accept(method: str, source: str) -> Callable[[str], str]:
    return lambda fmt: preference.data_kind(method, fmt, source)


def load_recipe_data(recipe: Any) -> DataReport:
    """Read and encode a recipe's whole dataset with its base's processor (no model weights are loaded), for its
    training method."""
    from toolkit.base.loader import load_processor, prepare_recipe_base

    return load_data(recipe.data, load_processor(prepare_recipe_base(recipe.base)), recipe.training.method)


def load_eval_rows(
    cfg: DataSection, processor: Any, source: str | None = None, prompts: bool = False
) -> tuple[list, dict]:
    """The rows to evaluate on: `source` (a file of rows), else the recipe's eval file, else its seeded held-out
    split of the training rows. A bad row always stops with file:row: an evaluation that silently skips rows
    could pass a gate it should fail. Returns the items and a description (source, format, kind, count, hash):
    EncodedRows for conversations, Preference pairs (both sides) for preference rows; KTO rows are refused, since
    preference evaluation compares the two answers of a pair. `prompts` (a grpo recipe): prompt rows, answered and
    scored by the recipe's rewards."""
    strict = cfg.model_copy(update={"on_bad_row": "error"})
    report = DataReport(train=[], eval=[])
    accept = (lambda src: _accept("grpo", src)) if prompts else _eval_accept
    if source or cfg.eval:
        label = source or cfg.eval
        fmt, rows = read_rows(label, strict, report.skipped, accept(label), prompts)
    else:
        label = f"{cfg.train} (held-out split: {cfg.eval_fraction} with seed {cfg.split_seed})"
        fmt, rows = read_rows(cfg.train, strict, report.skipped, accept(cfg.train), prompts)
        _, rows = split_rows(rows, cfg.eval_fraction, cfg.split_seed)
    kind = "prompts" if prompts else "conversations" if fmt in CONVERSATION_FORMATS else "pairs"
    encoded = _encode(rows, processor, strict, report, kind, "encoding eval rows")
    if not encoded:
        raise ToolkitError("no rows to evaluate", where=label, fix="give a file of rows with --data")
    return encoded, {
        "source": label,
        "format": fmt,
        "kind": kind,
        "rows": len(encoded),
        "sha256": _hash_rows(rows)[:16],
        "dropped": report.dropped,
    }


def _eval_accept(source: str) -> Callable[[str], None]:
    def accept(fmt: str) -> None:
        if fmt == "kto":
            raise ToolkitError(
                "preference evaluation needs pairs (a chosen and a rejected answer to one prompt); these are kto "
                "rows (one answer labelled true or false)",
                where=source,
                fix=f"evaluate on pairs: {preference.SHAPES} ({preference.DOCS})",
            )

    return accept

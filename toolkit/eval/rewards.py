"""The rewards of a GRPO recipe (`training.rewards`): built-ins and your own Python functions, one code path.

Every reward is a plain function with TRL's reward signature, `fn(prompts=..., completions=..., completion_ids=...,
**columns) -> list[float | None]`: one value per completion, the row's extra columns passed as keyword lists aligned
with the completions, None where the reward does not apply to a row (TRL counts it as NaN and skips it in the sum).
The built-ins score 1.0 or 0.0 (length: between 0 and 1), and None where the row lacks the column they read:

exact:       the answer equals the row's `column` (default `answer`) after stripping whitespace (metrics.exact_match).
contains:    the row's `column` (default `answer`) occurs in the answer, case-insensitive (metrics.contains).
regex:       `pattern` matches the answer (re.search), or with `column` instead, the row's own pattern does.
json_schema: the answer is JSON (stripped; or the inside of the one fenced ``` / ```json block the whole answer is)
             and valid against the row's JSON schema in `column` (default `schema`): a JSON object or a JSON string.
             An answer that is not JSON scores 0.0. $refs to the network are not fetched.
length:      1 - |n - target| / target, at least 0, where n is the completion's token count without its trailing
             stop token (<eos> or <end_of_turn>): 1.0 at `target` tokens, 0.0 at none or at twice as many.
function:    `path: file.py:name`, your function (file relative to the recipe), imported once per run.

The rewards live under eval/ rather than train/ because both the GRPO trainer and `toolkit eval` on a GRPO recipe
score with them: training may import eval, eval never imports train (pyproject.toml's import layers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import numbers
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.constants import STOP_TOKEN_IDS
from toolkit.data.schema import text_of
from toolkit.errors import ToolkitError, first_line
from toolkit.eval import metrics

SIGNATURE = "def NAME(prompts, completions, completion_ids, **kwargs) -> list[float | None]"
_FENCED = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)
_SHOWN_ROWS = 5  # rows named in an error about a whole batch


@dataclass
class Reward:
    name: str  # its metric name, unique among the recipe's rewards
    weight: float
    fn: Callable[..., list]  # TRL's reward signature
    where: str  # "training.rewards[i]"


def build_rewards(specs: list, recipe_dir: Path) -> list[Reward]:
    """Every reward of the recipe (RewardSpecs) loaded: user functions imported from their file, relative to
    `recipe_dir`. Names default to the type or the function's name; a repeated one gets _2, _3 (metric names)."""
    rewards: list[Reward] = []
    used: set[str] = set()
    modules: dict[Path, Any] = {}  # two rewards from one file share one import (and its module-level state)
    for i, spec in enumerate(specs):
        where = f"training.rewards[{i}]"
        if spec.type == "function":
            fn = _load_function(spec.path, Path(recipe_dir), f"{where}.path", modules)
            default = getattr(fn, "__name__", spec.path.rsplit(":", 1)[1])
        else:
            fn, default = _builtin(spec, where), spec.type
        rewards.append(Reward(_unique(spec.name or default, used), float(spec.weight), fn, where))
    return rewards


def score_rewards(
    rewards: list[Reward],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: list[dict],
    wheres: list[str],
    **extra: Any,
) -> list[list[float]]:
    """Per reward, per completion, its value (None -> NaN: does not apply). `columns[k]`: completion k's row's extra
    columns, passed as keyword lists (a key missing in a row: None there); `extra` (e.g. trainer_state) is passed on
    too (the built-ins ignore it); `wheres[k]`: completion k's dataset row, for errors."""
    keys = list(dict.fromkeys(key for row in columns for key in row))
    kwargs = {key: [row.get(key) for row in columns] for key in keys}
    batch = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs, **extra}
    n = len(completions)
    out = []
    for reward in rewards:
        try:
            values = reward.fn(**batch)
        except Exception as exc:
            raise _raised(reward, exc, batch, keys, n, wheres) from exc
        out.append(_checked(reward, values, n, wheres))
    return out


def weighted_total(rewards: list[Reward], per_reward: list[list[float]]) -> list[float]:
    """Per completion, the sum of weight x value over the rewards, NaN values skipped (TRL's nansum); NaN when every
    reward is NaN (none applies). No rewards: an empty list."""
    totals = []
    for values in zip(*per_reward, strict=True):
        applied = [r.weight * v for r, v in zip(rewards, values, strict=True) if not math.isnan(v)]
        totals.append(math.fsum(applied) if applied else math.nan)
    return totals


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a list of messages whose last one's content (a
    string, or a list of {"type": "text", "text": ...} parts, joined) is the answer."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    message = completion[-1] if isinstance(completion, list | tuple) else completion
    content = message.get("content") if isinstance(message, dict) else None
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text")


# ------------------------------------------------------------------------------------------------- built-ins


def _builtin(spec: Any, where: str) -> Callable[..., list]:
    """The built-in reward of `spec` as a function with TRL's signature (**kwargs: the columns and whatever else TRL
    passes, e.g. trainer_state)."""
    if spec.type in ("exact", "contains"):
        compare = metrics.exact_match if spec.type == "exact" else metrics.contains
        column = spec.column or "answer"

        def compared(completions: list, **kwargs: Any) -> list[float | None]:
            refs = _column(kwargs, column, len(completions))
            return [
                None if ref is None else compare(completion_text(c), str(ref))
                for c, ref in zip(completions, refs, strict=True)
            ]

        return compared

    if spec.type == "regex":
        pattern, column = spec.pattern, spec.column

        def matched(completions: list, **kwargs: Any) -> list[float | None]:
            n = len(completions)
            patterns = [pattern] * n if column is None else _column(kwargs, column, n)
            return [
                _search(completion_text(c), p, column, where, k)
                for k, (c, p) in enumerate(zip(completions, patterns, strict=True))
            ]

        return matched

    if spec.type == "json_schema":
        column = spec.column or "schema"

        def validated(completions: list, **kwargs: Any) -> list[float | None]:
            compiled: dict[str, Any] = {}  # each distinct schema compiled once per call: a group shares its row's
            schemas = _column(kwargs, column, len(completions))
            return [
                _json_valid(completion_text(c), s, column, compiled, where, k)
                for k, (c, s) in enumerate(zip(completions, schemas, strict=True))
            ]

        return validated

    if spec.type == "length":
        target = spec.target

        def near_length(completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
            return [max(0.0, 1.0 - abs(_token_count(ids) - target) / target) for ids in completion_ids]

        return near_length

    raise ValueError(f"not a built-in reward type: {spec.type}")  # the recipe's validator lets no other through


def _column(kwargs: dict, column: str, n: int) -> list:
    """The column's values aligned with the completions; None for every row when no row has it."""
    return kwargs.get(column) or [None] * n


def _search(text: str, pattern: Any, column: str | None, where: str, k: int) -> float | None:
    if pattern is None:
        return None
    try:
        return metrics.regex(text, str(pattern))
    except re.error as exc:  # only a row's pattern can be bad: the recipe's own was compiled when it loaded
        raise ToolkitError(
            f"the row's column {column!r} is not a valid regular expression ({exc}): {str(pattern)!r}",
            where=f"{where}, completion {k} of the batch",  # score_rewards names the dataset row instead
            fix=f"fix the pattern in column {column!r} of that row (Python `re` syntax)",
        ) from None


def _json_valid(text: str, schema: Any, column: str, compiled: dict, where: str, k: int) -> float | None:
    if schema is None:
        return None
    validator = _validator(schema, column, compiled, where, k)  # first: a bad schema is an error whatever the answer
    try:
        answer = json.loads(_unfenced(text.strip()))
    except ValueError:
        return 0.0
    return float(validator.is_valid(answer))


def _unfenced(text: str) -> str:
    """The inside of a fenced block when the whole answer is exactly one (models like to fence JSON), else the text."""
    fenced = _FENCED.fullmatch(text)
    return fenced.group(1) if fenced and "```" not in fenced.group(1) else text


def _validator(schema: Any, column: str, compiled: dict, where: str, k: int) -> Any:
    import jsonschema_rs  # Rust, compiled once per distinct schema: fast enough for every completion of a batch

    def bad(why: str) -> ToolkitError:
        return ToolkitError(
            f"the row's column {column!r} is not a valid JSON schema ({why})",
            where=f"{where}, completion {k} of the batch",  # score_rewards names the dataset row instead
            fix=f"put a JSON schema (an object, or a string holding one) in column {column!r} of that row",
        )

    key = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
    if key not in compiled:
        try:
            parsed = json.loads(schema) if isinstance(schema, str) else schema
        except ValueError as exc:
            raise bad(f"not JSON: {exc}") from None
        try:
            # offline: a $ref to a URL is an error, not a download in the middle of training
            compiled[key] = jsonschema_rs.validator_for(parsed, offline=True)
        except ValueError as exc:  # jsonschema_rs.ValidationError is a ValueError
            raise bad(first_line(str(exc))) from None
    return compiled[key]


def _token_count(ids: list[int]) -> int:
    """Tokens of the completion, less the stop token it ended on (not part of the answer's length)."""
    return len(ids) - 1 if len(ids) and int(ids[-1]) in STOP_TOKEN_IDS else len(ids)


# ------------------------------------------------------------------------------------------------- user functions


def _load_function(path: str, recipe_dir: Path, where: str, modules: dict[Path, Any]) -> Callable[..., list]:
    file_part, name = path.rsplit(":", 1)
    file = (recipe_dir / file_part).resolve()
    fix_path = f"path: file.py:function_name, the file relative to the recipe's folder ({recipe_dir})"
    if not file.is_file():
        raise ToolkitError(f"reward file {file_part} not found (looked at {file})", where=where, fix=fix_path)
    if file.suffix != ".py":
        raise ToolkitError(f"reward file {file_part} is not a Python file (.py)", where=where, fix=fix_path)
    if file not in modules:
        modules[file] = _import(file, file_part, where)
    fn = getattr(modules[file], name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(modules[file]).items() if callable(v) and not k.startswith("_"))
        raise ToolkitError(
            f"{file_part} has no {name!r} (it defines: {', '.join(defined) or 'nothing callable'})",
            where=where,
            fix=f"define {SIGNATURE.replace('NAME', name)} in {file_part}, or name one it has",
        )
    if not callable(fn):
        raise ToolkitError(
            f"{file_part}:{name} is a {type(fn).__name__}, not a function",
            where=where,
            fix=f"make {name} a function: {SIGNATURE.replace('NAME', name)}",
        )
    return fn


def _import(file: Path, shown: str, where: str) -> Any:
    """The file imported as a module of its own. Its name carries a hash of the path, so two recipes' rewards.py do
    not replace each other; nothing is added to sys.path (the file's folder could shadow real packages)."""
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"toolkit_rewards_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as `import` does: dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        raise ToolkitError(
            f"{shown} line {exc.lineno}: syntax error: {exc.msg}" + (f": {exc.text.strip()}" if exc.text else ""),
            where=where,
            fix=f"fix line {exc.lineno} of {shown}",
        ) from exc
    except Exception as exc:
        del sys.modules[module_name]
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == file]
        at = f" (line {lines[-1]})" if lines else ""
        raise ToolkitError(
            f"importing {shown} raised {type(exc).__name__}{at}: {exc}",
            where=where,
            fix=f"fix {shown} so that it imports (try: python {file})",
        ) from exc
    return module


# ------------------------------------------------------------------------------------------------- checks


def _raised(reward: Reward, exc: Exception, batch: dict, keys: list[str], n: int, wheres: list[str]) -> ToolkitError:
    """The error of a reward that raised on a batch, at the dataset row that makes it raise: the first completion
    that raises alone. When none raises alone, or every one does (a bad signature, not a bad row), the batch's rows."""
    first, passed = None, False
    for k in range(n):
        try:
            reward.fn(**_alone(batch, keys, k))
        except Exception as solo:
            first = first or (k, solo)
        else:
            passed = True
        if first and passed:
            break
    where = _rows(wheres)
    if first and passed:
        (k, exc), where = first, wheres[first[0]]  # what it raised on that row alone
    if isinstance(exc, ToolkitError):  # a built-in's (or your own) message on a bad row: keep it
        return ToolkitError(f"reward {reward.name}: {exc.what}", where=where, fix=exc.fix)
    return ToolkitError(
        f"reward function {reward.name} raised {type(exc).__name__}: {exc}",
        where=where,
        fix=f"fix the function ({reward.where}); it is called as {SIGNATURE.replace('NAME', reward.name)}",
    )


def _alone(batch: dict, keys: list[str], k: int) -> dict:
    """The batch's arguments for completion k alone: the aligned lists cut to [k], the rest (trainer_state) as is."""
    aligned = ("prompts", "completions", "completion_ids", *keys)
    return {key: value[k : k + 1] if key in aligned else value for key, value in batch.items()}


def _checked(reward: Reward, values: Any, n: int, wheres: list[str]) -> list[float]:
    """The function's values as floats (None -> NaN, bools 0/1); anything else is the function's bug, named."""
    fix = f"return one number (or None: does not apply) per completion: {SIGNATURE.replace('NAME', reward.name)}"
    if not isinstance(values, list | tuple) or len(values) != n:
        size = f" of length {len(values)}" if hasattr(values, "__len__") else ""
        shown = f" {_short(values)}" if not isinstance(values, list | tuple) else ""
        raise ToolkitError(
            f"reward function {reward.name} returned a {type(values).__name__}{size}{shown}, "
            f"expected a list of {n} values (one per completion)",
            where=_rows(wheres),
            fix=fix,
        )
    out = []
    for k, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if not isinstance(value, numbers.Real) or not math.isfinite(value):  # numbers.Real: bools and numpy too
            raise ToolkitError(
                f"reward function {reward.name} returned {_short(value)} ({type(value).__name__}) "
                f"for completion {k}, expected a finite number or None",
                where=wheres[k],
                fix=fix,
            )
        out.append(float(value))
    return out


def _rows(wheres: list[str]) -> str:
    """The batch's dataset rows, each once (a group's completions share their row), the first few."""
    rows = list(dict.fromkeys(wheres))
    more = f" and {len(rows) - _SHOWN_ROWS} more rows" if len(rows) > _SHOWN_ROWS else ""
    return ", ".join(rows[:_SHOWN_ROWS]) + more


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unique(name: str, used: set[str]) -> str:
    unique, k = name, 1
    while unique in used:
        k += 1
        unique = f"{name}_{k}"
    used.add(unique)
    return unique


def reward_prompt(row: Any) -> Any:
    """A prompt as TRL hands it to reward functions: the string of a plain-text prompt row, else the messages."""
    if row.text_prompt:  # (its images, if any, are not part of TRL's string form)
        return text_of(row.messages[-1].content)
    return [m.model_dump(exclude_none=True) for m in row.messages]


def reward_completion(row: Any, text: str) -> Any:
    """A completion as TRL hands it to reward functions: text for text prompts, else one assistant message."""
    return text if row.text_prompt else [{"role": "assistant", "content": text}]

"""Preference rows: a prompt with a preferred (chosen) answer, a dispreferred (rejected) one, or both.

The door for `data.format: preference | kto` (docs/DATA.md, "Preference and KTO rows"). Every shape becomes the
prompt's raw schema messages and each answer's, built with formats.py's pieces so that errors name the fields as
the user wrote them; each side is then one conversation (the prompt, then that answer) that datasets.py checks and
encodes like any row, its labels on the answer only (`train_from`):
- TRL explicit prompt: `prompt`, `chosen`, `rejected`, each a list of messages or a string (a string prompt is one
  user turn, a string answer one assistant turn);
- TRL implicit prompt: only `chosen` and `rejected`, whole conversations that share every turn but the last;
- UltraFeedback: `prompt` a string, and `chosen` / `rejected` whole conversations that repeat it. The rule for
  both: answer lists holding a non-assistant turn are whole conversations, and a `prompt` given beside them must
  agree with the turns they share;
- LLaMA-Factory ranking rows: ShareGPT `conversations` (ending with the user's turn) with `chosen` / `rejected` one
  message each, or Alpaca `instruction` (+ "\\n" + `input` when not empty, after an optional `history`) with
  `chosen` / `rejected` strings; an optional `system`, `images` filling `<image>` markers;
- Axolotl's `chat_template.default`: `messages` (the conversation so far) with one message per answer;
- KTO: `prompt`, `completion` and `label` (true: desirable, false: undesirable), or LLaMA-Factory's whole
  conversation (`messages`) whose last turn is the labelled answer.
Images belong to the prompt (TRL's placeholders and its rule for rows without any, `<image>` markers); an image in
an answer is a bad row. This module also decides which rows a training method takes (`data_kind`) and sums an
encoded split up for `toolkit validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit.data.formats import (
    CONVERSATION_FORMATS,
    DEFAULT_COLUMNS,
    SHAREGPT_ROLES,
    Builder,
    Converted,
    EncodedRow,
    Row,
    add_history,
    add_turn,
    add_turns,
    conversation_field,
    fail,
    images_of,
    str_field,
)
from toolkit.data.template import IGNORE, Encoded
from toolkit.errors import ToolkitError
from toolkit.recipe import PAIRED_METHODS

SIDES = ("chosen", "rejected")
KINDS = ("conversations", "pairs", "unpaired", "prompts")  # SFT rows, pairs, labelled answers, or GRPO prompts

SHAPES = (  # the preference row shapes, for errors that ask for them (docs/DATA.md shows each)
    "{prompt, chosen, rejected} or {chosen, rejected} whole conversations (TRL, UltraFeedback), "
    "{conversations, chosen, rejected} or {instruction, input, chosen, rejected} (LLaMA-Factory)"
)
DOCS = 'docs/DATA.md, "Preference and KTO rows"'


@dataclass
class Preference:
    """One item of preference data, encoded: a pair (both sides) or, for KTO, one labelled side (the other None).

    Each side is a whole conversation (the shared prompt, then that answer) encoded by the template, its labels
    set on the answer only; both sides of a pair carry the same prompt tokens.
    """

    where: str  # file:row
    chosen: EncodedRow | None
    rejected: EncodedRow | None

    @property
    def paired(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    def sides(self) -> list[tuple[str, EncodedRow]]:
        """The present sides, chosen first: [("chosen", ...), ("rejected", ...)]."""
        return [(name, side) for name, side in zip(SIDES, (self.chosen, self.rejected), strict=True) if side]


@dataclass
class RowPair:
    """A preference row past the door and the schema, before encoding: each present side a checked conversation."""

    where: str
    chosen: Row | None
    rejected: Row | None

    def sides(self) -> list[tuple[str, Row]]:
        return [(name, side) for name, side in zip(SIDES, (self.chosen, self.rejected), strict=True) if side]


@dataclass
class ConvertedPair:
    """A preference row at the door: each present side as one raw conversation (prompt + answer) with its fields."""

    chosen: Converted | None
    rejected: Converted | None
    answer_fields: dict[str, str]  # side -> the user's field of its answer (`chosen`, `completion`)

    def sides(self) -> list[tuple[str, Converted]]:
        return [(name, side) for name, side in zip(SIDES, (self.chosen, self.rejected), strict=True) if side]


# ------------------------------------------------------------------------------------------------------ the door


def convert_pair(raw: dict, fmt: str, columns: dict[str, str], roles: dict[str, str]) -> ConvertedPair:
    """One `preference` or `kto` row -> its sides as raw schema conversations; raises ToolkitError("field: what")."""
    cols = {**DEFAULT_COLUMNS[fmt], **columns}
    if fmt == "kto":
        return _kto(raw, cols, columns, roles)
    if fmt != "preference":
        raise ValueError(f"not a preference format: {fmt!r}")
    for side in SIDES:
        if cols[side] not in raw:
            fail(cols[side], "is missing")
    conversation = _prompt_list(raw, cols, columns)
    if conversation:
        return _sharegpt(raw, conversation, cols, columns, roles)
    if cols["instruction"] in raw:
        return _alpaca(raw, cols, columns, roles)
    return _trl(raw, cols, columns, roles)


def _style(turns: Any, cols: dict[str, str], columns: dict[str, str]) -> tuple[dict[str, str], bool]:
    """The keys of a message list (or one message) and whether it is ShareGPT's: data.columns names the role and
    content keys, else the first turn tells from / value (human, gpt) from role / content. Both kinds of rows
    are common (LLaMA-Factory's ranking sets use either), so one format reads both."""
    first = turns if isinstance(turns, dict) else {}
    if isinstance(turns, list):
        first = next((t for t in turns if isinstance(t, dict)), {})
    sharegpt = "from" in first and "role" not in first
    role = columns.get("role", "from" if sharegpt else "role")
    content = columns.get("content", "value" if sharegpt else "content")
    return {**cols, "role": role, "content": content}, role == "from"


def _add_prompt(b: Builder, value: Any, name: str, cols: dict, columns: dict, roles: dict) -> None:
    if isinstance(value, str):
        b.add("user", value, name, name, name)
    elif isinstance(value, list):
        keys, sharegpt = _style(value, cols, columns)
        add_turns(b, value, name, keys, roles, sharegpt=sharegpt)
    else:
        fail(name, f"must be a string or a list of messages (got {type(value).__name__})")


def _answer(value: Any, name: str, cols: dict, columns: dict, roles: dict, markers: bool, start: int = 0) -> Builder:
    """An answer: a string (one assistant turn), one message (LLaMA-Factory) or a list of messages."""
    b = Builder([], markers)
    if isinstance(value, str):
        b.add("assistant", value, name, name, name)
    elif isinstance(value, dict):
        keys, sharegpt = _style(value, cols, columns)
        add_turn(b, value, name, keys, roles, sharegpt=sharegpt)
    elif isinstance(value, list):
        if not value:
            fail(name, "is empty")
        keys, sharegpt = _style(value, cols, columns)
        add_turns(b, value, name, keys, roles, sharegpt=sharegpt, start=start)
    else:
        fail(name, f"must be a string, a message or a list of messages (got {type(value).__name__})")
    for m in b.msgs:  # an image is part of what the model is asked, never of what it answers
        parts = m.data["content"] if isinstance(m.data["content"], list) else []
        for part, part_field in zip(parts, m.part_fields, strict=True):
            if isinstance(part, dict) and part.get("type") == "image_url":
                fail(part_field, "an answer cannot hold an image; images belong to the prompt")
    return b


def _pair(prompt: Builder, prompt_field: str, answers: dict[str, tuple[Builder, str]]) -> ConvertedPair:
    """Each side: the prompt's messages then that answer's, one conversation; only the answer is trained."""
    if not prompt.msgs:
        fail(prompt_field, "is empty")
    last = prompt.msgs[-1]
    if last.data["role"] != "user":  # said here: the schema would blame the answer's role instead
        fail(
            last.role_field,
            f"the prompt must end with the user's turn, which the answers reply to (got {last.data['role']!r})",
        )
    sides = {
        side: Builder([], prompt.markers, msgs=prompt.msgs + b.msgs).result(name, train_from=len(prompt.msgs))
        for side, (b, name) in answers.items()
    }
    return ConvertedPair(sides.get("chosen"), sides.get("rejected"), {s: name for s, (_, name) in answers.items()})


def _is_conversation(value: Any, cols: dict, columns: dict, roles: dict) -> bool:
    """An answer list holding a non-assistant turn is a whole conversation (TRL's implicit prompt)."""
    if not isinstance(value, list):
        return False
    keys, sharegpt = _style(value, cols, columns)
    names = {**(SHAREGPT_ROLES if sharegpt else {}), **roles}
    said = [t.get(keys["role"]) for t in value if isinstance(t, dict)]
    # a role that is no string is not the assistant's: read as a conversation, whose door then names the field
    return any(not isinstance(role, str) or names.get(role, role) != "assistant" for role in said)


def _trl(raw: dict, cols: dict, columns: dict, roles: dict) -> ConvertedPair:
    images, images_field = images_of(raw, cols, llava=False)
    prompt = Builder(images, markers=bool(images))
    p_name = cols["prompt"]
    if p_name not in raw or any(_is_conversation(raw[cols[s]], cols, columns, roles) for s in SIDES):
        why = "an answer list holds a non-assistant turn" if p_name in raw else f"there is no {p_name} field"
        answers = _implicit(raw, cols, columns, roles, prompt, why)
        if p_name in raw:
            _check_agrees(raw[p_name], prompt, p_name, cols, columns, roles)
    else:
        _add_prompt(prompt, raw[p_name], p_name, cols, columns, roles)
        answers = {s: (_answer(raw[cols[s]], cols[s], cols, columns, roles, prompt.markers), cols[s]) for s in SIDES}
    prompt.fill_images(images_field, trl_rule=True)
    return _pair(prompt, p_name if p_name in raw else cols["chosen"], answers)


def _implicit(
    raw: dict, cols: dict, columns: dict, roles: dict, prompt: Builder, why: str
) -> dict[str, tuple[Builder, str]]:
    """Whole conversations: the turns both share are the prompt (added to `prompt`), each last turn its answer.
    `why` they are read so, for the errors."""
    c_name, r_name = cols["chosen"], cols["rejected"]
    whole = f"{c_name} and {r_name} are read as whole conversations (the prompt's turns, then the answer) since {why}"
    for name in (c_name, r_name):
        if not isinstance(raw[name], list):
            fail(name, f"must be a list of messages: {whole}")
        if not raw[name]:
            fail(name, "is empty")
    chosen, rejected = raw[c_name], raw[r_name]
    if len(chosen) < 2:
        fail(c_name, f"has no prompt turn: {whole}")
    rule = "an implicit-prompt pair must share every turn but the last"
    if len(chosen) != len(rejected):
        fail(r_name, f"has {len(rejected)} turns and {c_name} has {len(chosen)}; {rule}")
    for i in range(len(chosen) - 1):
        if chosen[i] != rejected[i]:
            fail(f"{r_name}[{i}]", f"differs from {c_name}[{i}]; {rule}")
    keys, sharegpt = _style(chosen, cols, columns)
    add_turns(prompt, chosen[:-1], c_name, keys, roles, sharegpt=sharegpt)
    last = len(chosen) - 1
    return {
        side: (_answer(raw[cols[side]][-1:], cols[side], cols, columns, roles, prompt.markers, start=last), cols[side])
        for side in SIDES
    }


def _check_agrees(value: Any, shared: Builder, p_name: str, cols: dict, columns: dict, roles: dict) -> None:
    """A `prompt` beside whole conversations (UltraFeedback) must say what they share; images aside, since those
    fill the shared turns' places."""
    given = Builder([], markers=False)
    _add_prompt(given, value, p_name, cols, columns, roles)
    if _texts(given) != _texts(shared):
        c, r = cols["chosen"], cols["rejected"]
        fail(
            p_name,
            f"differs from the turns {c} and {r} share (all but their last); give the same prompt or leave it out",
        )


def _texts(b: Builder) -> list[tuple[str, tuple[str, ...]]]:
    def texts(content: Any) -> tuple[str, ...]:
        if isinstance(content, str):
            return (content.strip(),)
        return tuple(p["text"].strip() for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))

    return [(m.data["role"], texts(m.data["content"])) for m in b.msgs]


def _system(b: Builder, raw: dict, cols: dict) -> None:
    system = str_field(raw, cols["system"], required=False)
    if system:
        b.add("system", system, cols["system"], cols["system"], cols["system"])


def _prompt_list(raw: dict, cols: dict, columns: dict) -> str | None:
    """The field of a conversation-so-far beside the answers: LLaMA-Factory's `conversations`, or `messages` beside
    one message per answer (Axolotl's chat_template.default). UltraFeedback's `messages` beside answer lists is
    a copy of the chosen conversation, not a prompt."""
    if cols["messages"] in raw:
        return cols["messages"]
    if "messages" not in columns and isinstance(raw.get("messages"), list) and isinstance(raw[cols["chosen"]], dict):
        return "messages"
    return None


def _sharegpt(raw: dict, list_field: str, cols: dict, columns: dict, roles: dict) -> ConvertedPair:
    """LLaMA-Factory's ranking rows: the conversation so far (ending with the user's turn) and one message each."""
    turns = raw[list_field]
    if not isinstance(turns, list):
        fail(list_field, "must be a list of messages")
    images, images_field = images_of(raw, cols, llava="images" not in columns)
    prompt = Builder(images, markers=True)
    _system(prompt, raw, cols)
    keys, sharegpt = _style(turns, cols, columns)
    add_turns(prompt, turns, list_field, keys, roles, sharegpt=sharegpt)
    prompt.fill_images(images_field, trl_rule=False)
    answers = {s: (_answer(raw[cols[s]], cols[s], cols, columns, roles, True), cols[s]) for s in SIDES}
    return _pair(prompt, list_field, answers)


def _alpaca(raw: dict, cols: dict, columns: dict, roles: dict) -> ConvertedPair:
    images, images_field = images_of(raw, cols, llava=False)
    prompt = Builder(images, markers=True)
    _system(prompt, raw, cols)
    add_history(prompt, raw, cols["history"])  # earlier turns: context, never trained in a pair
    instruction = str_field(raw, cols["instruction"], required=True)
    query = str_field(raw, cols["input"], required=False)
    user = "\n".join(t for t in (instruction, query) if t)  # LLaMA-Factory's rule: input only when not empty
    prompt.add("user", user, cols["instruction"], cols["instruction"], cols["instruction"])
    prompt.fill_images(images_field, trl_rule=False)
    answers = {s: (_answer(raw[cols[s]], cols[s], cols, columns, roles, True), cols[s]) for s in SIDES}
    return _pair(prompt, cols["instruction"], answers)


def _kto(raw: dict, cols: dict, columns: dict, roles: dict) -> ConvertedPair:
    """TRL's unpaired preference rows: one answer, `label` true (desirable: the chosen side) or false."""
    if cols["label"] not in raw:
        fail(cols["label"], "is missing")
    label = raw[cols["label"]]
    if not isinstance(label, bool):  # 0 / 1 or "yes" would be a guess about which answers to reinforce
        fail(cols["label"], f"must be true (desirable) or false (undesirable), got {type(label).__name__} {label!r}")
    side = "chosen" if label else "rejected"
    conversation = None if cols["prompt"] in raw or cols["completion"] in raw else conversation_field(raw, columns)
    if conversation:
        return _kto_conversation(raw, conversation, cols, columns, roles, side)
    for key in ("prompt", "completion"):
        if cols[key] not in raw:
            fail(cols[key], "is missing")
    images, images_field = images_of(raw, cols, llava=False)
    prompt = Builder(images, markers=bool(images))
    _add_prompt(prompt, raw[cols["prompt"]], cols["prompt"], cols, columns, roles)
    prompt.fill_images(images_field, trl_rule=True)
    name = cols["completion"]
    answer = _answer(raw[name], name, cols, columns, roles, prompt.markers)
    return _pair(prompt, cols["prompt"], {side: (answer, name)})


def _kto_conversation(raw: dict, list_field: str, cols: dict, columns: dict, roles: dict, side: str) -> ConvertedPair:
    """LLaMA-Factory's KTO rows: a whole conversation whose last turn is the labelled answer."""
    turns = raw[list_field]
    if len(turns) < 2:
        fail(list_field, "needs the prompt's turns, then the labelled answer")
    images, images_field = images_of(raw, cols, llava="images" not in columns)
    prompt = Builder(images, markers=True)
    _system(prompt, raw, cols)
    keys, sharegpt = _style(turns, cols, columns)
    add_turns(prompt, turns[:-1], list_field, keys, roles, sharegpt=sharegpt)
    prompt.fill_images(images_field, trl_rule=False)
    last = len(turns) - 1
    answer = _answer(turns[-1:], list_field, cols, columns, roles, True, start=last)
    return _pair(prompt, list_field, {side: (answer, f"{list_field}[{last}]")})


def same_answers(chosen: Row, rejected: Row) -> bool:
    """Whether a pair's two answers say the same (text in a string or in parts alike): nothing to prefer."""

    def answer(row: Row) -> list[tuple[str, list[str]]]:
        out = []
        for m in row.messages[row.train_from :]:
            content = [m.content] if isinstance(m.content, str) else [getattr(p, "text", "") for p in m.content]
            out.append((m.role, [t.strip() for t in content]))
        return out

    return answer(chosen) == answer(rejected)


# ------------------------------------------------------------------------------------------- methods and items


def data_kind(method: str, fmt: str, where: str) -> str:
    """What `method` trains on from rows of `fmt`: conversations, pairs or unpaired (labelled) answers. Rows it
    cannot train on stop here, before the file is read, with what to change."""
    if method == "grpo":
        if fmt in CONVERSATION_FORMATS:
            return "prompts"  # each conversation is a prompt (it must end with the user's turn)
        raise ToolkitError(
            f"training.method grpo samples its own answers to prompts, and these are {fmt} rows (answers to learn)",
            where=where,
            fix='give prompt rows ({"prompt": ...} or conversations ending with a user turn, reference answers '
            "in a column such as `answer` for the rewards); or set training.method to a preference method",
        )
    if fmt == "prompt":
        raise ToolkitError(
            f"these are prompt-only rows (no answer to learn from), and training.method {method} needs answers",
            where=where,
            fix="set training.method: grpo (answers sampled and scored by training.rewards), or add the answers",
        )
    if fmt in CONVERSATION_FORMATS:
        if method == "sft":
            return "conversations"
        kto = "; kto also reads {prompt, completion, label}" if method == "kto" else ""
        raise ToolkitError(
            f"training.method {method} needs preference rows, and these are {fmt} rows (conversations to imitate)",
            where=where,
            fix=f"give preference rows: {SHAPES}{kto} ({DOCS}); or set training.method: sft",
        )
    if method == "sft":
        if fmt == "kto":
            what, methods = "kto rows (answers labelled true or false)", "kto"
        else:
            what = "preference rows (pairs: a chosen and a rejected answer to one prompt)"
            methods = "dpo, orpo or simpo (or kto, which takes each answer of a pair on its own)"
        raise ToolkitError(
            f"these are {what}, and training.method sft trains on conversations",
            where=where,
            fix=f"set training.method: {methods}",
        )
    if method == "kto":
        return "unpaired"  # kto rows as they are; pairs unpaired for KTO (chosen desirable, rejected undesirable)
    if method not in PAIRED_METHODS:
        raise ValueError(f"unknown training method {method!r}")
    if fmt == "kto":
        raise ToolkitError(
            f"training.method {method} needs pairs (a chosen and a rejected answer to one prompt); these are kto "
            "rows (one answer labelled true or false)",
            where=where,
            fix=f"set training.method: kto, or give pairs: {SHAPES} ({DOCS})",
        )
    return "pairs"


def unpair(items: list[Preference]) -> list[Preference]:
    """Pairs unpaired for KTO: each pair gives its chosen answer (desirable), then its rejected one (undesirable)."""
    out = []
    for item in items:
        if item.chosen:
            out.append(Preference(item.where, item.chosen, None))
        if item.rejected:
            out.append(Preference(item.where, None, item.rejected))
    return out


def rejoin(items: list[Preference]) -> list[Preference]:
    """The pairs among `items`, unpair's answers joined again (one desirable and one undesirable answer under one
    file:row); pairs stay as they are, lone answers are left out."""
    if all(item.paired for item in items):
        return items
    groups: dict[str, list[Preference]] = {}
    for item in items:
        groups.setdefault(item.where, []).append(item)
    out = []
    for where, group in groups.items():
        chosen = next((g.chosen for g in group if g.chosen is not None), None)
        rejected = next((g.rejected for g in group if g.rejected is not None), None)
        if chosen is not None and rejected is not None:
            out.append(Preference(where, chosen, rejected))
    return out


def prompt_length(encoded: Encoded) -> int:
    """Tokens before the answer: the first labelled token starts it (the prompt's own answers are unlabelled)."""
    return next((i for i, label in enumerate(encoded.labels) if label != IGNORE), len(encoded.labels))


def check_same_prompt(item: Preference) -> None:
    """Both sides of a pair must feed the model one prompt, token for token: the preference is between the answers
    only. The template encodes turn by turn, so this holds by construction; checked since the losses rely on it."""
    if not item.paired:
        return
    chosen, rejected = item.chosen.encoded, item.rejected.encoded
    n = prompt_length(chosen)
    if n != prompt_length(rejected) or chosen.input_ids[:n] != rejected.input_ids[:n]:
        raise RuntimeError(f"{item.where}: the two sides of the pair encode different prompts")


def stats(items: list[Preference], kind: str) -> dict:
    """A split of preference items summed up: SFT's keys (rows = items; tokens and answer tokens over every side,
    so a pair's prompt counts twice, as training feeds it twice) plus each side's answer tokens, the prompts'
    tokens (once per item) and, for unpaired items, how many are desirable and undesirable."""
    sides = [(item, name, side) for item in items for name, side in item.sides()]
    longest = max(sides, key=lambda s: len(s[2].encoded.input_ids), default=None)
    out = {
        "rows": len(items),
        "tokens": sum(len(side.encoded.input_ids) for _, _, side in sides),
        "answer_tokens": sum(side.encoded.num_label_tokens for _, _, side in sides),
        "images": sum(item.sides()[0][1].encoded.num_images for item in items),  # the prompt's, once per item
        "longest_row": {"where": longest[0].where, "tokens": len(longest[2].encoded.input_ids), "side": longest[1]}
        if longest
        else None,
        "chosen_tokens": sum(s.encoded.num_label_tokens for _, name, s in sides if name == "chosen"),
        "rejected_tokens": sum(s.encoded.num_label_tokens for _, name, s in sides if name == "rejected"),
        "prompt_tokens": sum(prompt_length(item.sides()[0][1].encoded) for item in items),
    }
    if kind == "unpaired":
        out["desirable"] = sum(1 for item in items if item.chosen)
        out["undesirable"] = sum(1 for item in items if item.rejected)
    return out

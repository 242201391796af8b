"""The format doors: dataset rows in the shapes people already have -> the one message schema (schema.py).

Formats (docs/DATA.md has an example row of each and its LLaMA-Factory / Axolotl / TRL equivalent):
- messages: OpenAI `{"messages": [...]}`, plus TRL's content parts: `{"type": "image"}` placeholders filled in
  order from an `images` column, and processor-style `{"type": "image", "url" | "path" | "image": ...}` parts;
- sharegpt (LLaVA included): `{"conversations": [{"from": "human", "value": ...}, ...]}`, `<image>` markers in
  the text filled from `image` / `images`, an optional top-level `system`;
- alpaca: `instruction` (+ "\\n" + `input` when not empty), `output`, optional `system` and `history`;
- prompt_completion: TRL's `prompt` then `completion` (lists of messages or strings); only the completion trains;
- prompt: TRL's prompt-only rows (`prompt`, messages or a string), for grpo. GRPO takes prompts from every
  conversation format (a conversation ending with a user turn; alpaca without `output`), and a row's other fields
  (`answer`, `schema`, ...) are kept as its columns for the reward functions (`extra_columns`).
An image is a path (relative to the data file), an http(s) or data: URL, a `datasets` Image value
(`{"bytes", "path"}`) or a PIL image; bytes and PIL images become data: URIs, so past this door an image is a URL.

`convert_row` returns the schema's raw messages and, for every schema field path it made, the field as the user
wrote it (`messages[2].role` -> `conversations[2].from`), so errors found later still name the user's field.
This module knows field names and conventions, not the schema's rules (schema.py checks the result) nor the
template (template.py): nothing past this door knows which format a row came in. Preference and KTO rows
(`preference`, `kto`) come through preference.py's door, built from the same pieces (`Builder`, `add_turns`).

`Row` (a checked conversation) and `EncodedRow` (it with the template's `Encoded`, a type only) live here, below
both doors' users: datasets.py makes them and preference.py's `Preference` holds them; datasets.py imports
preference.py, so neither could hold them without an import circle.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from toolkit.data.schema import TOOLS_UNSUPPORTED
from toolkit.data.template import Encoded
from toolkit.errors import ToolkitError

CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "prompt")
PREFERENCE_FORMATS = ("preference", "kto")  # preference.py's door: pairs, and answers labelled true / false
FORMATS = CONVERSATION_FORMATS + PREFERENCE_FORMATS
ROLES = ("system", "developer", "user", "assistant")
_TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")
MARKER = "<image>"  # LLaVA's and LLaMA-Factory's image placeholder in text

# the field names each format reads unless data.columns renames them
_COMMON = {"images": "images", "system": "system"}
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "messages": {"messages": "messages", "role": "role", "content": "content", **_COMMON},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value", **_COMMON},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "history": "history", **_COMMON},
    "prompt_completion": {
        "prompt": "prompt",
        "completion": "completion",
        "role": "role",
        "content": "content",
        **_COMMON,
    },
    "prompt": {"prompt": "prompt", "role": "role", "content": "content", **_COMMON},
    # TRL's preference rows, and LLaMA-Factory's ranking rows (conversations / instruction + chosen + rejected)
    "preference": {
        "prompt": "prompt",
        "chosen": "chosen",
        "rejected": "rejected",
        "messages": "conversations",
        "instruction": "instruction",
        "input": "input",
        "history": "history",
        "role": "role",
        "content": "content",
        **_COMMON,
    },
    "kto": {
        "prompt": "prompt",
        "completion": "completion",
        "label": "label",
        "messages": "messages",
        "role": "role",
        "content": "content",
        **_COMMON,
    },
}
COLUMN_KEYS = tuple(sorted({k for cols in DEFAULT_COLUMNS.values() for k in cols} | {"regex"}))

# ShareGPT's role names (LLaMA-Factory's and FastChat's tags); OpenAI's names map to themselves everywhere
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "model": "assistant"}

FIX_ROLES = "in the recipe: data.roles: {{{}: user | assistant | system | developer}}"


@dataclass
class Row:
    """A conversation past the door and the schema: checked messages, ready to encode."""

    where: str  # "file:row"
    messages: list
    regex: str | None = None
    base_dir: Path | None = None
    train_from: int = 0  # assistant messages before this index are context only (prompt_completion, preference)
    fields: dict[str, str] = field(default_factory=dict)  # schema path -> the field as the user wrote it
    columns: dict[str, Any] = field(default_factory=dict)  # a prompt row's other fields, for reward functions
    text_prompt: bool = False  # the prompt came as a plain string (TRL's standard format: rewards see strings)

    def field_of(self, path: str) -> str:
        """The user's name of a schema field path (`messages[2].role` -> `conversations[2].from`)."""
        return field_of(self.fields, path)

    @property
    def is_prompt(self) -> bool:
        """A GRPO prompt row: it ends with the user's turn (the model writes the answer)."""
        return self.messages[-1].role == "user"


@dataclass
class EncodedRow:
    row: Row
    encoded: Encoded


@dataclass
class Converted:
    """One row in the message schema (raw dicts, not yet checked), and where each field came from."""

    messages: list[dict]
    fields: dict[str, str] = field(default_factory=dict)  # schema path -> the user's field path
    train_from: int = 0  # assistant messages before this index are context, not trained (prompt_completion)
    text_prompt: bool = False  # the prompt field was a plain string

    def field_of(self, path: str) -> str:
        return field_of(self.fields, path)


def field_of(fields: dict[str, str], path: str) -> str:
    """The user's name for a schema path: its longest mapped prefix renamed, the rest of the path kept."""
    best = ""
    for prefix in fields:
        if len(prefix) > len(best) and (path == prefix or path.startswith((prefix + ".", prefix + "["))):
            best = prefix
    return fields[best] + path[len(best) :] if best else path


def fail(where_field: str, message: str, fix: str | None = None) -> NoReturn:
    raise ToolkitError(f"{where_field}: {message}", fix=fix)


def detect_format(raw: Any, columns: dict[str, str]) -> str | None:
    """The format of a row from its fields (None when none fits); `columns` renames the fields looked for."""
    if not isinstance(raw, dict):
        return None
    # before the conversation formats: UltraFeedback's pairs also carry a `messages` list, and KTO rows a completion
    if columns.get("chosen", "chosen") in raw and columns.get("rejected", "rejected") in raw:
        return "preference"
    if columns.get("completion", "completion") in raw and columns.get("label", "label") in raw:
        return "kto"
    # LLaMA-Factory's KTO rows: a whole conversation and a true / false label (its kto_tag); only a bool says so,
    # since a `label` beside a conversation may be anything else
    if isinstance(raw.get(columns.get("label", "label")), bool) and conversation_field(raw, columns):
        return "kto"
    named = columns.get("messages")
    for key in [named] if named else ["messages", "conversations"]:
        turns = raw.get(key)
        if isinstance(turns, list):
            first = next((t for t in turns if isinstance(t, dict)), {})
            sharegpt = ("from" in first or "value" in first) and "role" not in first
            return "sharegpt" if sharegpt or (key == "conversations" and "role" not in first) else "messages"
    if columns.get("instruction", "instruction") in raw:  # (without `output`: a prompt row, for grpo)
        return "alpaca"
    if columns.get("prompt", "prompt") in raw and columns.get("completion", "completion") in raw:
        return "prompt_completion"
    if columns.get("prompt", "prompt") in raw:
        return "prompt"
    return None


def conversation_field(raw: dict, columns: dict[str, str]) -> str | None:
    """The field holding a row's conversation: data.columns.messages, else `messages` or `conversations`."""
    named = columns.get("messages")
    return next(
        (k for k in ([named] if named else ["messages", "conversations"]) if isinstance(raw.get(k), list)), None
    )


# ------------------------------------------------------------------------------------------------------ images


def _data_uri(data: bytes) -> str:
    # the mime type is informational (images.py opens whatever PIL reads); sniff the common ones for readability
    kind = next((m for sig, m in _MAGIC if data.startswith(sig)), "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"RIFF", "image/webp"))


def image_url(value: Any, where_field: str) -> str:
    """An image as the schema carries it: a URL or path string (loaded later under the data's ImagePolicy)."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):  # the `datasets` Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return image_url(value["bytes"], where_field)
        if isinstance(value.get("path"), str) and value["path"]:
            return value["path"]
    if isinstance(value, bytes | bytearray):
        return _data_uri(bytes(value))
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image, as `datasets` decodes the Image feature
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")  # lossless: the processor sees the same pixels
        return _data_uri(buf.getvalue())
    fail(
        where_field,
        f"expected an image path or URL, a {{'bytes', 'path'}} dict or an image (got {type(value).__name__})",
    )


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _split_markers(text: str) -> list[str | None]:
    """Text around <image> markers: pieces and None for each marker; whitespace next to a marker is dropped
    (Gemma 3's image sequence brings its own blank lines; the template trims text parts anyway)."""
    pieces = text.split(MARKER)
    out: list[str | None] = []
    for i, piece in enumerate(pieces):
        if i:
            out.append(None)
            piece = piece.lstrip()
        if i < len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            out.append(piece)
    return out


# ----------------------------------------------------------------------------------------------- conversation


@dataclass
class _Msg:
    data: dict
    field: str  # the user's field of the whole message
    role_field: str
    content_field: str
    part_fields: list[str] = field(default_factory=list)  # per part, when content is a list


@dataclass
class Builder:
    """Collects converted messages, the image slots in order, and the field of everything it made."""

    images: list[tuple[Any, str]]  # (value, user's field) from the images column
    markers: bool  # split <image> markers in text into image slots
    msgs: list[_Msg] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)  # (message, part) of each image slot, in order

    def text_content(self, text: Any, where_field: str) -> tuple[Any, list[str]]:
        """String content -> itself, or parts when it holds <image> markers that images fill."""
        if not (self.markers and isinstance(text, str) and MARKER in text):
            return text, []
        parts, fields = [], []
        for piece in _split_markers(text):
            if piece is None:
                self.slots.append((len(self.msgs), len(parts)))
                parts.append(_image_part(""))
            else:
                parts.append({"type": "text", "text": piece})
            fields.append(where_field)
        return parts, fields

    def list_content(self, parts: list, where_field: str) -> tuple[list, list[str]]:
        """TRL / processor-style parts -> schema parts; `"text": null` and other null keys are dropped."""
        out, fields = [], []
        for j, part in enumerate(parts):
            pf = f"{where_field}[{j}]"
            if isinstance(part, dict):
                part = {k: v for k, v in part.items() if v is not None}
                if part.get("type") == "image":
                    source = next((part[k] for k in ("url", "path", "image") if k in part), None)
                    if source is not None:
                        key = next(k for k in ("url", "path", "image") if k in part)
                        part = _image_part(image_url(source, f"{pf}.{key}"))
                        pf = f"{pf}.{key}"
                    else:
                        extra = sorted(set(part) - {"type"})  # TRL's `"text": null` was dropped above
                        if extra:
                            fail(f"{pf}.{extra[0]}", "unknown field of an image placeholder")
                        part = _image_part("")
                        self.slots.append((len(self.msgs), j))
            out.append(part)
            fields.append(pf)
        return out, fields

    def add(self, role: str, content: Any, where_field: str, role_field: str, content_field: str, **extra: Any) -> None:
        if isinstance(content, list):
            content, part_fields = self.list_content(content, content_field)
        else:
            content, part_fields = self.text_content(content, content_field)
        self.msgs.append(_Msg({"role": role, "content": content, **extra}, where_field, role_field, content_field))
        self.msgs[-1].part_fields = part_fields

    def fill_images(self, images_field: str, trl_rule: bool) -> None:
        """Give each slot its image, in order; counts must agree. TRL's rule for rows with images and no
        placeholder at all: the images go first in the first user message."""
        n, k = len(self.images), len(self.slots)
        if n and not k and trl_rule:
            at = next((i for i, m in enumerate(self.msgs) if m.data["role"] == "user"), None)
            if at is not None:
                first = self.msgs[at]
                content = first.data["content"]
                if isinstance(content, str):
                    content, first.part_fields = [{"type": "text", "text": content}], [first.content_field]
                first.data["content"] = [_image_part("") for _ in range(n)] + content
                first.part_fields = [images_field] * n + first.part_fields
                self.slots = [(at, j) for j in range(n)]
                k = n
        if n != k:
            what = "<image> markers" if not trl_rule else 'image places ({"type": "image"} parts or <image> markers)'
            fail(
                images_field,
                f"{n} image(s) given but the conversation has {k} {what}",
                fix="give one image per placeholder, in order",
            )
        for (i, j), (value, vf) in zip(self.slots, self.images, strict=True):
            self.msgs[i].data["content"][j]["image_url"]["url"] = image_url(value, vf)
            self.msgs[i].part_fields[j] = vf  # errors about this image name the images column's entry

    def result(self, list_field: str, train_from: int = 0) -> Converted:
        fields = {"messages": list_field}
        for i, m in enumerate(self.msgs):
            fields[f"messages[{i}]"] = m.field
            fields[f"messages[{i}].role"] = m.role_field
            fields[f"messages[{i}].content"] = m.content_field
            for j, pf in enumerate(m.part_fields):
                fields[f"messages[{i}].content[{j}]"] = pf
        return Converted([m.data for m in self.msgs], fields, train_from)


def images_of(raw: dict, cols: dict[str, str], llava: bool) -> tuple[list[tuple[Any, str]], str]:
    """[(image, its field)] from the images column (`images`; for LLaVA rows also a single `image`)."""
    name = cols["images"]
    if name not in raw and llava and "image" in raw:
        name = "image"
    value = raw.get(name)
    if value is None:
        return [], name
    if isinstance(value, list):
        return [(v, f"{name}[{k}]") for k, v in enumerate(value)], name
    return [(value, name)], name


def _role(value: Any, where_field: str, roles: dict[str, str], defaults: dict[str, str]) -> str:
    if isinstance(value, str):
        if value in roles:
            return roles[value]
        if value in ROLES:
            return value
        if value in defaults:
            return defaults[value]
        if value in _TOOL_ROLES:
            fail(where_field.rsplit(".", 1)[0], TOOLS_UNSUPPORTED)
    example = value if isinstance(value, str) and value.isidentifier() else "bot"
    fail(where_field, f"{value!r} is not a known role; map it with data.roles", fix=FIX_ROLES.format(example))


def add_turns(
    b: Builder, turns: Any, list_field: str, cols: dict, roles: dict, *, sharegpt: bool = False, start: int = 0
) -> None:
    """Add a list of role/content (or ShareGPT from/value) turns; `start`: the index of turns[0] in the user's list
    (a preference row's answer is the last turn of its list)."""
    if not isinstance(turns, list):
        fail(list_field, "must be a list of messages")
    for i, turn in enumerate(turns, start=start):
        add_turn(b, turn, f"{list_field}[{i}]", cols, roles, sharegpt=sharegpt)


def add_turn(b: Builder, turn: Any, where_field: str, cols: dict, roles: dict, *, sharegpt: bool = False) -> None:
    """Add one role/content (or ShareGPT from/value) turn whose field is `where_field`."""
    f, rk, ck = where_field, cols["role"], cols["content"]
    if not isinstance(turn, dict):
        fail(f, "must be an object")
    if rk not in turn:
        fail(f, f"has no {rk!r} field" + ("" if rk == "role" else " (data.columns.role)"))
    role = _role(turn[rk], f"{f}.{rk}", roles, SHAREGPT_ROLES if sharegpt else {})
    # OpenAI-style rows keep their other keys (name, tool_calls...) for the schema to check; ShareGPT turns
    # carry only from/value (other keys, like FastChat's "markdown", are not part of the conversation)
    extra = {} if sharegpt else {k: v for k, v in turn.items() if k not in (rk, ck) and v is not None}
    if ck not in turn:
        fail(f, f"has no {ck!r} field" + ("" if ck == "content" else " (data.columns.content)"))
    b.add(role, turn[ck], f, f"{f}.{rk}", f"{f}.{ck}", **extra)


def add_history(b: Builder, raw: dict, hf: str) -> None:
    """Alpaca's `history`: [user, assistant] pairs of strings before the instruction (LLaMA-Factory)."""
    history = raw.get(hf) or []
    if not isinstance(history, list):
        fail(hf, "must be a list of [user, assistant] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            fail(f"{hf}[{k}]", "must be a [user, assistant] pair of strings")
        b.add("user", pair[0], f"{hf}[{k}]", f"{hf}[{k}]", f"{hf}[{k}][0]")
        b.add("assistant", pair[1], f"{hf}[{k}]", f"{hf}[{k}]", f"{hf}[{k}][1]")


def str_field(raw: dict, key: str, *, required: bool) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        fail(key, "is missing" if key not in raw else f"must be a string (got {type(value).__name__})")
    return value


def extra_columns(raw: dict, fmt: str, columns: dict[str, str]) -> dict[str, Any]:
    """A prompt row's fields that the door did not turn into the conversation (`answer`, `schema`, an alpaca
    `output`...): what GRPO's reward functions read, as TRL passes a dataset's other columns."""
    cols = {**DEFAULT_COLUMNS[fmt], **columns}
    used = {cols[k] for k in ("messages", "prompt", "images", "system", "instruction", "input", "history") if k in cols}
    if fmt == "sharegpt":
        used.add("image")  # LLaVA's single image
    return {k: v for k, v in raw.items() if k not in used}


def convert_row(
    raw: dict, fmt: str, columns: dict[str, str], roles: dict[str, str], *, prompt_only: bool = False
) -> Converted:
    """One row of format `fmt` -> the schema's raw messages and field map; raises ToolkitError("field: what").
    `prompt_only` (grpo): the conversation is the prompt; an alpaca row's `output`, if any, is not part of it."""
    cols = {**DEFAULT_COLUMNS[fmt], **columns}
    images, images_field = images_of(raw, cols, llava=fmt == "sharegpt" and "images" not in columns)
    if fmt in ("messages", "sharegpt"):
        list_field = cols["messages"]
        if not isinstance(raw.get(list_field), list):
            fail(list_field, "must be a list of messages" if list_field in raw else "is missing")
        sharegpt = fmt == "sharegpt"
        b = Builder(images, markers=sharegpt or bool(images))
        system = raw.get(cols["system"]) if sharegpt or "system" in columns else None
        if system is not None and system != "":
            b.add("system", system, cols["system"], cols["system"], cols["system"])
        add_turns(b, raw[list_field], list_field, cols, roles, sharegpt=sharegpt)
        b.fill_images(images_field, trl_rule=not sharegpt)
        return b.result(list_field)
    if fmt == "alpaca":
        b = Builder(images, markers=True)
        system = str_field(raw, cols["system"], required=False)
        if system:
            b.add("system", system, cols["system"], cols["system"], cols["system"])
        add_history(b, raw, cols["history"])
        instruction = str_field(raw, cols["instruction"], required=True)
        query = str_field(raw, cols["input"], required=False)
        user = "\n".join(t for t in (instruction, query) if t)  # LLaMA-Factory's rule: input only when not empty
        b.add("user", user, cols["instruction"], cols["instruction"], cols["instruction"])
        if not prompt_only:
            output = str_field(raw, cols["output"], required=True)
            b.add("assistant", output, cols["output"], cols["output"], cols["output"])
        b.fill_images(images_field, trl_rule=False)
        return b.result(cols["instruction"])
    if fmt == "prompt_completion":
        b = Builder(images, markers=bool(images))
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            name = cols[key]
            if name not in raw:
                fail(name, "is missing")
            if isinstance(raw[name], str):
                b.add(role, raw[name], name, name, name)
            else:
                add_turns(b, raw[name], name, cols, roles)
            if key == "prompt":
                train_from = len(b.msgs)
        b.fill_images(images_field, trl_rule=True)
        return b.result(cols["prompt"], train_from)
    if fmt == "prompt":
        name = cols["prompt"]
        if name not in raw:
            fail(name, "is missing")
        b = Builder(images, markers=bool(images))
        system = str_field(raw, cols["system"], required=False) if "system" in columns else None
        if system:
            b.add("system", system, cols["system"], cols["system"], cols["system"])
        text = isinstance(raw[name], str)
        if text:
            b.add("user", raw[name], name, name, name)
        else:
            add_turns(b, raw[name], name, cols, roles)
        b.fill_images(images_field, trl_rule=True)
        converted = b.result(name)
        converted.text_prompt = text
        return converted
    raise ValueError(f"unknown format {fmt!r}")

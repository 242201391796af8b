"""The one message schema: the model card's chat `messages`, for training rows, eval rows and HTTP requests.

system / developer / user / assistant messages; user content is a string or a list of `{"type": "text", "text"}`
and `{"type": "image_url", "image_url": {"url"}}` parts; system, developer and assistant content is text only.
`developer` is OpenAI's newer name for `system`: it is accepted wherever system is (the leading instruction
messages, any mix and order), and the template merges them, in order, into Gemma 3's one system turn. No tool calls.
`check_messages` parses and checks a raw list and returns every problem with its field path
(`messages[1].content[0].type`), so callers can report them as rows (file:row) or as HTTP errors (param).
This module does not know the chat template (template.py), how images are fetched (images.py) or which file
format a row came in (formats.py converts every format into this schema before it is checked here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from toolkit.errors import ToolkitError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Content must say something: a string with a character str.strip() keeps, or at least one part. Declared for
# the request schema (OpenAPI) only: _conversation_problems checks it ("is empty") with every other problem of the
# conversation, where a failed parse would stop at the first. \x1c-\x1f: whitespace to Python, not to JSON Schema.
NON_BLANK = r"[^\s\x1c-\x1f]"
Said = Annotated[str, Field(json_schema_extra={"pattern": NON_BLANK})]


# A conversation needs a user turn (it must end with one): declared as JSON Schema's `contains`, checked with the
# conversation (_conversation_problems: "needs a user message", "the last message must be from the user").
HAS_USER_TURN = {"contains": {"type": "object", "required": ["role"], "properties": {"role": {"const": "user"}}}}


def parts(part: Any) -> Any:
    """A content list of `part`s: at least one, declared like NON_BLANK (checked with the conversation)."""
    return Annotated[list[part], Field(json_schema_extra={"minItems": 1})]


class CacheBreakpoint(_Strict):
    mode: Literal["explicit"] = "explicit"


class _Part(_Strict):
    # OpenAI's prompt-cache marker on a part: accepted so OpenAI clients work; no effect (no prompt cache)
    prompt_cache_breakpoint: CacheBreakpoint | None = Field(None, description="accepted; no effect (no prompt cache)")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="data: URI, http(s) URL, or a path (training data: relative to the file)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted for OpenAI clients; ignored")


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


def _part_tag(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return {"text": "text-part", "image_url": "image-part"}.get(kind) if isinstance(kind, str) else None


UserPart = Annotated[
    Annotated[TextPart, Tag("text-part")] | Annotated[ImagePart, Tag("image-part")],
    Discriminator(
        _part_tag,
        custom_error_type="part_type",
        custom_error_message="content part type must be 'text' or 'image_url'",
    ),
]


TextParts = parts(TextPart)


class SystemMessage(_Strict):
    role: Literal["system"]
    content: Said | TextParts
    name: str | None = None


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: Said | TextParts
    name: str | None = None


INSTRUCTION_ROLES = ("system", "developer")  # the leading messages that become Gemma 3's system turn


class UserMessage(_Strict):
    role: Literal["user"]
    content: Said | parts(UserPart)
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Said | TextParts
    name: str | None = None


def _role_tag(v: Any) -> str | None:
    role = v.get("role") if isinstance(v, dict) else getattr(v, "role", None)
    tags = {
        "system": "system-message",
        "developer": "developer-message",
        "user": "user-message",
        "assistant": "assistant-message",
    }
    return tags.get(role) if isinstance(role, str) else None  # found by fuzzing: {"role": {}} is unhashable


Message = Annotated[  # the user's first: what a conversation needs (and what schema-driven generators try first)
    Annotated[UserMessage, Tag("user-message")]
    | Annotated[AssistantMessage, Tag("assistant-message")]
    | Annotated[SystemMessage, Tag("system-message")]
    | Annotated[DeveloperMessage, Tag("developer-message")],
    Discriminator(
        _role_tag,
        custom_error_type="role",
        custom_error_message="role must be 'system', 'developer', 'user' or 'assistant'",
    ),
]


class Messages(BaseModel):
    """The `messages` array, parsed."""

    messages: list[Message]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a messages array: where (a field path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


TOOLS_UNSUPPORTED = "tool calling is not supported by this model (no tools, tool messages or tool_calls)"

# pydantic puts union-branch labels into error locations; they are not fields a user wrote. Our unions' tags end in
# -part, -message or -item (no field name has a hyphen); the rest are pydantic's names for a branch's type.
_BRANCH_LABELS = {"str", "int", "bool", "float", "[key]"}
_BRANCH_SUFFIXES = ("-part", "-message", "-item")
_BRANCH_PREFIXES = ("list[", "dict[", "function-", "constrained-", "nullable[")


def _path(loc: tuple) -> str:
    out = ""
    for item in (x for x in loc if x != "body"):  # FastAPI prefixes request-body errors with "body"
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _BRANCH_LABELS or str(item).startswith(_BRANCH_PREFIXES) or str(item).endswith(_BRANCH_SUFFIXES):
            continue
        else:
            out += f".{item}" if out else str(item)
    return out


def problems_from_errors(errors: list[dict]) -> list[Problem]:
    """pydantic error dicts -> Problems with user-facing paths (used for rows and for HTTP request bodies)."""
    problems: dict[str, Problem] = {}
    # A union reports every branch at the same path: a branch whose type matched and whose value broke a bound
    # ("at most 4 items") says more than the others' "not a string", so it is the one kept for that path.
    rank: dict[str, bool] = {}
    for e in errors:
        path = _path(e["loc"])
        msg = e["msg"]
        if e["loc"] and e["loc"][-1] == "[key]":  # a dict key that broke its pattern (logit_bias)
            msg = f"the key {e['loc'][-2]!r}: {msg}"
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        # `str | list` unions report both branches; keep the first problem per path (the list branch's
        # detail comes with a deeper path) and say what the union accepts.
        if e["type"] in ("string_type", "list_type") and path.endswith("content"):
            msg = "content must be a string or a list of content parts"
        is_type = e["type"].endswith("_type")
        if path not in problems or (rank[path] and not is_type):  # first per path, unless a better one comes
            problems[path], rank[path] = Problem(path, msg), is_type
    # A list with a bad part also fails the string branch; the part's own problem is the useful one.
    return [p for p in problems.values() if not any(q.path.startswith(p.path + "[") for q in problems.values())]


def text_of(content: str | list) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if isinstance(p, TextPart))


def image_urls(messages: list) -> list[tuple[str, str]]:
    """(field path, url) of every image part, in order."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            out += [
                (f"messages[{i}].content[{j}]", p.image_url.url)
                for j, p in enumerate(m.content)
                if isinstance(p, ImagePart)
            ]
    return out


def leading_instructions(messages: list) -> int:
    """How many system / developer messages open the conversation (they form one system turn)."""
    n = 0
    while n < len(messages) and messages[n].role in INSTRUCTION_ROLES:
        n += 1
    return n


def _conversation_problems(messages: list, purpose: str, max_images: int | None) -> list[Problem]:
    problems = []
    if not messages:
        return [Problem("messages", "must contain at least one message")]
    offset = leading_instructions(messages)
    turns = messages[offset:]
    for i, m in enumerate(turns, start=offset):
        if m.role in INSTRUCTION_ROLES:
            problems.append(
                Problem(f"messages[{i}].role", f"a {m.role} message may only come first (before the first user turn)")
            )
    for k, m in enumerate(turns):
        want = "user" if k % 2 == 0 else "assistant"
        if m.role not in INSTRUCTION_ROLES and m.role != want:
            problems.append(
                Problem(
                    f"messages[{k + offset}].role",
                    f"expected {want!r} here: after an optional system message, roles alternate user, assistant, "
                    f"user, ... (got {m.role!r})",
                )
            )
            break
    for i, m in enumerate(messages):
        has_image = isinstance(m.content, list) and any(isinstance(p, ImagePart) for p in m.content)
        if not text_of(m.content).strip() and not has_image:
            problems.append(Problem(f"messages[{i}].content", "is empty"))
    if turns and not problems:
        last = turns[-1].role
        if purpose == "train" and last != "assistant":
            problems.append(
                Problem(f"messages[{len(messages) - 1}]", "the last message must be the assistant answer to train on")
            )
        if purpose == "request" and last != "user":
            problems.append(Problem(f"messages[{len(messages) - 1}].role", "the last message must be from the user"))
    if not turns:
        problems.append(Problem("messages", "needs a user message"))
    n_images = len(image_urls(messages))
    if max_images is not None and n_images > max_images:
        problems.append(Problem("messages", f"has {n_images} images; at most {max_images} per conversation"))
    return problems


def check_messages(
    raw: Any, *, purpose: Literal["train", "request"], max_images: int | None = None
) -> tuple[list, list[Problem]]:
    """Parse a raw `messages` value; return (messages, problems). `purpose`: training/eval row or request."""
    if not isinstance(raw, list):
        return [], [Problem("messages", "must be a list of messages")]
    tool_problems = [
        Problem(f"messages[{i}]", TOOLS_UNSUPPORTED)
        for i, m in enumerate(raw)
        if isinstance(m, dict) and (m.get("role") in ("tool", "function") or "tool_calls" in m or "function_call" in m)
    ]
    if tool_problems:
        return [], tool_problems
    try:
        parsed = Messages(messages=raw).messages
    except ValidationError as err:
        return [], problems_from_errors(err.errors())
    return parsed, _conversation_problems(parsed, purpose, max_images)


def parse_messages(
    raw: Any, *, purpose: Literal["train", "request"], where: str, max_images: int | None = None
) -> list:
    """Like check_messages, but raise one ToolkitError listing every problem."""
    messages, problems = check_messages(raw, purpose=purpose, max_images=max_images)
    if problems:
        raise ToolkitError("; ".join(map(str, problems)), where=where, fix=FIX_HINT)
    return messages


FIX_HINT = (
    'a row is {"messages": [{"role": "system"|"developer"|"user"|"assistant", "content": "..." or '
    '[{"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url": ...}}]}, ...]}'
)

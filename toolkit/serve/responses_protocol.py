"""Request model of /v1/responses (OpenAI's Responses API), and the refusal rules for its fields.

Like protocol.py for chat: every field either changes the answer as documented (docs/API.md, "Responses"), is
accepted and changes nothing (`user`, `metadata`, `service_tier`, `tools: []`, ...), or is refused with a 400
naming it. Unknown fields are ignored, as OpenAI does. Input items are parsed here; turning them into the one
message schema is the door's job (responses.py). This module knows no engine and no HTTP.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from toolkit.data.schema import HAS_USER_TURN, TOOLS_UNSUPPORTED, Said, parts
from toolkit.serve.protocol import MAX_LOGPROBS, NOT_IMPLEMENTED, BadField, Refused, ToolsNotSupported, integer

# OpenAI's `include` values. Only the logprobs one changes what this server returns; the others ask for parts
# of tool calls, reasoning items or echoed input images, which this server never produces: nothing to add.
Includable = Literal[
    "message.output_text.logprobs",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
]
LOGPROBS_INCLUDE = get_args(Includable)[0]
# Fields that would change the answer and are not implemented: refused unless absent or at a value that changes
# nothing (the second element). `tools`, `tool_choice` and input items are checked apart (tool calling).
REFUSED: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "context_management": (None, []),
    "moderation": (None,),
    "truncation": (None, "disabled"),
}
MESSAGE_ROLES = ("user", "assistant", "system", "developer")


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputText(_Part):
    type: Literal["input_text"]
    text: str


class InputImage(_Part):
    type: Literal["input_image"]
    image_url: str = Field(min_length=1, description="data: URI or http(s) URL (the same fetch rules as chat)")
    detail: Literal["auto", "low", "high", "original"] | None = Field(None, description="accepted; ignored")
    file_id: None = Field(None, description="refused: send image_url (uploaded files are not kept)")


class OutputText(_Part):
    """Text of an earlier assistant output item sent back as conversation history."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class RefusalPart(_Part):
    type: Literal["refusal"]
    refusal: str


class _Item(BaseModel):
    """A message input item: OpenAI's EasyInputMessage, InputMessage, or an earlier OutputMessage (assistant)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    id: str | None = None
    status: str | None = None


def _part_tag(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return f"{kind}-part" if isinstance(kind, str) else None  # "-part": error paths leave the tag out


UserPart = Annotated[
    Annotated[InputText, Tag("input_text-part")] | Annotated[InputImage, Tag("input_image-part")],
    Discriminator(_part_tag),
]
TextPart = Annotated[
    Annotated[InputText, Tag("input_text-part")]
    | Annotated[OutputText, Tag("output_text-part")]
    | Annotated[RefusalPart, Tag("refusal-part")],
    Discriminator(_part_tag),
]


class UserItem(_Item):
    role: Literal["user"]
    content: Said | parts(UserPart)


class TextItem(_Item):
    """Instructions (system, developer) and earlier answers (assistant): text only."""

    role: Literal["assistant", "system", "developer"]
    content: Said | parts(TextPart)


def _item_tag(v: Any) -> str:
    role = v.get("role") if isinstance(v, dict) else getattr(v, "role", None)
    return "user-item" if role == "user" else "text-item"


MessageItem = Annotated[
    Annotated[UserItem, Tag("user-item")] | Annotated[TextItem, Tag("text-item")], Discriminator(_item_tag)
]


class FormatText(BaseModel):
    type: Literal["text"]


class FormatJSONObject(BaseModel):
    type: Literal["json_object"]


class FormatJSONSchema(BaseModel):
    type: Literal["json_schema"]
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = Field(None, strict=True, description="either way the schema is enforced token by token")
    model_config = ConfigDict(populate_by_name=True)


class TextConfig(BaseModel):
    format: FormatText | FormatJSONObject | FormatJSONSchema | None = Field(None, discriminator="type")
    verbosity: Literal["medium"] | None = Field(None, description="only the default: other values are refused")


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI's API does

    model: str | None = None
    input: Said | Annotated[list[MessageItem], Field(min_length=1, json_schema_extra=HAS_USER_TURN)] = Field(
        description="a string (one user message) or a list of message items"
    )
    instructions: str | None = Field(None, description="becomes the system turn (before any system/developer items)")
    max_output_tokens: integer(ge=1) | None = None
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, ge=0, le=1, strict=True)
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    include: list[Includable] | None = Field(None, description=f"{LOGPROBS_INCLUDE!r} returns log probabilities")
    text: TextConfig | None = None
    stream: bool = Field(False, strict=True)
    stream_options: dict[str, Any] | None = Field(None, description="accepted; no effect")
    metadata: dict[str, str] | None = Field(None, description="echoed in the response")
    user: str | None = Field(None, description="accepted; no effect")
    store: bool | None = Field(
        None, strict=True, description="keep the response for GET and previous_response_id (default true)"
    )
    previous_response_id: str | None = Field(None, description="continue a stored response's conversation")
    tools: list[Any] | None = Field(None, max_length=0, description="only [] (no tool calling)")
    tool_choice: Literal["auto", "none"] | None = Field(None, description="auto or none (no tools)")
    parallel_tool_calls: bool | None = Field(None, strict=True, description="accepted; no effect (no tools)")
    max_tool_calls: integer() | None = Field(None, description="accepted; no effect (no tools)")
    truncation: Literal["disabled"] | None = Field(None, description="only 'disabled' (too long: 400)")
    reasoning: dict[str, None] | None = Field(None, description="only null or all-null fields (no reasoning)")
    service_tier: str | None = Field(None, description="accepted; no effect")
    safety_identifier: str | None = Field(None, description="accepted; no effect")
    prompt_cache_key: str | None = Field(None, description="accepted; no effect")
    prompt_cache_retention: str | None = Field(None, description="accepted; no effect")

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("tools") not in (None, []):
            raise ToolsNotSupported("tools", TOOLS_UNSUPPORTED)
        if data.get("tool_choice") not in (None, "auto", "none"):
            raise ToolsNotSupported("tool_choice", TOOLS_UNSUPPORTED)
        for name, harmless in REFUSED.items():
            if name in data and data[name] not in harmless:
                raise Refused(name, f"{NOT_IMPLEMENTED} (send it unset, or see docs/API.md)")
        reasoning = data.get("reasoning")
        if reasoning is not None and (
            not isinstance(reasoning, dict) or any(v is not None for v in reasoning.values())
        ):
            raise Refused("reasoning", f"{NOT_IMPLEMENTED}: Gemma 3 has no reasoning mode")
        text = data.get("text")
        if isinstance(text, dict) and text.get("verbosity") not in (None, "medium"):
            raise Refused("text.verbosity", f"{NOT_IMPLEMENTED} (only the default, medium)")
        if isinstance(data.get("input"), list):
            for i, item in enumerate(data["input"]):
                _check_item(item, f"input[{i}]")
        return data


def _check_item(item: Any, where: str) -> None:
    """Refuse tool-call items and parts this server cannot honour, naming them (before pydantic's generic errors)."""
    if not isinstance(item, dict):
        raise BadField(where, "must be a message item object")
    kind = item.get("type", "message")
    if kind != "message":
        if isinstance(kind, str) and ("call" in kind or kind in ("reasoning", "item_reference", "compaction")):
            raise ToolsNotSupported(f"{where}.type", f"{kind!r} items are not supported: {TOOLS_UNSUPPORTED}")
        raise BadField(f"{where}.type", f"must be 'message' (got {kind!r})")
    if item.get("role") not in MESSAGE_ROLES:
        raise BadField(f"{where}.role", f"must be one of {', '.join(MESSAGE_ROLES)} (got {item.get('role')!r})")
    content = item.get("content")
    if not isinstance(content, list):
        return
    allowed = ("input_text", "input_image") if item["role"] == "user" else ("input_text", "output_text", "refusal")
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_file":
            raise Refused(f"{at}.type", f"input_file {NOT_IMPLEMENTED} (send text or images)")
        if kind == "input_image" and item["role"] == "user" and part.get("file_id") is not None:
            raise Refused(f"{at}.file_id", f"{NOT_IMPLEMENTED} (send image_url as a data: URI or an http(s) URL)")
        if kind == "input_image" and item["role"] == "user" and not part.get("image_url"):
            raise BadField(f"{at}.image_url", "is required")
        if kind not in allowed:
            raise BadField(f"{at}.type", f"a {item['role']} message's parts must be {' or '.join(allowed)}")

"""Request and response models of /v1/chat/completions and /v1/completions: the model card's fields, OpenAI's,
and the vLLM extensions users send. These models are the OpenAPI document, so a fuzzer explores the real schema.

Every field either changes the answer as documented (docs/API.md), is accepted and has no effect on the
answer (`user`, `metadata`, `store`, ...), or is refused with a 400 naming it (`REFUSED`): nothing a client
sends that would change the answer is silently ignored. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from toolkit.data.schema import HAS_USER_TURN, TOOLS_UNSUPPORTED, Message
from toolkit.lora.registry import ADAPTER_NAME

MAX_N = 16
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit (vLLM's default max_logprobs is 20 too)
MAX_STOPS = 4  # OpenAI's limit on stop strings
TOOL_FIELDS = ("tools", "functions", "function_call")
INT64 = 2**63  # OpenAI's seed range (int64); a torch generator takes seed + choice index up to 2**64 - 1
TOKEN_ID = r"^[0-9]{1,9}$"  # a logit_bias key; the served /openapi.json narrows it to the vocabulary (openapi.py)
GUIDES = ("guided_json", "guided_regex", "guided_choice")

# Fields of OpenAI's or vLLM's requests that would change the answer and are not implemented: refused with a 400
# naming them unless absent or at a value that changes nothing (the second element).
REFUSED: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "add_special_tokens": (None, False),
    "documents": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "priority": (None, 0),
    "spaces_between_special_tokens": (None, True),
}
# OpenAI's chat moderation may block the answer: not implemented (the Responses door refuses it too)
CHAT_REFUSED = {**REFUSED, "echo": (None, False), "moderation": (None,)}
# Accepted and without effect on the answer (nothing is stored, no tiers, no prompt cache to key)
NO_EFFECT = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
)
COMPLETION_REFUSED = {**REFUSED, "suffix": (None, "")}
NOT_IMPLEMENTED = "is not supported by this server"


class Refused(ValueError):
    """A request field this server does not implement (-> 400 naming it, code `unsupported_parameter`)."""

    code = "unsupported_parameter"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class ToolsNotSupported(Refused):
    code = "tools_not_supported"


class BadField(Refused):
    """A field whose value is wrong in a way only the whole request shows (-> 400 naming it)."""

    code = None


def _refuse(data: dict, table: dict[str, tuple[Any, ...]]) -> None:
    for name, harmless in table.items():
        if name in data and not any(data[name] == h and type(data[name]) is type(h) for h in harmless):
            if data[name] is None and None in harmless:
                continue
            raise Refused(name, f"{NOT_IMPLEMENTED} (send it unset, or see docs/API.md)")
    if data.get("best_of") not in (None, data.get("n", 1)):
        raise Refused("best_of", f"{NOT_IMPLEMENTED} (best_of must equal n; use n)")


def _json_integer(v: Any) -> Any:
    # JSON Schema's "integer" includes 2.0 (generated clients and fuzzers send it); "2" and true are not integers
    if isinstance(v, float) and v.is_integer() and abs(v) < INT64:
        return int(v)
    return v


def integer(**bounds: Any) -> Any:
    """An integer field as JSON Schema and OpenAI mean it (2 or 2.0, never "2" or true), within `bounds` (ge, le,
    lt), which the OpenAPI document declares."""
    return Annotated[int, Field(strict=True, **bounds), BeforeValidator(_json_integer)]


def _set(name: str) -> dict:
    """JSON Schema: `name` is present and not null (a null field is an absent one here)."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def _excludes(*pairs: tuple[dict, dict]) -> dict:
    """JSON Schema for "no two of these together", as the request's validators enforce it."""
    return {"not": {"anyOf": [{"allOf": [a, b]} for a, b in pairs]}}


def _no_tools(data: dict) -> None:
    for name in TOOL_FIELDS:
        if data.get(name) not in (None, [], ""):
            raise ToolsNotSupported(name, TOOLS_UNSUPPORTED)
    if data.get("tool_choice") not in (None, "none", "auto", ""):  # "none"/"auto" without tools change nothing
        raise ToolsNotSupported("tool_choice", TOOLS_UNSUPPORTED)
    if data.get("parallel_tool_calls") not in (None, True, False):
        raise ToolsNotSupported("parallel_tool_calls", TOOLS_UNSUPPORTED)


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, strict=True)
    continuous_usage_stats: bool = Field(False, strict=True, description="vLLM's extension: usage in every chunk")


class JSONSchemaFormat(BaseModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = Field(None, strict=True)
    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema (token by token)."""

    model_config = ConfigDict(
        json_schema_extra={"if": {"properties": {"type": {"const": "json_schema"}}}, "then": _set("json_schema")}
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise BadField("response_format.json_schema", "required when type is 'json_schema'")
        return self


Stop = Annotated[str, Field(min_length=1)]
TokenId = integer(ge=0)
Bias = Annotated[float, Field(ge=-100, le=100, strict=True)]
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=TOKEN_ID)], Bias],
    # pydantic writes key patterns as patternProperties, which leave other keys open; the server refuses them
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": TOKEN_ID},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        }
    ),
]
_CONSTRAINED = {  # a response_format that constrains the answer (type "text" does not)
    "required": ["response_format"],
    "properties": {
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": ["json_object", "json_schema"]}},
        }
    },
}
# What the validators enforce across fields, declared in the OpenAPI document for clients and fuzzers
ONE_GUIDE = _excludes(
    *[(_set(a), _set(b)) for i, a in enumerate(GUIDES) for b in GUIDES[i + 1 :]],
    *[(_set(g), _CONSTRAINED) for g in GUIDES],
)


class SamplingFields(BaseModel):
    """The sampling fields chat and completions share (OpenAI's, then vLLM's extensions); see docs/API.md."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI's API does

    model: str | None = Field(None, description="the base's name or an adapter's (GET /v1/models)")
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float = Field(1.0, ge=0, le=1, strict=True)
    n: integer(ge=1, le=MAX_N) = 1
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, strict=True)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, strict=True)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"up to {MAX_STOPS} non-empty stop strings"
    )
    seed: integer(ge=-INT64, lt=INT64) | None = None
    logit_bias: LogitBias | None = Field(None, description="token id (as a string) -> bias in -100..100")
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, description="accepted; no effect")
    # vLLM's extensions
    ignore_eos: bool = Field(False, strict=True, description="generate max_tokens, past stop tokens")
    top_k: integer(ge=-1) = Field(0, description="0 or -1: off")
    min_p: float = Field(0.0, ge=0, le=1, strict=True)
    repetition_penalty: float = Field(1.0, gt=0, le=10, strict=True)
    min_tokens: integer(ge=0) = Field(0, description="stop tokens and strings wait for this many tokens")
    stop_token_ids: list[TokenId] | None = Field(None, description="extra token ids that end a choice")
    include_stop_str_in_output: bool = Field(False, strict=True)
    skip_special_tokens: bool = Field(True, strict=True)
    prompt_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: a JSON schema to follow")
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression to follow")
    guided_choice: list[str] | None = Field(None, description="vLLM's: answer with one of these strings")

    @model_validator(mode="after")
    def _checks(self) -> SamplingFields:
        guides = [g for g in GUIDES if getattr(self, g) is not None]
        if len(guides) + (self.response_format is not None and self.response_format.type != "text") > 1:
            raise BadField("response_format", "send one of response_format, guided_json, guided_regex, guided_choice")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# top_logprobs asks for alternatives of the chosen tokens' log probabilities: only with logprobs true
TOP_NEEDS_LOGPROBS = {
    "if": _set("top_logprobs"),
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [ONE_GUIDE, TOP_NEEDS_LOGPROBS]})

    messages: list[Message] = Field(min_length=1, json_schema_extra=HAS_USER_TURN)
    max_tokens: integer(ge=1) | None = None
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool | None = Field(False, strict=True)
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    metadata: dict[str, str] | None = Field(None, description="accepted; no effect")
    store: bool | None = Field(None, strict=True, description="accepted; nothing is stored")

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _no_tools(data)
            messages = data.get("messages")
            for i, m in enumerate(messages if isinstance(messages, list) else []):  # found in review: 5 was a 500
                if isinstance(m, dict) and (m.get("role") in ("tool", "function") or "tool_calls" in m):
                    raise ToolsNotSupported(f"messages[{i}]", TOOLS_UNSUPPORTED)
            _refuse(data, CHAT_REFUSED)
        return data

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadField("top_logprobs", "requires logprobs to be true")
        return self


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
# max_tokens 0 generates nothing: only for scoring the prompt (echo)
ZERO_NEEDS_ECHO = {
    "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
    "then": {"required": ["echo"], "properties": {"echo": {"const": True}}},
}


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [ONE_GUIDE, ZERO_NEEDS_ECHO]})

    prompt: Prompt = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: integer(ge=0) | None = Field(None, description="default 16; 0 only with echo (scoring)")
    echo: bool = Field(False, strict=True)
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _no_tools(data)
            _refuse(data, COMPLETION_REFUSED)
        return data

    @model_validator(mode="after")
    def _prompt(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise BadField("max_tokens", "0 is allowed only with echo (to score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a token-id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# ------------------------------------------------------------------------------------------------ responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None  # OpenAI's schema requires it (nullable)
    annotations: list = Field(default_factory=list)  # what OpenAI sends (vLLM: null, which OpenAI's schema refuses)
    audio: None = None  # nullable in OpenAI's schema, as vLLM sends it
    # function_call (deprecated) is left out: OpenAI's schema wants an object when present, so null would not do
    tool_calls: list = Field(default_factory=list)
    reasoning_content: None = None  # the model card's field


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: None = None


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: one per token id (the prompt's token and its top-k alternatives)."""

    logprob: float
    rank: int | None = Field(None, description="1 = most likely; null when outside the top-k returned")
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "toolkit"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(pattern=ADAPTER_NAME, description="the name to serve it under (no '..')")
    lora_path: str = Field(min_length=1, description="an adapter folder inside the server's adapters folder")


class UnloadLoraRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

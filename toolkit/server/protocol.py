"""Request and response models of /v1/chat/completions, exactly the model card's fields plus what OpenAI
clients commonly send. These models are the OpenAPI document, so a fuzzer explores the real schema."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from toolkit.schema import TOOLS_UNSUPPORTED, Message

MAX_N = 16
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")


INTEGER_FIELDS = ("n", "max_tokens", "max_completion_tokens", "seed")


class ToolsNotSupported(ValueError):
    pass


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields are ignored like OpenAI's API does for forward compatibility, except the tool fields.
    model_config = ConfigDict(extra="allow")

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float = Field(1.0, ge=0, le=1, strict=True)
    n: int = Field(1, ge=1, le=MAX_N, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    presence_penalty: float = Field(0.0, ge=-2, le=2, strict=True)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, strict=True)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, strict=True)
    user: str | None = None
    ignore_eos: bool = Field(False, strict=True, description="vLLM's extension: generate max_tokens, past stop tokens")

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in INTEGER_FIELDS:  # JSON Schema's "integer" includes 2.0 (fuzzers send it); "2" and true do not
                v = data.get(name)
                if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
                    data = {**data, name: int(v)}
            for name in TOOL_FIELDS:
                if data.get(name) not in (None, [], ""):
                    raise ToolsNotSupported(f"{name}: {TOOLS_UNSUPPORTED}")
            for i, m in enumerate(data.get("messages") or []):
                if isinstance(m, dict) and (m.get("role") in ("tool", "function") or "tool_calls" in m):
                    raise ToolsNotSupported(f"messages[{i}]: {TOOLS_UNSUPPORTED}")
        return data

    @model_validator(mode="after")
    def _stops(self) -> ChatCompletionRequest:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty stop strings")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    reasoning_content: None = None
    content: str
    tool_calls: list = Field(default_factory=list)


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    prompt_logprobs: None = None


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

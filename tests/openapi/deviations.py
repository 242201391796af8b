"""Where `toolkit serve` deliberately differs from OpenAI's published schemas: the model card's fields (the card
wins over OpenAI's schema, docs/API.md says so), one line of reason each. schemas.py takes exactly these out
of a body, each only in the form given here, before validating; anything else must match OpenAI's schema.

Paths: dotted keys from the body's top; `key[]` means every item of the list, `key[0]` its first item. A schema
"Name/stream" is Name for streamed chunks: Name's deviations apply too, and its own only to chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DROP = object()  # the default: take the field out of the body
FORMS = {
    "null": lambda v: v is None,
    "empty list": lambda v: v == [],
    "string, integer or null": lambda v: v is None or (isinstance(v, str | int) and not isinstance(v, bool)),
    "list or null": lambda v: v is None or isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "string or null": lambda v: v is None or isinstance(v, str),
}


@dataclass(frozen=True)
class Deviation:
    schema: str  # the OpenAI schema of the body
    path: str
    form: str  # a key of FORMS: the only value allowed to differ
    reason: str
    stand_in: Any = DROP  # a required field is not taken out but given a value OpenAI's schema accepts

    def allows(self, value: Any) -> bool:
        return FORMS[self.form](value)


CHAT, CHUNK = "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"
COMPLETION = "CreateCompletionResponse"
REASONING = "card: vLLM's reasoning field; Gemma 3 has no reasoning parser, so always null"
TOOL_CALLS = "card: vLLM always sends the list (no tool calling); OpenAI omits it when there are no calls"
STOP_REASON = "card: vLLM's stop_reason, the stop string or token id that ended the choice (null: EOS or length)"
PROMPT_LOGPROBS = "card: vLLM's prompt_logprobs (the prompt tokens' log probabilities), null unless requested"
PROMPT_DETAILS = "card: vLLM sends prompt_tokens_details null (no prompt caching); OpenAI's schema has an object"
ECHO = "OpenAI's own legacy API (and vLLM) give the first echoed prompt token no logprob: null, not a number"
MODEL_ROOT = "vLLM's /v1/models field: the base a model was served from (clients of vLLM read it)"
MODEL_PARENT = "vLLM's /v1/models field: an adapter's base model id, null for the base itself"
STREAMED = "OpenAI's own streamed legacy completions send finish_reason null until a choice ends; its schema omits it"

DEVIATIONS: list[Deviation] = [
    Deviation(CHAT, "choices[].message.reasoning_content", "null", REASONING),
    Deviation(CHAT, "choices[].message.tool_calls", "empty list", TOOL_CALLS),
    Deviation(CHAT, "choices[].stop_reason", "string, integer or null", STOP_REASON),
    Deviation(CHAT, "prompt_logprobs", "list or null", PROMPT_LOGPROBS),
    Deviation(CHAT, "usage.prompt_tokens_details", "null", PROMPT_DETAILS),
    Deviation(CHUNK, "choices[].delta.reasoning_content", "null", REASONING),
    Deviation(CHUNK, "choices[].stop_reason", "string, integer or null", STOP_REASON),
    Deviation(CHUNK, "prompt_logprobs", "list or null", PROMPT_LOGPROBS),
    Deviation(CHUNK, "usage.prompt_tokens_details", "null", PROMPT_DETAILS),
    Deviation(COMPLETION, "choices[].stop_reason", "string, integer or null", STOP_REASON),
    Deviation(COMPLETION, "choices[].prompt_logprobs", "list or null", PROMPT_LOGPROBS),
    Deviation(COMPLETION, "usage.prompt_tokens_details", "null", PROMPT_DETAILS),
    Deviation(COMPLETION, "choices[].logprobs.token_logprobs[0]", "null", ECHO),
    Deviation(COMPLETION, "choices[].logprobs.top_logprobs[0]", "null", ECHO),
    Deviation("ListModelsResponse", "data[].root", "string", MODEL_ROOT),
    Deviation("ListModelsResponse", "data[].parent", "string or null", MODEL_PARENT),
    Deviation(COMPLETION + "/stream", "choices[].finish_reason", "null", STREAMED, stand_in="stop"),
]

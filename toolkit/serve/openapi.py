"""GET /openapi.json: FastAPI's document from the protocol models, narrowed to what this server enforces.

The request models declare every fixed rule (ranges, enums, lengths, which fields exclude which). A few rules
depend on the running server: which model names exist (the base and its adapters, runtime-loaded ones too), how
many tokens a choice may ask for (`--max-tokens-limit`, else the context), which token ids exist (the
vocabulary) and, with --allow-runtime-adapters, which folders a load may name. They are written into the document
here, so a generated client or a schema fuzzer sends only what the server accepts, and the document changes when
they do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

GENERATING = ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest")
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
TOKEN_ID_FIELDS = ("stop_token_ids", "prompt")


def install(app: Any, state: Any) -> None:
    """Serve the narrowed document from `app.openapi()` (what /openapi.json returns), rebuilt when the served
    model names change."""
    generic = app.openapi  # FastAPI's: builds once, then keeps it in app.openapi_schema
    built: dict[str, Any] = {}

    def document() -> dict:
        loadable = state.runtime.loadable() if state.runtime is not None else []
        key = ((state.served_name, *state.adapters), tuple(loadable))
        if built.get("key") != key:
            built.update(key=key, doc=narrowed(generic(), state, loadable))
        return built["doc"]

    app.openapi = document


def narrowed(doc: dict, state: Any, loadable: list[str] | None = None) -> dict:
    """A copy of `doc` with the served model names, the max-tokens bound, the vocabulary and the `loadable` adapter
    folders written in."""
    doc = copy.deepcopy(doc)
    for path in doc["paths"].values():  # FastAPI documents a 422 for every body; this server answers 400
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = doc["components"]["schemas"]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    names = [state.served_name, *state.adapters]
    most = state.context_length - 1  # a prompt has at least one token
    if state.max_tokens_limit is not None:
        most = min(most, state.max_tokens_limit)
    vocab = len(state.base.tokenizer)
    for name in GENERATING:
        props = schemas[name]["properties"]
        props["model"] = {
            "anyOf": [{"type": "string", "enum": names}, {"type": "null"}],
            "description": "the base's name or an adapter's (GET /v1/models); unknown: 404",
        }
        for field in MAX_TOKENS_FIELDS:
            _write(props.get(field), lambda n: n.get("type") == "integer", maximum=most)
        for field in TOKEN_ID_FIELDS:
            _write(props.get(field), lambda n: n.get("type") == "integer" and n.get("minimum") == 0, maximum=vocab - 1)
        if "logit_bias" in props:
            _write(props["logit_bias"], lambda n: "propertyNames" in n, propertyNames={"pattern": below(vocab)})
    if loadable:  # (relative names; the server also takes their absolute paths)
        schemas["LoadLoraRequest"]["properties"]["lora_path"]["enum"] = list(loadable)
    return doc


def _write(node: Any, match: Callable[[dict], bool], **keywords: Any) -> None:
    """Add `keywords` to every schema under `node` that `match` picks."""
    for found in _walk(node):
        if match(found):
            found.update(keywords)


def _walk(node: Any) -> Iterator[dict]:
    """Every schema object under `node` (through anyOf / oneOf / allOf branches and array items)."""
    if not isinstance(node, dict):
        return
    yield node
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in node.get(key, []):
            yield from _walk(branch)
    yield from _walk(node.get("items"))


def below(n: int) -> str:
    """A regular expression for the decimal integers 0 .. n-1, without leading zeros (a token id as a JSON key).

    Written by hand: JSON Schema bounds numbers, not object keys, and no maintained library builds the pattern."""
    top = str(n - 1)
    shorter = ["0"] if len(top) > 1 else []
    if len(top) > 2:
        shorter.append(f"[1-9][0-9]{{0,{len(top) - 2}}}")
    elif len(top) == 2:
        shorter.append("[1-9]")
    same = []  # numbers of top's length, digit by digit: a smaller digit here, then any digits after
    for i, digit in enumerate(top):
        low = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > low:
            rest = len(top) - i - 1
            same.append(top[:i] + f"[{low}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    same.append(top)
    return "^(" + "|".join(shorter + same) + ")$"

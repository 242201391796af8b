"""Structured output: `response_format` (json_object, json_schema) and vLLM's guided_json / guided_regex /
guided_choice, enforced token by token by llguidance (docs/DEPENDENCIES.md says why llguidance).

`constraints(...)` turns a request into one `TokenConstraint` per choice (the engine's protocol in
toolkit/engine/sampling.py): before each token the engine asks `allowed()` for the grammar's mask, after it
feeds the sampled token to `accept()`, and ends the row when `is_done()`. The engine knows no grammar; this
module knows no HTTP beyond raising APIError for a schema the grammar compiler refuses.

`strict` (OpenAI's json_schema flag) is honoured as llguidance's `lenient` switch: strict=true compiles the
schema exactly and refuses keywords llguidance cannot enforce (400 naming them); strict=false/absent enforces
what it can and ignores the rest, as vLLM does. Output is compact JSON (no free whitespace), so a model cannot
spend its token budget on spaces.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from toolkit.errors import first_line
from toolkit.serve.errors import APIError

_TOKENIZERS: dict[int, Any] = {}
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any, stop_ids: list[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer, built once per tokenizer (about 1 s per 20k tokens
    on one core: 13 s for a 262k vocabulary, so build_state warms it up in the background)."""
    import llguidance.hf

    with _LOCK:
        key = id(tokenizer)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, eos_token=list(stop_ids)))
        return _TOKENIZERS[key][1]


def warm_up(tokenizer: Any, stop_ids: list[int]) -> threading.Thread:
    thread = threading.Thread(target=ll_tokenizer, args=(tokenizer, stop_ids), name="grammar-warmup", daemon=True)
    thread.start()
    return thread


_PROCESS_TOKENIZER: list = []  # (tokenizer, stop_ids) of an engine process (engine_process.py), set once


def use_tokenizer(tokenizer: Any, stop_ids: list[int]) -> None:
    """The tokenizer unpickled constraints compile against in this process (the engine's own process)."""
    _PROCESS_TOKENIZER[:] = [(tokenizer, list(stop_ids))]
    warm_up(tokenizer, stop_ids)


class GrammarConstraint:
    """One choice's grammar state (an llguidance matcher): the TokenConstraint the engine applies.

    It travels to an engine in another process by its grammar: a matcher that has consumed nothing yet (as at
    submission) is recompiled there against that process's tokenizer (`use_tokenizer`)."""

    def __init__(self, matcher: Any, n_vocab: int, stop_ids: list[int], grammar: str) -> None:
        self.matcher, self.n_vocab, self.stop_ids, self.grammar = matcher, n_vocab, stop_ids, grammar

    def __reduce__(self) -> tuple:
        return _recompile, (self.grammar, self.n_vocab, self.stop_ids)

    def allowed(self) -> Any:
        import numpy as np
        import torch

        if self.matcher.is_error():  # should not happen (every token fed was allowed); end the row cleanly
            mask = torch.zeros(self.n_vocab, dtype=torch.bool)
            mask[[t for t in self.stop_ids if t < self.n_vocab]] = True
            return mask
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool))

    def accept(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    def is_done(self) -> bool:
        return self.matcher.is_stopped()


def grammar_for(fields: Any) -> tuple[str, str] | None:
    """(llguidance grammar, the request field it came from) for a request's structured-output fields, or None."""
    from llguidance import LLMatcher

    rf = getattr(fields, "response_format", None)
    if rf is not None and rf.type == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_options(False)), "response_format"
    if rf is not None and rf.type == "json_schema":
        spec = rf.json_schema
        schema = spec.schema_ if spec.schema_ is not None else {}
        return LLMatcher.grammar_from_json_schema(schema, defaults=_options(bool(spec.strict))), "response_format"
    if fields.guided_json is not None:
        schema = json.loads(fields.guided_json) if isinstance(fields.guided_json, str) else fields.guided_json
        return LLMatcher.grammar_from_json_schema(schema, defaults=_options(False)), "guided_json"
    if fields.guided_regex is not None:
        return LLMatcher.grammar_from_regex(fields.guided_regex), "guided_regex"
    if fields.guided_choice is not None:
        import re

        return LLMatcher.grammar_from_regex("|".join(map(re.escape, fields.guided_choice))), "guided_choice"
    return None


def _options(strict: bool) -> dict:
    return {"whitespace_flexible": False, "lenient": not strict}


def constraints(
    fields: Any, tokenizer: Any, stop_ids: list[int], n: int, names: Callable[[str], str] = str
) -> list[GrammarConstraint] | None:
    """One fresh constraint per choice for the request's structured-output fields, or None when it has none.

    Raises APIError(400) naming the field (as `names` maps it for the door the request came through) when the
    grammar compiler refuses the schema or pattern."""
    from llguidance import LLMatcher

    try:
        found = grammar_for(fields)
    except (ValueError, json.JSONDecodeError) as err:
        param = names("guided_json")
        raise APIError(400, f"not a valid JSON schema: {err}", param=param, code="invalid_schema") from None
    if found is None:
        return None
    grammar, param = found
    if param == "response_format" and fields.response_format.type == "json_schema":
        param = "response_format.json_schema.schema"
    param = names(param)
    tok = ll_tokenizer(tokenizer, stop_ids)
    first = LLMatcher(tok, grammar, log_level=0)
    if first.is_error():
        raise APIError(400, f"{param}: {_short(first.get_error())}", param=param, code="invalid_schema")
    n_vocab = len(tokenizer)
    matchers = [first] + [first.deep_copy() for _ in range(n - 1)]
    return [GrammarConstraint(m, n_vocab, stop_ids, grammar) for m in matchers]


def _recompile(grammar: str, n_vocab: int, stop_ids: list[int]) -> GrammarConstraint:
    from llguidance import LLMatcher

    if not _PROCESS_TOKENIZER:
        raise RuntimeError("no tokenizer for grammars in this process (structured.use_tokenizer)")
    tokenizer, ids = _PROCESS_TOKENIZER[0]
    return GrammarConstraint(LLMatcher(ll_tokenizer(tokenizer, ids), grammar, log_level=0), n_vocab, stop_ids, grammar)


def _short(error: str) -> str:
    return first_line(error, 300) or "the grammar compiler refused it"

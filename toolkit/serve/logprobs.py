"""Log probabilities in the shapes clients read: OpenAI's chat `logprobs.content`, OpenAI's legacy completions
`logprobs` (tokens, token_logprobs, top_logprobs, text_offset) and vLLM's `prompt_logprobs`.

The numbers come from the engine's events (toolkit/engine/sampling.py: raw log-softmax of the same forward
passes that generate, never a second run); this module only turns token ids into the text and bytes clients
expect. A byte-fallback token (`<0xE2>`) has its one byte in `bytes` and U+FFFD as text when it is not a
character on its own, as OpenAI's API does for partial characters.
"""

from __future__ import annotations

import re
from typing import Any

from toolkit.serve.protocol import (
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """Token id -> (text, UTF-8 bytes), cached: the tokenizer's piece with "▁" as a space."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(int(token))
            if piece is None:
                hit = ("", [])
            elif m := _BYTE.match(piece):
                b = bytes([int(m.group(1), 16)])
                hit = (b.decode("utf-8", errors="replace"), list(b))
            else:
                text = piece.replace("▁", " ")
                hit = (text, list(text.encode("utf-8")))
            self._cache[token] = hit
        return hit

    def text(self, token: int) -> str:
        return self(token)[0]


def chat_entries(tt: TokenText, entries: list[Any]) -> list[ChatTokenLogprob]:
    """OpenAI's chat `logprobs.content` items for engine TokenLogprob entries."""
    out = []
    for e in entries:
        text, raw = tt(e.token)
        top = [TopLogprob(token=tt.text(t), logprob=lp, bytes=tt(t)[1]) for t, lp in e.top]
        out.append(ChatTokenLogprob(token=text, logprob=e.logprob, bytes=raw, top_logprobs=top))
    return out


def chat_logprobs(tt: TokenText, entries: list[Any]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=chat_entries(tt, entries))


def completion_logprobs(tt: TokenText, ids: list[int], entries: list[Any], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy shape for `ids` with their entries (None: no logprob, as for the first prompt token).

    top_logprobs holds the top-k alternatives and the chosen token (so up to k+1 entries, as OpenAI does);
    text_offset counts characters of the token texts from `offset`."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, e in zip(ids, entries, strict=True):
        text = tt.text(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(e.logprob)
        top = {tt.text(t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)
        tops.append(top)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=tops, text_offset=offsets)


def prompt_logprobs(tt: TokenText, entries: list[Any]) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token, {token id: {logprob, rank, decoded_token}} for the prompt's
    token and its top-k alternatives; null for the first token. rank is known inside the top-k only."""
    out: PromptLogprobs = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranks = {t: r + 1 for r, (t, _) in enumerate(e.top)}
        item = {str(e.token): PromptLogprob(logprob=e.logprob, rank=ranks.get(e.token), decoded_token=tt.text(e.token))}
        for t, lp in e.top:
            item.setdefault(str(t), PromptLogprob(logprob=lp, rank=ranks[t], decoded_token=tt.text(t)))
        out.append(item)
    return out

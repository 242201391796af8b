"""How a door names chat's fields, so that errors raised on the chat path name the field the client sent.

The Responses door sends its request through the chat path (serving.start_chat); a problem found there is about
`messages[2].content[0]` or `max_tokens`, which its client wrote as `input[1].content[0]` or `max_output_tokens`. The
door hands the chat path a `FieldNames` map, and every error the chat path raises names fields through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldNames:
    """How a door's request names chat's fields, so that errors raised on the chat path name the field the client
    sent (the Responses door: `messages[2].content[0]` -> `input[1].content[0]`, `max_tokens` ->
    `max_output_tokens`). Chat's own is the identity."""

    fields: tuple[tuple[str, str], ...] = ()  # (chat's field, the door's), a field's sub-fields follow it
    # Per chat message, the door's field it came from: an item ("input[0]") keeps the sub-field after it; a whole
    # field ("instructions", "previous_response_id") stands for any part of that message.
    messages: tuple[str, ...] | None = None

    def __call__(self, path: str) -> str:
        if self.messages is not None and (m := re.match(r"messages\[(\d+)\]", path)):
            k = int(m.group(1))
            if k < len(self.messages):
                source = self.messages[k]
                return source + path[m.end() :] if source.endswith("]") else source
        for ours, theirs in self.fields:
            if path == ours or path.startswith((ours + ".", ours + "[")):
                return theirs + path[len(ours) :]
        return path


CHAT_NAMES = FieldNames()

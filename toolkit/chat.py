"""The only place that knows Gemma 3's chat template: OpenAI-style messages -> model inputs.

Messages are the OpenAI chat `messages` (system / user / assistant; content a string or a list of
`{"type": "text"}` / `{"type": "image_url"}` parts). The template itself ships with the base's processor
(Gemma 3's: <bos>, system folded into the first user turn, assistant rendered as "model", <end_of_turn>);
each image becomes <start_of_image> + N soft tokens + <end_of_image> via the processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.images import load_image


def to_template_messages(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """Rewrite image_url parts as the template's {"type": "image"} markers; return them and the image sources."""
    out, sources = [], []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part["type"] == "image_url":
                sources.append(part["image_url"]["url"])
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": msg["role"], "content": parts})
    return out, sources


def encode_prompt(processor: Any, messages: list[dict], *, base_dir: Path | None = None):
    """Tokenise `messages` ending in a user turn, with the generation prompt, as a batch of one (tensors)."""
    template_messages, sources = to_template_messages(messages)
    images = [load_image(s, base_dir=base_dir, where=f"image {i}") for i, s in enumerate(sources)]
    text = processor.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)
    # The template already starts with <bos>; the tokenizer must not add a second one.
    return processor(text=text, images=images or None, add_special_tokens=False, return_tensors="pt")

"""The only place that knows Gemma 3's chat template: validated messages -> model inputs and labels.

The template text comes with the base's processor (Gemma 3's: <bos>, system text folded into the first user
turn, roles alternate, assistant rendered as "model", every turn closed by <end_of_turn>). Leading system and
developer messages are merged, in order, into that one system text. Each image part
becomes <start_of_image> + N soft tokens + <end_of_image> (the processor's image sequence).

Encoding is segment by segment: the rendered conversation is cut at turn boundaries (after each
"<start_of_turn>model\n" and after each "<end_of_turn>\n") and each segment is tokenised on its own. Training
rows and prompts use the same cut, so the prompt part of a training row is exactly the token sequence the
server feeds for the same messages (tested), whatever the tokenizer would merge across boundaries.
Labels are -100 except on assistant answers: the answer text and its <end_of_turn>.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from toolkit import constants as C
from toolkit.data.images import ImagePolicy, load_image
from toolkit.data.schema import ImagePart, TextPart, image_urls, leading_instructions
from toolkit.errors import ToolkitError

IGNORE = -100  # label value that the loss skips


@dataclass
class Encoded:
    """One conversation as model inputs (lists; the collator makes tensors)."""

    input_ids: list[int]
    labels: list[int]
    token_type_ids: list[int]  # 1 on image soft tokens: Gemma 3 needs it, also for text-only batches
    pixel_values: Any = None  # float tensor [n_images, 3, H, W] or None
    num_images: int = 0
    truncated: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def tensors(self):
        """A batch of one as a dict of tensors, ready for the model or generate()."""
        import torch

        out = {
            "input_ids": torch.tensor([self.input_ids]),
            "attention_mask": torch.ones(1, len(self.input_ids), dtype=torch.long),
            "token_type_ids": torch.tensor([self.token_type_ids]),
        }
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        return out


def _text(content: str | list) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


def to_template_messages(messages: list) -> list[dict]:
    """Validated messages -> the dicts Gemma 3's template reads (image parts become {"type": "image"}).

    The leading system / developer messages become one system message, their texts joined in order: Gemma 3
    has one system turn (folded into the first user turn) and no developer role.
    """
    n_lead = leading_instructions(messages)
    out = [{"role": "system", "content": "\n\n".join(_text(m.content) for m in messages[:n_lead])}] if n_lead else []
    for m in messages[n_lead:]:
        content = m.content
        if isinstance(content, list):
            if m.role in ("system", "developer"):
                # the template reads only the first part of a list-valued system message; join them all
                content = _text(content)
            else:
                content = [
                    {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                    for p in content
                    if isinstance(p, ImagePart | TextPart)
                ]
        out.append({"role": m.role, "content": content})
    return out


def load_images(messages: list, *, base_dir: Path | None, policy: ImagePolicy | None, where: str = "") -> list:
    """The PIL images of every image part, in order; errors name the message and part."""
    prefix = f"{where}: " if where else ""
    return [
        load_image(url, base_dir=base_dir, policy=policy, where=f"{prefix}{path}") for path, url in image_urls(messages)
    ]


def _segments(
    processor: Any, tmsgs: list[dict], add_generation_prompt: bool, train_from: int = 0
) -> list[tuple[str, bool]]:
    """Cut the rendered conversation at turn boundaries: [(text, is_trained_answer), ...]; assistant turns
    before index `train_from` of `tmsgs` are context, not answers."""

    def render(msgs: list[dict], gen: bool) -> str:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segments, done = [], ""
    first = 1 if tmsgs and tmsgs[0]["role"] == "system" else 0
    for i in range(first, len(tmsgs)):
        is_assistant = tmsgs[i]["role"] == "assistant"
        is_answer = is_assistant and i >= train_from
        # every assistant turn is cut after its "<start_of_turn>model\n", trained or not: same tokens either way
        cuts = [(render(tmsgs[:i], True), False)] if is_assistant else []
        cuts.append((render(tmsgs[: i + 1], False), is_answer))
        for text, answer in cuts:
            if not text.startswith(done):  # the template renders prefixes as prefixes; guard anyway
                raise RuntimeError("chat template output is not prefix-stable; cannot cut it into turns")
            segments.append((text[len(done) :], answer))
            done = text
    if add_generation_prompt:
        text = render(tmsgs, True)
        segments.append((text[len(done) :], False))
    return [(t, a) for t, a in segments if t]


def _encode(
    processor: Any, messages: list, images: list, add_generation_prompt: bool, train_from: int = 0
) -> tuple[list[int], list[int]]:
    tok = processor.tokenizer
    image_seq = processor.full_image_sequence  # "\n\n<start_of_image>" + N x soft token + "<end_of_image>\n\n"
    end_of_turn = tok.convert_tokens_to_ids(C.END_OF_TURN)
    n_markers = 0
    ids: list[int] = []
    labels: list[int] = []
    merged = max(0, leading_instructions(messages) - 1)  # leading instructions become one template message
    tmsgs = to_template_messages(messages)
    for text, is_answer in _segments(processor, tmsgs, add_generation_prompt, max(0, train_from - merged)):
        n_markers += text.count(tok.boi_token)
        seg = tok(text.replace(tok.boi_token, image_seq), add_special_tokens=False)["input_ids"]
        if is_answer:
            # train on the answer and its <end_of_turn>, not on the "\n" the template puts after it
            last = max(i for i, t in enumerate(seg) if t == end_of_turn)
            labels += seg[: last + 1] + [IGNORE] * (len(seg) - last - 1)
        else:
            labels += [IGNORE] * len(seg)
        ids += seg
    if n_markers != len(images):
        raise ToolkitError(f"{n_markers} image parts but {len(images)} images given", where="messages")
    return ids, labels


def _finish(processor: Any, ids: list[int], labels: list[int], images: list, truncated: bool = False) -> Encoded:
    image_token = processor.tokenizer.convert_tokens_to_ids(C.IMAGE_SOFT_TOKEN)
    pixel_values = None
    if images:
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return Encoded(
        input_ids=ids,
        labels=labels,
        token_type_ids=[1 if t == image_token else 0 for t in ids],
        pixel_values=pixel_values,
        num_images=len(images),
        truncated=truncated,
    )


def encode_prompt(processor: Any, messages: list, images: list) -> Encoded:
    """Tokens the model is fed to answer `messages` (ending in a user turn): template + generation prompt."""
    ids, labels = _encode(processor, messages, images, add_generation_prompt=True)
    return _finish(processor, ids, labels, images)


def encode_conversation(
    processor: Any,
    messages: list,
    images: list,
    *,
    max_len: int | None = None,
    overlong: Literal["error", "truncate", "drop"] = "error",
    train_from: int = 0,
) -> Encoded | None:
    """Tokens and labels of a training row (ending in an assistant answer). None if dropped as over-long.

    Assistant messages before index `train_from` are context only (no labels): a prompt-completion row trains
    only its completion, as TRL does.
    Over `max_len`: "error" raises, "drop" returns None, "truncate" keeps the first `max_len` tokens (never
    half an image: a cut inside an image cuts before it) and raises if no answer token survives.
    """
    ids, labels = _encode(processor, messages, images, add_generation_prompt=False, train_from=train_from)
    if max_len is None or len(ids) <= max_len:
        return _finish(processor, ids, labels, images)
    if overlong == "drop":
        return None
    if overlong == "error":
        raise ToolkitError(
            f"conversation is {len(ids)} tokens, over max_seq_len {max_len}",
            where="messages",
            fix="raise data.max_seq_len, or set data.overlong to truncate or drop",
        )
    total, tok = len(ids), processor.tokenizer
    boi = tok.convert_tokens_to_ids(C.START_OF_IMAGE)
    eoi = tok.convert_tokens_to_ids(C.END_OF_IMAGE)
    cut = max_len
    starts = [i for i, t in enumerate(ids) if t == boi]
    ends = [i for i, t in enumerate(ids) if t == eoi]
    for s, e in zip(starts, ends, strict=True):
        if s < cut <= e:
            cut = s
    kept_images = sum(1 for e in ends if e < cut)
    ids, labels = ids[:cut], labels[:cut]
    if all(x == IGNORE for x in labels):
        raise ToolkitError(
            f"after truncation to {max_len} tokens no answer token is left (the row is {total} tokens)",
            where="messages",
            fix="raise data.max_seq_len or set data.overlong: drop",
        )
    return _finish(processor, ids, labels, images[:kept_images], truncated=True)

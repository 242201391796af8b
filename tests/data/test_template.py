"""chat.py: the Gemma 3 template, assistant-only labels, images, truncation, and train/serve prompt equality."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor

from toolkit.data import template as chat
from toolkit.data.schema import parse_messages
from toolkit.data.template import IGNORE
from toolkit.errors import ToolkitError


@pytest.fixture(scope="module")
def processor(tiny_ct):
    return AutoProcessor.from_pretrained(tiny_ct)


def _msgs(raw, purpose="train"):
    return parse_messages(raw, purpose=purpose, where="test")


def _labelled(processor, enc):
    return processor.tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE])


def test_system_user_assistant_renders_gemma3_template_and_labels_only_the_answer(processor):
    m = _msgs(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    )
    enc = chat.encode_conversation(processor, m, [])
    assert processor.tokenizer.decode(enc.input_ids) == (
        "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis<end_of_turn>\n"
    )
    assert _labelled(processor, enc) == "Paris<end_of_turn>"
    assert enc.labels[-1] == IGNORE  # the "\n" after <end_of_turn> is not trained on
    assert set(enc.token_type_ids) == {0} and enc.pixel_values is None


def test_multi_turn_trains_on_every_assistant_turn(processor):
    m = _msgs(
        [
            {"role": "user", "content": "France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "Italy?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Rome"}]},
        ]
    )
    enc = chat.encode_conversation(processor, m, [])
    assert _labelled(processor, enc) == "Paris<end_of_turn>Rome<end_of_turn>"
    text = processor.tokenizer.decode(enc.input_ids)
    assert text.count("<start_of_turn>model\n") == 2 and text.count("<start_of_turn>user\n") == 2


def test_image_turn_expands_to_soft_tokens_with_token_type_ids(processor, images):
    raw = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Colour?"},
                {"type": "image_url", "image_url": {"url": str(images["red"])}},
            ],
        },
        {"role": "assistant", "content": "red"},
    ]
    m = _msgs(raw)
    imgs = chat.load_images(m, base_dir=None, policy=None)
    enc = chat.encode_conversation(processor, m, imgs)
    tok = processor.tokenizer
    soft = tok.convert_tokens_to_ids("<image_soft_token>")
    n = processor.image_seq_length
    assert enc.input_ids.count(soft) == n and sum(enc.token_type_ids) == n
    assert all((t == soft) == bool(tt) for t, tt in zip(enc.input_ids, enc.token_type_ids, strict=True))
    start = enc.input_ids.index(tok.convert_tokens_to_ids("<start_of_image>"))
    assert enc.input_ids[start + 1 + n] == tok.convert_tokens_to_ids("<end_of_image>")
    assert tuple(enc.pixel_values.shape) == (1, 3, 64, 64) and enc.num_images == 1
    assert _labelled(processor, enc) == "red<end_of_turn>"
    # the same prompt through the processor's own __call__ gives identical ids, token types and pixels
    pm = _msgs(raw[:1], purpose="request")
    prompt = chat.encode_prompt(processor, pm, imgs)
    text = processor.apply_chat_template(chat.to_template_messages(pm), tokenize=False, add_generation_prompt=True)
    ref = processor(text=text, images=imgs, add_special_tokens=False, return_tensors="pt")
    assert ref["input_ids"][0].tolist() == prompt.input_ids
    assert ref["token_type_ids"][0].tolist() == prompt.token_type_ids
    assert (ref["pixel_values"] == prompt.pixel_values).all()


def test_prompt_part_of_a_training_row_equals_the_serving_encoding(processor, images):
    raw = [
        {"role": "system", "content": "One word."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": str(images["blue"])}},
                {"type": "text", "text": "Colour?"},
            ],
        },
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "And the capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
    ]
    row = _msgs(raw)
    imgs = chat.load_images(row, base_dir=None, policy=None)
    full = chat.encode_conversation(processor, row, imgs)
    for k in (2, 4):  # each assistant turn: the server sees messages[:k]
        prompt = chat.encode_prompt(processor, _msgs(raw[:k], purpose="request"), imgs)
        assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        assert full.labels[len(prompt.input_ids) - 1] == IGNORE
        assert full.labels[len(prompt.input_ids)] != IGNORE  # the answer starts right after the prompt


def test_truncation_drop_and_error_for_over_long_rows(processor, images):
    long_text = "the cat and the dog " * 20
    raw = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look."},
                {"type": "image_url", "image_url": {"url": str(images["red"])}},
            ],
        },
        {"role": "assistant", "content": long_text},
    ]
    m = _msgs(raw)
    imgs = chat.load_images(m, base_dir=None, policy=None)
    full = chat.encode_conversation(processor, m, imgs)
    assert len(full.input_ids) > 60
    with pytest.raises(ToolkitError, match=f"{len(full.input_ids)} tokens, over max_seq_len 60"):
        chat.encode_conversation(processor, m, imgs, max_len=60)
    assert chat.encode_conversation(processor, m, imgs, max_len=60, overlong="drop") is None
    cut = chat.encode_conversation(processor, m, imgs, max_len=60, overlong="truncate")
    assert cut.truncated and len(cut.input_ids) == 60 and cut.input_ids == full.input_ids[:60]
    assert cut.num_images == 1 and cut.num_label_tokens > 0
    # a cut inside the image cuts before it (never half an image) and then no answer is left
    boi = full.input_ids.index(processor.tokenizer.convert_tokens_to_ids("<start_of_image>"))
    with pytest.raises(ToolkitError, match="no answer token is left"):
        chat.encode_conversation(processor, m, imgs, max_len=boi + 3, overlong="truncate")

"""One message schema: every form in the model card is accepted; everything else is refused with its path."""

from __future__ import annotations

import pytest

from toolkit.data.schema import check_messages, parse_messages
from toolkit.errors import ToolkitError

IMG = {"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}}
CARD_FORMS = [
    # the card's basic example and its multimodal example
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name the european capitals"},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, IMG]},
    ],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": [IMG]}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"}}],
        },
    ],
]


DEVELOPER_FORMS = [
    # OpenAI's newer name for system, alone, after system, before system, as parts; in requests and training rows
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"},
    ],
    [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": "Hi."},
        {"role": "user", "content": "x"},
    ],
]


@pytest.mark.parametrize("messages", DEVELOPER_FORMS)
def test_developer_role_is_accepted_wherever_system_is(messages):
    parsed, problems = check_messages(messages, purpose="request")
    assert problems == [] and [m.role for m in parsed] == [m["role"] for m in messages]
    row = [*messages, {"role": "assistant", "content": "Hello"}]
    assert check_messages(row, purpose="train")[1] == []


@pytest.mark.parametrize("messages", CARD_FORMS)
def test_card_forms_are_accepted(messages):
    parsed, problems = check_messages(messages, purpose="request")
    assert problems == [] and len(parsed) == len(messages)


def test_training_row_must_end_with_the_assistant_answer():
    row = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert check_messages(row, purpose="train")[1] == []
    problems = check_messages(row[:1], purpose="train")[1]
    assert [str(p) for p in problems] == ["messages[0]: the last message must be the assistant answer to train on"]
    assert "must be from the user" in str(check_messages(row, purpose="request")[1][0])


REJECTED = [
    ("not a list", {"role": "user"}, "messages: must be a list"),
    ("empty", [], "messages: must contain at least one message"),
    (
        "unknown role",
        [{"role": "bot", "content": "x"}],
        "messages[0]: role must be 'system', 'developer', 'user' or 'assistant'",
    ),
    (
        "tool role",
        [{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}],
        "messages[1]: tool calling is not supported",
    ),
    (
        "tool_calls",
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": []}],
        "messages[1]: tool calling is not supported",
    ),
    (
        "unknown part type",
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
        "messages[0].content[0]: content part type must be 'text' or 'image_url'",
    ),
    (
        "image without url",
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        "messages[0].content[0].image_url.url: Field required",
    ),
    (
        "text without text",
        [{"role": "user", "content": [{"type": "text"}]}],
        "messages[0].content[0].text: Field required",
    ),
    ("number content", [{"role": "user", "content": 5}], "messages[0].content: content must be a string or a list"),
    (
        "image in system",
        [{"role": "system", "content": [IMG]}, {"role": "user", "content": "x"}],
        "messages[0].content[0].type: Input should be 'text'",
    ),
    (
        "image from assistant",
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": [IMG]}],
        "messages[1].content[0].type: Input should be 'text'",
    ),
    ("unknown field", [{"role": "user", "content": "x", "weight": 1}], "messages[0].weight: unknown field"),
    ("missing content", [{"role": "user"}], "messages[0].content: Field required"),
    ("empty content", [{"role": "user", "content": "  "}], "messages[0].content: is empty"),
    ("empty parts", [{"role": "user", "content": []}], "messages[0].content: is empty"),
    ("assistant first", [{"role": "assistant", "content": "x"}], "messages[0].role: expected 'user' here"),
    (
        "two users",
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        "messages[1].role: expected 'assistant' here",
    ),
    (
        "late system",
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        "messages[1].role: a system message may only come first",
    ),
    (
        "late developer",
        [{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}],
        "messages[1].role: a developer message may only come first",
    ),
    (
        "image from developer",
        [{"role": "developer", "content": [IMG]}, {"role": "user", "content": "x"}],
        "messages[0].content[0].type: Input should be 'text'",
    ),
    ("only system", [{"role": "system", "content": "a"}], "messages: needs a user message"),
]


@pytest.mark.parametrize("case, messages, expected", REJECTED, ids=[c[0] for c in REJECTED])
def test_invalid_messages_are_rejected_with_the_field_path(case, messages, expected):
    _, problems = check_messages(messages, purpose="request")
    assert any(str(p).startswith(expected) for p in problems), [str(p) for p in problems]


def test_image_limit_and_one_error_listing_every_problem():
    many = [{"role": "user", "content": [IMG, IMG, IMG]}]
    assert "has 3 images; at most 2" in str(check_messages(many, purpose="request", max_images=2)[1][0])
    bad = [{"role": "user", "content": [{"type": "text"}, {"type": "image_url", "image_url": {}}]}]
    with pytest.raises(ToolkitError) as err:
        parse_messages(bad, purpose="request", where="rows.jsonl:7")
    text = str(err.value)
    assert text.startswith("rows.jsonl:7: messages[0].content[0].text: Field required; messages[0].content[1]")

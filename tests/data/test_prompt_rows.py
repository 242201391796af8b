"""GRPO's prompt rows through every door: TRL's prompt-only rows (a string or messages), conversations that end with
the user's turn (messages, ShareGPT), Alpaca without an answer; their other fields kept as columns for the rewards,
images in prompts, and the refusals (an answer where the prompt should end, rows of another method, over-long
prompts)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import write_rows
from transformers import AutoProcessor

from toolkit.data.datasets import load_data, load_eval_rows, summary_lines
from toolkit.errors import ToolkitError
from toolkit.eval.rewards import reward_prompt
from toolkit.recipe import DataSection

QUESTION = "Capital of France?"
GENERATION_PROMPT = "<start_of_turn>model\n"


@pytest.fixture(scope="module")
def processor(tiny_ct):
    return AutoProcessor.from_pretrained(tiny_ct)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("prompts")
    shutil.copy(images["red"], d / "red.png")
    return d


write = write_rows


def cfg(path, **kw):
    return DataSection(train=str(path), eval_fraction=0.0, **kw)


def load(processor, folder, name, rows, method="grpo", **kw):
    return load_data(cfg(write(folder, name, rows), **kw), processor, method)


def only(report):
    assert report.kind == "prompts" and len(report.train) == 1
    return report.train[0]


def text_of(processor, item):
    return processor.tokenizer.decode(item.encoded.input_ids)


# ------------------------------------------------------------------------------------------------- the doors


def test_trl_string_prompt_is_one_user_turn_and_rewards_see_the_string(folder, processor):
    report = load(processor, folder, "string.jsonl", [{"prompt": QUESTION, "answer": "Paris"}])
    item = only(report)
    assert report.formats == {"train": "prompt"}
    assert item.row.text_prompt is True
    assert [m.role for m in item.row.messages] == ["user"]
    assert item.row.columns == {"answer": "Paris"}
    assert reward_prompt(item.row) == QUESTION  # TRL's standard form: the string itself
    # encoded as the engine is fed it: the template, then the generation prompt; nothing to train on
    assert text_of(processor, item).endswith(f"{QUESTION}<end_of_turn>\n{GENERATION_PROMPT}")
    assert item.encoded.num_images == 0 and item.encoded.num_label_tokens == 0


def test_every_door_gives_the_same_prompt_tokens(folder, processor):
    rows = {
        "prompt string": ({"prompt": QUESTION, "answer": "Paris"}, "prompt"),
        "prompt messages": ({"prompt": [{"role": "user", "content": QUESTION}], "answer": "Paris"}, "prompt"),
        "messages": ({"messages": [{"role": "user", "content": QUESTION}], "answer": "Paris"}, "messages"),
        "sharegpt": ({"conversations": [{"from": "human", "value": QUESTION}], "answer": "Paris"}, "sharegpt"),
        "alpaca": ({"instruction": QUESTION, "input": "", "output": "Paris"}, "alpaca"),
    }
    encoded = {}
    for k, (row, fmt) in enumerate(rows.values()):
        report = load(processor, folder, f"door{k}.jsonl", [row])
        assert report.formats == {"train": fmt}
        item = only(report)
        assert [m.role for m in item.row.messages] == ["user"]
        encoded[fmt if k else "string"] = item.encoded.input_ids
        assert item.row.text_prompt is (k == 0)  # only TRL's string prompt is the standard form
    assert all(ids == encoded["string"] for ids in encoded.values())


def test_trl_message_prompts_keep_the_system_turn_and_every_other_field(folder, processor):
    schema = {"type": "object", "required": ["city"]}
    row = {
        "prompt": [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": QUESTION}],
        "answer": "Paris",
        "schema": schema,
        "tests": ["assert x"],
    }
    item = only(load(processor, folder, "messages.jsonl", [row]))
    assert item.row.text_prompt is False
    assert [m.role for m in item.row.messages] == ["system", "user"]
    assert item.row.columns == {"answer": "Paris", "schema": schema, "tests": ["assert x"]}
    # TRL's conversational form for the rewards: the messages as dicts
    assert reward_prompt(item.row) == row["prompt"]
    assert "Answer with one word." in text_of(processor, item)


MULTI_TURN = [
    {"role": "user", "content": "Capital of Italy?"},
    {"role": "assistant", "content": "Rome"},
    {"role": "user", "content": QUESTION},
]


def test_multi_turn_conversations_ending_with_the_user_are_prompts(folder, processor):
    item = only(load(processor, folder, "multi.jsonl", [{"messages": MULTI_TURN, "answer": "Paris"}]))
    assert [m.role for m in item.row.messages] == ["user", "assistant", "user"]
    assert item.row.columns == {"answer": "Paris"}
    assert "Rome<end_of_turn>" in text_of(processor, item)  # the earlier answer is part of the prompt
    assert text_of(processor, item).endswith(f"{QUESTION}<end_of_turn>\n{GENERATION_PROMPT}")
    sharegpt = [{"from": "human", "value": "Capital of Italy?"}, {"from": "gpt", "value": "Rome"}]
    sharegpt.append({"from": "human", "value": QUESTION})
    row = {"conversations": sharegpt, "system": "Be brief.", "answer": "Paris", "id": 7}
    item = only(load(processor, folder, "sharegpt.jsonl", [row]))
    assert [m.role for m in item.row.messages] == ["system", "user", "assistant", "user"]
    assert item.row.columns == {"answer": "Paris", "id": 7}  # ShareGPT's system is the conversation's, not a column


def test_no_token_of_a_prompt_is_marked_trained(folder, processor):
    """GRPO's loss covers the sampled completions only: an earlier answer inside a prompt is context, and `toolkit
    validate --show` / `--dump` (which print the labels) must not show it as trained."""
    item = only(load(processor, folder, "multi_labels.jsonl", [{"messages": MULTI_TURN, "answer": "Paris"}]))
    assert item.encoded.num_label_tokens == 0
    assert set(item.encoded.labels) == {-100}


def test_alpaca_without_output_is_a_prompt_and_an_output_is_kept_as_a_column(folder, processor):
    with_input = {"instruction": "Translate to French.", "input": "cat", "answer": "chat"}
    item = only(load(processor, folder, "alpaca.jsonl", [with_input], format="alpaca"))
    assert [m.role for m in item.row.messages] == ["user"]
    assert item.row.messages[0].content == "Translate to French.\ncat"
    assert item.row.columns == {"answer": "chat"}
    with_output = {"instruction": QUESTION, "input": "", "output": "Paris", "system": "Be brief."}
    item = only(load(processor, folder, "alpaca_out.jsonl", [with_output]))  # auto: instruction + output is alpaca
    assert [m.role for m in item.row.messages] == ["system", "user"]  # the output is not part of the prompt
    assert item.row.columns == {"output": "Paris"}


def test_alpaca_prompt_rows_are_detected_without_an_output(folder, processor):
    """docs/DATA.md's prompt-row example `{"instruction": "Name a prime above 10.", "answer": "11"}`: Alpaca without
    `output` is a prompt door, so with data.format auto such a file should read as alpaca."""
    rows = [{"instruction": "Name a prime above 10.", "answer": "11"}]
    report = load(processor, folder, "alpaca_auto.jsonl", rows)
    assert report.formats == {"train": "alpaca"}
    assert only(report).row.columns == {"answer": "11"}


def test_data_columns_rename_the_prompt_field(folder, processor):
    row = {"question": QUESTION, "answer": "Paris"}
    item = only(load(processor, folder, "renamed.jsonl", [row], format="prompt", columns={"prompt": "question"}))
    assert item.row.text_prompt is True and item.row.columns == {"answer": "Paris"}
    assert text_of(processor, item).endswith(f"{QUESTION}<end_of_turn>\n{GENERATION_PROMPT}")


# ------------------------------------------------------------------------------------------------- images


def test_images_in_prompts_by_trl_placeholder_and_by_marker(folder, processor):
    image_token = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    trl = {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "image"}]}],
        "images": ["red.png"],
        "answer": "red",
    }
    llava = {"conversations": [{"from": "human", "value": "<image>\nColour?"}], "image": "red.png", "answer": "red"}
    no_placeholder = {"prompt": [{"role": "user", "content": "Colour?"}], "images": ["red.png"], "answer": "red"}
    for name, row in (("trl", trl), ("llava", llava), ("rule", no_placeholder)):
        item = only(load(processor, folder, f"image_{name}.jsonl", [row]))
        assert item.encoded.num_images == 1, name
        assert item.encoded.input_ids.count(image_token) > 0 and sum(item.encoded.token_type_ids) > 0, name
        assert item.row.columns == {"answer": "red"}, name  # the images column is the prompt's, not a column
        parts = item.row.messages[-1].content
        assert [p.type for p in parts if p.type == "image_url"] == ["image_url"], name
        assert text_of(processor, item).endswith(GENERATION_PROMPT), name
        # the rewards see TRL's conversational prompt, the image part included
        assert any(p.get("type") == "image_url" for p in reward_prompt(item.row)[-1]["content"]), name


def test_a_string_prompt_with_an_image_reaches_the_rewards_as_its_string(folder, processor):
    """TRL's rule puts a string prompt's images first in its user turn; the rewards still get the string (TRL's
    standard form, as docs/DATA.md says: "A string `prompt` is one user message, and reward functions get it ...
    as strings"), and GRPO writes it to completions.jsonl as JSON."""
    row = {"prompt": "Colour?", "images": ["red.png"], "answer": "red"}
    item = only(load(processor, folder, "string_image.jsonl", [row]))
    assert item.encoded.num_images == 1 and item.row.text_prompt is True
    prompt = reward_prompt(item.row)
    assert prompt == "Colour?"
    json.dumps(prompt)


def test_a_missing_image_names_the_row_and_the_images_entry(folder, processor):
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]}
    row["images"] = ["nowhere.png"]
    path = write(folder, "missing_image.jsonl", [row])
    with pytest.raises(ToolkitError) as err:
        load_data(cfg(path), processor, "grpo")
    assert err.value.where.startswith(f"{path}:1") and "images[0]" in err.value.where


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "row, field",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[1].role"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "conversations[1].from"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "prompt[1].role"),
    ],
)
def test_a_conversation_ending_with_an_answer_names_the_row_and_says_where_a_prompt_ends(folder, processor, row, field):
    path = write(folder, "answered.jsonl", [row])
    with pytest.raises(ToolkitError) as err:
        load_data(cfg(path), processor, "grpo")
    e = err.value
    assert e.where == f"{path}:1"
    assert e.what == f"{field}: the last message must be from the user"
    assert "ending with the user's turn" in e.fix and "column such as `answer`" in e.fix


def test_skip_mode_skips_an_answered_row_and_keeps_the_prompts(folder, processor):
    rows = [
        {"messages": [{"role": "user", "content": "q1"}], "answer": "a"},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q3"}], "answer": "c"},
    ]
    path = write(folder, "skip.jsonl", rows)
    report = load_data(cfg(path, on_bad_row="skip"), processor, "grpo")
    assert [x.row.where for x in report.train] == [f"{path}:1", f"{path}:3"]
    assert [(s.where, s.reason) for s in report.skipped] == [
        (f"{path}:2", "messages[1].role: the last message must be from the user")
    ]


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_prompt_rows_under_another_method_are_refused_naming_grpo(folder, processor, method):
    path = write(folder, "prompts.jsonl", [{"prompt": QUESTION, "answer": "Paris"}])
    with pytest.raises(ToolkitError) as err:
        load_data(cfg(path), processor, method)
    e = err.value
    assert e.where == str(path)
    assert f"prompt-only rows (no answer to learn from), and training.method {method} needs answers" in e.what
    assert "training.method: grpo" in e.fix


@pytest.mark.parametrize(
    "row, what",
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference rows"),
        ({"prompt": "q", "completion": "a", "label": True}, "kto rows"),
    ],
)
def test_preference_and_kto_rows_under_grpo_are_refused(folder, processor, row, what):
    path = write(folder, "pairs.jsonl", [row])
    with pytest.raises(ToolkitError) as err:
        load_data(cfg(path), processor, "grpo")
    e = err.value
    assert e.where == str(path)
    assert e.what == f"training.method grpo samples its own answers to prompts, and these are {what} (answers to learn)"
    assert '{"prompt": ...}' in e.fix


def test_over_long_prompts_error_by_default_are_never_truncated_and_drop_when_asked(folder, processor):
    rows = [{"prompt": "word " * 100, "answer": "x"}, {"prompt": QUESTION, "answer": "Paris"}]
    path = write(folder, "long.jsonl", rows)
    for overlong in ("error", "truncate"):
        with pytest.raises(ToolkitError) as err:
            load_data(cfg(path, max_seq_len=32, overlong=overlong), processor, "grpo")
        assert err.value.where == f"{path}:1: prompt", overlong
        assert "over max_seq_len 32" in err.value.what and "overlong: drop" in err.value.fix
        assert ("never truncated" in err.value.what) is (overlong == "truncate")
    report = load_data(cfg(path, max_seq_len=32, overlong="drop"), processor, "grpo")
    assert report.dropped == [f"{path}:1"] and report.truncated == []
    assert [x.row.where for x in report.train] == [f"{path}:2"]


# ------------------------------------------------------------------------------------------------- splits, summary


def test_eval_rows_split_or_file_are_prompts_with_their_columns_and_the_summary_counts_prompts(folder, processor):
    rows = [{"prompt": f"Question {k}?", "answer": str(k)} for k in range(10)]
    path = write(folder, "ten.jsonl", rows)
    report = load_data(DataSection(train=str(path), eval_fraction=0.2), processor, "grpo")
    assert len(report.train) == 8 and len(report.eval) == 2
    assert all(x.row.columns["answer"] == x.row.messages[-1].content.split()[-1][:-1] for x in report.eval)
    summary = report.summary()
    assert summary["kind"] == "prompts" and summary["train"]["rows"] == 8 and summary["train"]["answer_tokens"] == 0
    train_line = next(line for line in summary_lines(summary) if line.strip().startswith("train"))
    assert f"8 prompts, {summary['train']['tokens']} prompt tokens, 0 images" in train_line
    # `toolkit eval` on a grpo recipe reads the same held-out prompts, with their columns
    held_out, desc = load_eval_rows(DataSection(train=str(path), eval_fraction=0.2), processor, prompts=True)
    assert desc["kind"] == "prompts" and desc["rows"] == 2
    assert [x.row.where for x in held_out] == [x.row.where for x in report.eval]
    assert [x.row.columns for x in held_out] == [x.row.columns for x in report.eval]

"""Format doors: the same conversations as messages, TRL vision, ShareGPT/LLaVA, Alpaca and prompt-completion rows
(tests/data/fixtures) read to the same tokens, labels and pixels; errors name file:row and the user's field."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import ROOT
from transformers import AutoProcessor

from toolkit.data import template
from toolkit.data.datasets import load_data, load_eval_rows
from toolkit.data.formats import convert_row, detect_format
from toolkit.data.schema import parse_messages
from toolkit.data.template import IGNORE
from toolkit.errors import ToolkitError
from toolkit.recipe import DataSection, load_recipe

FIXTURES = ROOT / "tests" / "data" / "fixtures"
FORMS = {  # fixture -> the format `auto` must detect
    "trl_vision.jsonl": "messages",
    "sharegpt.json": "sharegpt",
    "alpaca.json": "alpaca",
    "prompt_completion.jsonl": "prompt_completion",
}


@pytest.fixture(scope="module")
def processor(tiny_ct):
    return AutoProcessor.from_pretrained(tiny_ct)


@pytest.fixture(scope="module")
def reference(processor):
    """The messages form of the fixtures' four conversations, encoded."""
    return load_data(cfg(FIXTURES / "messages.jsonl"), processor).train


def cfg(train, **kw):
    return DataSection(train=str(train), eval_fraction=0.0, **kw)


def texts(row) -> list[tuple[str, str]]:
    """A row's messages as (role, text with image urls), whatever form the content took."""
    out = []
    for m in row.messages:
        parts = [m.content] if isinstance(m.content, str) else m.content
        out.append((m.role, "|".join(p if isinstance(p, str) else getattr(p, "text", None) or "IMG" for p in parts)))
    return out


def assert_same_encoding(got, want, *, labels=True):
    assert got.encoded.input_ids == want.encoded.input_ids, got.row.where
    assert got.encoded.token_type_ids == want.encoded.token_type_ids
    if labels:
        assert got.encoded.labels == want.encoded.labels, got.row.where
    a, b = got.encoded.pixel_values, want.encoded.pixel_values
    assert (a is None and b is None) or torch.equal(a, b), got.row.where


@pytest.mark.parametrize("name", list(FORMS))
def test_each_format_reads_to_the_same_tokens_labels_and_pixels_as_the_messages_form(name, processor, reference):
    report = load_data(cfg(FIXTURES / name), processor)
    assert report.formats == {"train": FORMS[name]} and report.summary()["format"] == {"train": FORMS[name]}
    assert len(report.train) == len(reference) == 4
    for got, want in zip(report.train, reference, strict=True):
        assert texts(got.row) == texts(want.row)
        # prompt-completion trains only the completion (TRL): the multi-turn row's first answer is context
        multi_turn_prompt = name == "prompt_completion.jsonl" and got.row.where.endswith(":3")
        assert_same_encoding(got, want, labels=not multi_turn_prompt)
        if multi_turn_prompt:
            trained = [t for t, lab in zip(got.encoded.input_ids, got.encoded.labels, strict=True) if lab != IGNORE]
            assert processor.tokenizer.decode(trained) == "Madrid<end_of_turn>"
            assert got.encoded.num_label_tokens < want.encoded.num_label_tokens
    assert report.summary()["train"]["images"] == 3


def test_the_recipe_offers_exactly_the_formats_and_columns_the_doors_read():
    from typing import get_args

    from toolkit.data import formats
    from toolkit.recipe import DataColumn

    assert get_args(DataSection.model_fields["format"].annotation) == ("auto", *formats.FORMATS)
    assert set(get_args(DataColumn)) == set(formats.COLUMN_KEYS)


def test_sharegpt_llava_markers_become_image_parts_at_their_place():
    row = {
        "conversations": [
            {"from": "human", "value": "Look:\n<image>\nand <image>  here"},
            {"from": "gpt", "value": "ok"},
        ],
        "images": ["a.png", "b.png"],
        "system": "Be brief.",
    }
    out = convert_row(row, "sharegpt", {}, {})
    assert out.messages[0] == {"role": "system", "content": "Be brief."}
    assert out.messages[1]["content"] == [
        {"type": "text", "text": "Look:"},
        {"type": "image_url", "image_url": {"url": "a.png"}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": "b.png"}},
        {"type": "text", "text": "here"},
    ]
    assert out.field_of("messages[1].content[3].image_url.url") == "images[1].image_url.url"
    assert out.field_of("messages[2].role") == "conversations[1].from"


def test_image_values_paths_urls_bytes_dicts_and_pil_images_become_urls():
    from PIL import Image

    png = (FIXTURES / "images" / "red.png").read_bytes()
    images = ["x.png", "https://example.com/a.jpg", {"bytes": png, "path": "ignored.png"}, {"path": "p.png"}]
    images.append(Image.open(FIXTURES / "images" / "blue.png"))
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}] * 5 + [{"type": "text", "text": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "five"}]},
        ],
        "images": images,
    }
    urls = [p["image_url"]["url"] for p in convert_row(row, "messages", {}, {}).messages[0]["content"][:5]]
    assert urls[:2] == ["x.png", "https://example.com/a.jpg"] and urls[3] == "p.png"
    assert urls[2].startswith("data:image/png;base64,") and urls[4].startswith("data:image/png;base64,")
    processor_style = {"type": "image", "url": "https://example.com/b.jpg"}
    out = convert_row({"messages": [{"role": "user", "content": [processor_style]}]}, "messages", {}, {})
    assert out.messages[0]["content"] == [{"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}}]


def test_auto_detection_from_the_first_row_and_a_clear_error_when_nothing_fits(tmp_path, processor):
    assert detect_format({"messages": [{"role": "user", "content": "x"}]}, {}) == "messages"
    assert detect_format({"conversations": [{"from": "human", "value": "x"}]}, {}) == "sharegpt"
    assert detect_format({"instruction": "x", "input": "", "output": "y"}, {}) == "alpaca"
    assert detect_format({"prompt": "x", "completion": "y"}, {}) == "prompt_completion"
    assert detect_format({"dialog": [{"speaker": "user", "text": "x"}]}, {"messages": "dialog"}) == "messages"
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    with pytest.raises(ToolkitError, match=r"cannot tell the rows' format .*\['answer', 'question'\]") as err:
        load_data(cfg(path), processor)
    assert err.value.where == f"{path}:1" and "data.format" in err.value.fix


def test_columns_and_roles_map_other_field_and_role_names(tmp_path, processor, reference):
    shutil.copytree(FIXTURES / "images", tmp_path / "images")
    rows = [json.loads(line) for line in (FIXTURES / "trl_vision.jsonl").read_text().splitlines()]
    renamed = []
    for r in rows:
        dialog = [
            {"speaker": {"user": "human", "assistant": "bot"}.get(m["role"], m["role"]), "text": m["content"]}
            for m in r["messages"]
        ]
        renamed.append({"dialog": dialog, "pictures": r.get("images", [])})
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    columns = {"messages": "dialog", "role": "speaker", "content": "text", "images": "pictures"}
    with pytest.raises(ToolkitError, match=re.escape("dialog[1].speaker: 'human' is not a known role; map it")):
        load_data(cfg(path, columns=columns), processor)
    report = load_data(cfg(path, columns=columns, roles={"human": "user", "bot": "assistant"}), processor)
    for got, want in zip(report.train, reference, strict=True):
        assert_same_encoding(got, want)


BAD = {
    "unknown role": (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "x"},
                {"from": "gpt", "value": "y"},
                {"from": "bot", "value": "z"},
            ]
        },
        "conversations[2].from: 'bot' is not a known role; map it with data.roles",
    ),
    "tool turn": (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{}"}]},
        "conversations[1]: tool calling is not supported",
    ),
    "empty value": (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]},
        "conversations[1].value: is empty",
    ),
    "role order": (
        "sharegpt",
        {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        "conversations[0].from: expected 'user' here",
    ),
    "markers and images disagree": (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "<image><image>?"}, {"from": "gpt", "value": "y"}], "image": "a"},
        "image: 1 image(s) given but the conversation has 2 <image> markers",
    ),
    "placeholders and images disagree": (
        "messages",
        {
            "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "y"}],
            "images": ["a.png", "b.png"],
        },
        "images: 2 image(s) given but the conversation has 1 image places",
    ),
    "missing image file": (
        "messages",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "y"},
            ],
            "images": ["nope.png"],
        },
        r"images[0]: image file",
    ),
    "alpaca output missing": ("alpaca", {"instruction": "x", "input": ""}, "output: is missing"),
    "alpaca bad history": (
        "alpaca",
        {"instruction": "x", "output": "y", "history": [["a"]]},
        "history[0]: must be a [user, assistant] pair",
    ),
    "completion must answer": (
        "prompt_completion",
        {"prompt": "x", "completion": [{"role": "user", "content": "y"}]},
        "completion[0].role: expected 'assistant' here",
    ),
    "unknown placeholder field": (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "image", "img": "a.png"}]}], "images": ["a.png"]},
        "messages[0].content[0].img: unknown field of an image placeholder",
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_row_names_file_row_and_the_field_as_the_user_wrote_it(kind, tmp_path, processor):
    fmt, bad, message = BAD[kind]
    good = {
        "sharegpt": {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        "messages": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "alpaca": {"instruction": "x", "input": "", "output": "y"},
        "prompt_completion": {"prompt": "x", "completion": "y"},
    }[fmt]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, good, bad)))
    with pytest.raises(ToolkitError, match=re.escape(message)) as err:
        load_data(cfg(path), processor)
    assert err.value.where.startswith(f"{path}:3"), err.value.where


def test_eval_rows_read_every_format(processor, reference):
    rows, desc = load_eval_rows(cfg(FIXTURES / "messages.jsonl"), processor, str(FIXTURES / "sharegpt.json"))
    assert desc["format"] == "sharegpt" and desc["rows"] == 4
    for got, want in zip(rows, reference, strict=True):
        assert_same_encoding(got, want)


def test_developer_role_renders_as_the_system_turn_merged_in_order_with_system(processor):
    def encode(raw):
        return template.encode_conversation(processor, parse_messages(raw, purpose="train", where="test"), [])

    turns = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    developer = encode([{"role": "developer", "content": "Be brief."}, *turns])
    system = encode([{"role": "system", "content": "Be brief."}, *turns])
    assert developer.input_ids == system.input_ids and developer.labels == system.labels
    both = encode([{"role": "system", "content": "You help."}, {"role": "developer", "content": "Be brief."}, *turns])
    assert processor.tokenizer.decode(both.input_ids).startswith(
        "<bos><start_of_turn>user\nYou help.\n\nBe brief.\n\nCapital of France?<end_of_turn>\n"
    )
    prompt = template.encode_prompt(
        processor,
        parse_messages([{"role": "developer", "content": "Be brief."}, turns[0]], purpose="request", where="t"),
        [],
    )
    assert both.input_ids[: len(prompt.input_ids)] != prompt.input_ids  # merged text differs from developer alone
    assert developer.input_ids[: len(prompt.input_ids)] == prompt.input_ids  # training prompt == served prompt


def test_developer_role_in_training_rows(tmp_path, processor):
    path = tmp_path / "rows.jsonl"
    row = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    row["messages"].append({"role": "assistant", "content": "Hello"})
    sharegpt = {
        "conversations": [{"from": "developer", "value": "Be brief."}]
        + [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    }
    path.write_text(json.dumps(row) + "\n")
    (tmp_path / "s.jsonl").write_text(json.dumps(sharegpt) + "\n")
    a = load_data(cfg(path), processor).train[0]
    b = load_data(cfg(tmp_path / "s.jsonl"), processor).train[0]
    assert [m.role for m in a.row.messages] == ["developer", "user", "assistant"]
    assert_same_encoding(a, b)
    assert processor.tokenizer.decode(a.encoded.input_ids).startswith("<bos><start_of_turn>user\nBe brief.\n\nHi")


def _vision_rows(images_dir):
    """The fixture conversations as a hub image SFT set stores them: TRL placeholders, PIL images in `images`."""
    from PIL import Image

    rows = []
    for line in (FIXTURES / "trl_vision.jsonl").read_text().splitlines():
        r = json.loads(line)
        pics = [p["path"] if isinstance(p, dict) else p for p in r.get("images", [])]
        for m in r["messages"]:  # the processor-style {"type": "image", "path"} part becomes a placeholder too
            for part in m["content"]:
                if "path" in part:
                    pics.append(part.pop("path"))
        rows.append({"messages": r["messages"], "images": [Image.open(images_dir / p).convert("RGB") for p in pics]})
    return rows


def test_datasets_image_feature_parquet_and_folder_read_and_train_like_the_messages_form(
    tmp_path, processor, reference, tiny_ct, base
):
    import datasets

    from toolkit.base.loader import load_base
    from toolkit.data.collate import pad_batch
    from toolkit.train.trainer import train

    ds = datasets.Dataset.from_list(_vision_rows(FIXTURES))
    assert isinstance(ds.features["images"].feature, datasets.Image)  # the `datasets` Image feature
    ds.to_parquet(str(tmp_path / "vision.parquet"))
    ds.save_to_disk(str(tmp_path / "vision"))
    for source in ("vision.parquet", "vision"):
        report = load_data(cfg(tmp_path / source), processor)
        assert report.formats == {"train": "messages"}
        for got, want in zip(report.train, reference, strict=True):
            assert_same_encoding(got, want)

    # one training step on the parquet: its loss is the base's loss on the messages form's batch (LoRA starts at
    # zero, so the first step's loss is the base's, whatever file format it was read from)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [f"base.path={tiny_ct}", f"output.dir={tmp_path}", f"data.train={tmp_path / 'vision.parquet'}"]
        + ["data.eval=null", "data.eval_fraction=0", "data.max_images_per_conversation=2"]
        + ["training.max_steps=1", "training.batch_size=4"],
    )
    result = train(recipe)
    assert result.step == 1
    batch = pad_batch([r.encoded.__dict__ for r in reference], processor.tokenizer.pad_token_id)
    # the kernel training ran on (timed fastest here, kernel_probe.py), loaded the same way (the `base` fixture is
    # the inference load: bfloat16 on AVX512-BF16 CPUs)
    kernel = result.metrics["train"]["kernel"].split()[0]
    same = load_base(tiny_ct, device="cpu", kernel=kernel, training=True)
    with torch.no_grad():
        expected = same.model(**batch).loss.item()
    assert result.metrics["train"]["train_loss"] == pytest.approx(expected, rel=1e-4)


def test_validate_prints_the_detected_format(tmp_path, tiny_ct):
    from typer.testing import CliRunner

    from cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {{path: {tiny_ct}}}\n"
        f"data: {{train: {FIXTURES / 'sharegpt.json'}, eval: {FIXTURES / 'alpaca.json'}, max_seq_len: 256}}\n"
    )
    r = CliRunner().invoke(app, ["validate", str(recipe)])
    assert r.exit_code == 0, r.output
    assert "  format train sharegpt, eval alpaca (detected from the first row)" in r.output
    assert "  train 4 rows" in r.output and "3 images" in r.output

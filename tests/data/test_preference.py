"""Preference and KTO rows: the same three pairs (one with an image) in every shape read to the same tokens and labels
as TRL's explicit conversational form; KTO rows and pairs unpaired for KTO; bad pairs named by file:row and field;
which rows each training method takes; the summary, the validate lines and the dump."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import ROOT, write_rows
from transformers import AutoProcessor

from toolkit.data.datasets import load_data, load_eval_rows, split_line, summary_lines
from toolkit.data.dump import dump_rows, show_rows
from toolkit.data.formats import detect_format
from toolkit.data.preference import Preference, check_same_prompt, prompt_length
from toolkit.data.template import IGNORE
from toolkit.errors import ToolkitError
from toolkit.recipe import DataSection

FIXTURES = ROOT / "tests" / "data" / "fixtures"

# (prompt text, chosen, rejected); the second pair's prompt shows an image before its text
PAIRS = [
    ("Capital of this country?\nFrance", "Paris", "Lyon"),
    ("What colour is the square?", "red", "blue, I think"),
    ("Capital of Italy?", "Rome", "Milan is the capital of Italy."),
]
IMAGE_ROW = 1


def user(text, image=False, placeholder=None):
    content = [placeholder or {"type": "image"}, {"type": "text", "text": text}] if image else text
    return {"role": "user", "content": content}


def bot(text):
    return {"role": "assistant", "content": text}


def with_images(row, i, images=None):
    return {**row, "images": images or ["red.png"]} if i == IMAGE_ROW else row


def trl_explicit(i, q, c, r):  # the reference form
    return with_images({"prompt": [user(q, i == IMAGE_ROW)], "chosen": [bot(c)], "rejected": [bot(r)]}, i)


SHAPES = {
    "trl explicit, strings (images by TRL's rule)": lambda i, q, c, r: with_images(
        {"prompt": q, "chosen": c, "rejected": r}, i
    ),
    "trl implicit": lambda i, q, c, r: with_images(
        {"chosen": [user(q, i == IMAGE_ROW), bot(c)], "rejected": [user(q, i == IMAGE_ROW), bot(r)]}, i
    ),
    "ultrafeedback": lambda i, q, c, r: with_images(
        {
            "prompt": q,
            "chosen": [user(q, i == IMAGE_ROW), bot(c)],
            "rejected": [user(q, i == IMAGE_ROW), bot(r)],
            "messages": [user(q), bot(c)],
            "score_chosen": 8.0,
            "score_rejected": 3.5,
        },
        i,
    ),
    "llama-factory sharegpt": lambda i, q, c, r: with_images(
        {
            "conversations": [{"from": "human", "value": ("<image>\n" if i == IMAGE_ROW else "") + q}],
            "chosen": {"from": "gpt", "value": c},
            "rejected": {"from": "gpt", "value": r},
        },
        i,
    ),
    "axolotl chat_template.default": lambda i, q, c, r: with_images(
        {"messages": [user(q, i == IMAGE_ROW)], "chosen": bot(c), "rejected": bot(r)}, i
    ),
    "llama-factory alpaca": lambda i, q, c, r: with_images(
        {
            "instruction": ("<image>" if i == IMAGE_ROW else "") + q.split("\n")[0],
            "input": q.split("\n")[1] if "\n" in q else "",
            "chosen": c,
            "rejected": r,
        },
        i,
    ),
    "processor-style image part, answer as text parts": lambda i, q, c, r: {
        "prompt": [user(q, i == IMAGE_ROW, {"type": "image", "path": "red.png"})],
        "chosen": [bot([{"type": "text", "text": c}])],
        "rejected": [bot(r)],
    },
    "datasets Image dict": lambda i, q, c, r: (
        with_images(trl_explicit(i, q, c, r), i, [{"bytes": None, "path": "red.png"}])
        if i == IMAGE_ROW
        else trl_explicit(i, q, c, r)
    ),
}


@pytest.fixture(scope="module")
def processor(tiny_ct):
    return AutoProcessor.from_pretrained(tiny_ct)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    shutil.copy(FIXTURES / "images" / "red.png", path / "red.png")
    return path


write = write_rows


def cfg(path, **kw):
    return DataSection(train=str(path), eval_fraction=0.0, **kw)


@pytest.fixture(scope="module")
def reference(folder, processor):
    rows = [trl_explicit(i, *p) for i, p in enumerate(PAIRS)]
    return load_data(cfg(write(folder, "reference.jsonl", rows)), processor, "dpo").train


def same(got, want):
    """Two encoded sides feed the model the same tokens, labels and pixels."""
    a, b = got.encoded, want.encoded
    assert (a.input_ids, a.labels, a.token_type_ids) == (b.input_ids, b.labels, b.token_type_ids), got.row.where
    assert (a.pixel_values is None and b.pixel_values is None) or torch.equal(a.pixel_values, b.pixel_values)


def trained_text(side, processor):
    ids = [t for t, lab in zip(side.encoded.input_ids, side.encoded.labels, strict=True) if lab != IGNORE]
    return processor.tokenizer.decode(ids)


def test_the_reference_pairs_train_only_their_answers_on_one_prompt(reference, processor):
    assert len(reference) == 3 and all(isinstance(item, Preference) and item.paired for item in reference)
    for item, (_, chosen, rejected) in zip(reference, PAIRS, strict=True):
        assert trained_text(item.chosen, processor) == f"{chosen}<end_of_turn>"
        assert trained_text(item.rejected, processor) == f"{rejected}<end_of_turn>"
        n = prompt_length(item.chosen.encoded)
        assert n == prompt_length(item.rejected.encoded) and n > 0
        assert item.chosen.encoded.input_ids[:n] == item.rejected.encoded.input_ids[:n]
    assert [item.chosen.encoded.num_images for item in reference] == [0, 1, 0]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_reads_to_the_same_pairs_and_tokens(shape, folder, processor, reference):
    path = write(folder, "shape.jsonl", [SHAPES[shape](i, *p) for i, p in enumerate(PAIRS)])
    report = load_data(cfg(path), processor, "dpo")
    assert report.formats == {"train": "preference"} and report.kind == "pairs"
    assert len(report.train) == len(reference)
    for got, want in zip(report.train, reference, strict=True):
        assert got.where == f"{path}:{reference.index(want) + 1}"
        same(got.chosen, want.chosen)
        same(got.rejected, want.rejected)


def test_multi_turn_prompts_with_a_system_turn_read_alike_and_train_only_the_last_answer(folder, processor):
    system = {"role": "system", "content": "Answer in one word."}
    turns = [user("Capital of Italy?"), bot("Rome"), user("And of Spain?")]
    sharegpt_turns = [{"from": "human", "value": "Capital of Italy?"}, {"from": "gpt", "value": "Rome"}]
    shapes = [
        {"prompt": [system, *turns], "chosen": [bot("Madrid")], "rejected": [bot("Paris")]},
        {"chosen": [system, *turns, bot("Madrid")], "rejected": [system, *turns, bot("Paris")]},
        {
            "system": system["content"],
            "conversations": [*sharegpt_turns, {"from": "human", "value": "And of Spain?"}],
            "chosen": {"from": "gpt", "value": "Madrid"},
            "rejected": {"from": "gpt", "value": "Paris"},
        },
        {
            "system": system["content"],
            "history": [["Capital of Italy?", "Rome"]],
            "instruction": "And of Spain?",
            "input": "",
            "chosen": "Madrid",
            "rejected": "Paris",
        },
    ]
    items = [load_data(cfg(write(folder, "multi.jsonl", [row])), processor, "dpo").train[0] for row in shapes]
    for item in items:
        same(item.chosen, items[0].chosen)
        same(item.rejected, items[0].rejected)
    assert trained_text(items[0].chosen, processor) == "Madrid<end_of_turn>"
    assert trained_text(items[0].rejected, processor) == "Paris<end_of_turn>"


def test_each_side_is_exactly_the_conversation_sft_would_train_on(folder, processor, reference):
    for side in ("chosen", "rejected"):
        rows = [
            with_images({"prompt": q, "completion": answers[side == "rejected"]}, i)
            for i, (q, *answers) in enumerate(PAIRS)
        ]
        sft = load_data(cfg(write(folder, "sft.jsonl", rows)), processor).train
        for got, want in zip(sft, reference, strict=True):
            same(got, getattr(want, side))


def test_kto_rows_and_pairs_unpaired_for_kto(folder, processor, reference):
    rows = [
        with_images({"prompt": [user(q, i == IMAGE_ROW)], "completion": answer, "label": label}, i)
        for i, (q, c, r) in enumerate(PAIRS)
        for answer, label in ((c, True), (r, False))
    ]
    kto = load_data(cfg(write(folder, "kto.jsonl", rows)), processor, "kto")
    assert kto.formats == {"train": "kto"} and kto.kind == "unpaired"
    llama_factory = [  # a whole conversation whose last turn is the labelled answer (its kto_tag)
        with_images({"messages": [user(q, i == IMAGE_ROW), bot(answer)], "label": label}, i)
        for i, (q, c, r) in enumerate(PAIRS)
        for answer, label in ((c, True), (r, False))
    ]
    lf = load_data(cfg(write(folder, "kto_lf.jsonl", llama_factory)), processor, "kto")
    assert lf.formats == {"train": "kto"}
    unpaired = load_data(
        cfg(write(folder, "pairs.jsonl", [trl_explicit(i, *p) for i, p in enumerate(PAIRS)])), processor, "kto"
    )
    assert unpaired.formats == {"train": "preference"} and unpaired.kind == "unpaired"
    for report in (kto, lf, unpaired):
        assert len(report.train) == 6
        for k, item in enumerate(report.train):
            want = reference[k // 2]
            if k % 2 == 0:
                assert item.rejected is None and not item.paired
                same(item.chosen, want.chosen)
            else:
                assert item.chosen is None
                same(item.rejected, want.rejected)
        summary = report.summary()["train"]
        assert (summary["rows"], summary["desirable"], summary["undesirable"]) == (6, 3, 3)
    assert kto.sha256 == unpaired.sha256  # the same labelled answers are the same training data


BAD = {
    "equal answers": (
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        "rejected: equals chosen; a pair needs two different answers",
    ),
    "equal answers, string and parts": (
        {"prompt": "x", "chosen": [bot("same")], "rejected": [bot([{"type": "text", "text": "same"}])]},
        "rejected: equals chosen",
    ),
    "empty answer": ({"prompt": "x", "chosen": " ", "rejected": "z"}, "chosen: is empty"),
    "empty answer list": ({"prompt": "x", "chosen": "y", "rejected": []}, "rejected: is empty"),
    "implicit prompts differ": (
        {"chosen": [user("a"), bot("b")], "rejected": [user("c"), bot("d")]},
        "rejected[0]: differs from chosen[0]; an implicit-prompt pair must share every turn but the last",
    ),
    "implicit lengths differ": (
        {"chosen": [user("a"), bot("b"), user("c"), bot("d")], "rejected": [user("a"), bot("e")]},
        "rejected: has 2 turns and chosen has 4; an implicit-prompt pair must share every turn but the last",
    ),
    "implicit, one turn each": (
        {"chosen": [user("a")], "rejected": [user("b")]},
        "chosen: has no prompt turn: chosen and rejected are read as whole conversations (the prompt's turns, then "
        "the answer) since there is no prompt field",
    ),
    "implicit strings": (
        {"chosen": "a", "rejected": "b"},
        "chosen: must be a list of messages: chosen and rejected are read as whole",
    ),
    "prompt disagrees with the shared turns": (
        {"prompt": "x", "chosen": [user("y"), bot("1")], "rejected": [user("y"), bot("2")]},
        "prompt: differs from the turns chosen and rejected share",
    ),
    "image placeholder in an answer": (
        {"prompt": [user("x", True)], "chosen": [bot([{"type": "image"}])], "rejected": "z", "images": ["red.png"]},
        "chosen[0].content[0]: an answer cannot hold an image; images belong to the prompt",
    ),
    "image marker in an answer": (
        {
            "conversations": [{"from": "human", "value": "<image>x"}],
            "chosen": {"from": "gpt", "value": "<image> y"},
            "rejected": {"from": "gpt", "value": "z"},
            "images": ["red.png"],
        },
        "chosen.value: an answer cannot hold an image; images belong to the prompt",
    ),
    "images and placeholders disagree": (
        {"prompt": [user("x", True)], "chosen": "y", "rejected": "z", "images": ["red.png", "red.png"]},
        "images: 2 image(s) given but the conversation has 1 image places",
    ),
    "missing rejected": ({"prompt": "x", "chosen": "y"}, "rejected: is missing"),
    "llama-factory conversation ending with an answer": (
        {
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "conversations[1].from: the prompt must end with the user's turn, which the answers reply to",
    ),
    "unreadable image": (
        {"prompt": [user("x", True)], "chosen": "y", "rejected": "z", "images": ["nope.png"]},
        "images[0]: image file",
    ),
    "side over max_seq_len": (
        {"prompt": "x", "chosen": "y", "rejected": "the cat " * 100},
        "rejected: conversation is",
    ),
}
GOOD = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_pair_names_file_row_and_the_field(kind, folder, processor):
    bad, message = BAD[kind]
    path = write(folder, "bad.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(ToolkitError, match=re.escape(message)) as err:
        load_data(cfg(path, format="preference", max_seq_len=64), processor, "dpo")
    assert err.value.where.startswith(f"{path}:3"), err.value.where


def test_kto_labels_must_be_booleans(folder, processor):
    good = {"prompt": "x", "completion": "y", "label": True}
    path = write(folder, "kto_bad.jsonl", [good, {**good, "label": "yes"}])
    with pytest.raises(
        ToolkitError, match=re.escape("label: must be true (desirable) or false (undesirable), got str")
    ) as err:
        load_data(cfg(path), processor, "kto")
    assert err.value.where == f"{path}:2"


def test_skip_mode_counts_and_lists_every_bad_pair(folder, processor):
    bads = [bad for bad, _ in BAD.values()]
    path = write(folder, "skip.jsonl", [GOOD, *bads, {**GOOD, "rejected": "Marseille"}])
    report = load_data(cfg(path, format="preference", max_seq_len=64, on_bad_row="skip"), processor, "dpo")
    assert [item.where for item in report.train] == [f"{path}:1", f"{path}:{len(bads) + 2}"]
    assert sorted(int(s.where.split(":")[1]) for s in report.skipped) == list(range(2, 2 + len(bads)))
    summary = report.summary()
    assert summary["skipped"] == len(bads) == len(summary["skipped_rows"])


def test_over_long_sides_drop_or_truncate_the_pair(folder, processor):
    path = write(folder, "long.jsonl", [GOOD, {**GOOD, "rejected": "the cat " * 100}])
    dropped = load_data(cfg(path, max_seq_len=64, overlong="drop"), processor, "dpo")
    assert [item.where for item in dropped.train] == [f"{path}:1"] and dropped.dropped == [f"{path}:2"]
    truncated = load_data(cfg(path, max_seq_len=64, overlong="truncate"), processor, "simpo")
    assert truncated.truncated == [f"{path}:2"]
    item = truncated.train[1]
    assert len(item.rejected.encoded.input_ids) == 64 and not item.chosen.encoded.truncated
    check_same_prompt(item)


def test_a_pair_whose_sides_encode_different_prompts_is_refused(reference):
    item = reference[0]
    ids = item.rejected.encoded.input_ids
    bent = type(item.rejected.encoded)(**{**item.rejected.encoded.__dict__, "input_ids": [ids[0], 7, *ids[2:]]})
    with pytest.raises(RuntimeError, match="different prompts"):
        check_same_prompt(Preference(item.where, item.chosen, type(item.rejected)(item.rejected.row, bent)))


def test_columns_rename_the_preference_and_kto_fields(folder, processor, reference):
    rows = [
        {"question": [user(q, i == IMAGE_ROW)], "good": c, "bad": r, "pics": ["red.png"] if i == IMAGE_ROW else []}
        for i, (q, c, r) in enumerate(PAIRS)
    ]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "images": "pics"}
    assert detect_format(rows[0], columns) == "preference" and detect_format(rows[0], {}) is None
    report = load_data(cfg(write(folder, "renamed.jsonl", rows), columns=columns), processor, "orpo")
    for got, want in zip(report.train, reference, strict=True):
        same(got.chosen, want.chosen)
        same(got.rejected, want.rejected)
    path = write(folder, "renamed_bad.jsonl", [rows[0], {**rows[0], "bad": rows[0]["good"]}])
    with pytest.raises(ToolkitError, match=re.escape("bad: equals good")):
        load_data(cfg(path, columns=columns), processor, "dpo")
    kto = [{"question": "x", "answer": "y", "thumbs_up": False}]
    kto_columns = {"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    report = load_data(cfg(write(folder, "kto_renamed.jsonl", kto), columns=kto_columns), processor, "kto")
    assert report.formats == {"train": "kto"} and report.train[0].chosen is None


def test_auto_detection_puts_pairs_and_kto_rows_before_the_conversation_formats():
    assert detect_format({"prompt": "x", "chosen": "y", "rejected": "z"}, {}) == "preference"
    assert detect_format({"chosen": [], "rejected": [], "messages": [user("x")]}, {}) == "preference"
    assert detect_format({"conversations": [], "chosen": {}, "rejected": {}}, {}) == "preference"
    assert detect_format({"prompt": "x", "completion": "y", "label": True}, {}) == "kto"
    assert detect_format({"prompt": "x", "completion": "y"}, {}) == "prompt_completion"
    assert detect_format({"messages": [user("x"), bot("y")], "label": False}, {}) == "kto"
    assert detect_format({"messages": [user("x"), bot("y")], "label": "spam"}, {}) == "messages"


METHOD_ERRORS = [
    ("pairs.jsonl", "sft", "these are preference rows (pairs", "set training.method: dpo, orpo or simpo"),
    ("kto.jsonl", "sft", "these are kto rows", "set training.method: kto"),
    ("kto.jsonl", "dpo", "training.method dpo needs pairs (a chosen and a rejected answer to one prompt)", "kto"),
    ("messages.jsonl", "orpo", "training.method orpo needs preference rows, and these are messages rows", "DATA.md"),
    ("messages.jsonl", "kto", "training.method kto needs preference rows", "prompt, completion, label"),
]


@pytest.mark.parametrize("name, method, what, fix", METHOD_ERRORS)
def test_each_method_takes_only_the_rows_it_can_train_on(name, method, what, fix, folder, processor):
    rows = {
        "pairs.jsonl": [GOOD],
        "kto.jsonl": [{"prompt": "x", "completion": "y", "label": True}],
        "messages.jsonl": [{"messages": [user("x"), bot("y")]}],
    }[name]
    path = write(folder, name, rows)
    with pytest.raises(ToolkitError, match=re.escape(what)) as err:
        load_data(cfg(path), processor, method)
    assert err.value.where == str(path) and fix in err.value.fix


def test_eval_rows_of_preference_data_are_pairs_and_kto_rows_are_refused(folder, processor, reference):
    path = write(folder, "eval_pairs.jsonl", [trl_explicit(i, *p) for i, p in enumerate(PAIRS)])
    items, desc = load_eval_rows(cfg(path), processor, str(path))
    assert (desc["format"], desc["kind"], desc["rows"]) == ("preference", "pairs", 3)
    for got, want in zip(items, reference, strict=True):
        assert got.paired and got.where == want.where.replace("reference", "eval_pairs")
        same(got.chosen, want.chosen)
        same(got.rejected, want.rejected)
    kto = write(folder, "eval_kto.jsonl", [{"prompt": "x", "completion": "y", "label": True}])
    with pytest.raises(ToolkitError, match="preference evaluation needs pairs") as err:
        load_eval_rows(cfg(path), processor, str(kto))
    assert err.value.where == str(kto)


def test_the_seeded_split_keeps_both_answers_of_a_pair_on_one_side(folder, processor):
    rows = [{"prompt": f"Question {i}?", "chosen": "yes", "rejected": "no"} for i in range(8)]
    path = write(folder, "split.jsonl", rows)
    pairs = load_data(DataSection(train=str(path), eval_fraction=0.25, split_seed=3), processor, "dpo")
    assert len(pairs.train) == 6 and len(pairs.eval) == 2
    unpaired = load_data(DataSection(train=str(path), eval_fraction=0.25, split_seed=3), processor, "kto")
    assert [i.where for i in unpaired.eval] == [w for i in pairs.eval for w in (i.where, i.where)]
    assert not {i.where for i in unpaired.train} & {i.where for i in unpaired.eval}


def test_the_hash_covers_both_sides(folder, processor):
    a = load_data(cfg(write(folder, "h1.jsonl", [GOOD])), processor, "dpo").sha256
    b = load_data(cfg(write(folder, "h2.jsonl", [{**GOOD, "rejected": "Nice"}])), processor, "dpo").sha256
    c = load_data(cfg(write(folder, "h3.jsonl", [{**GOOD, "chosen": "Paris."}])), processor, "dpo").sha256
    assert len({a, b, c}) == 3


def test_summary_keys_and_the_validate_lines(folder, processor, reference):
    path = write(folder, "summary.jsonl", [trl_explicit(i, *p) for i, p in enumerate(PAIRS)])
    summary = load_data(cfg(path), processor, "dpo").summary()
    train = summary["train"]
    sft_keys = {"rows", "tokens", "answer_tokens", "images", "longest_row"}
    assert set(train) == sft_keys | {"chosen_tokens", "rejected_tokens", "prompt_tokens"}
    assert summary["kind"] == "pairs" and summary["format"] == {"train": "preference"}
    sides = [side for item in reference for _, side in item.sides()]
    assert train["tokens"] == sum(len(s.encoded.input_ids) for s in sides)
    assert train["answer_tokens"] == train["chosen_tokens"] + train["rejected_tokens"]
    assert train["prompt_tokens"] == sum(prompt_length(item.chosen.encoded) for item in reference)
    assert (train["rows"], train["images"]) == (3, 1)
    lines = summary_lines(summary)
    assert lines[0] == "  format train preference (detected from the first row)"
    assert lines[1].startswith(f"  train 3 pairs, {train['tokens']} tokens ({train['prompt_tokens']} prompt, ")
    assert lines[2] == "  eval  0 pairs, 0 tokens (0 prompt, 0 chosen and 0 rejected answer tokens), 0 images"
    kto = load_data(cfg(path), processor, "kto").summary()
    assert set(kto["train"]) == set(train) | {"desirable", "undesirable"}
    assert summary_lines(kto)[0].endswith(", pairs unpaired for kto")
    assert split_line(kto["train"], "unpaired").startswith("6 answers (3 desirable, 3 undesirable), ")


def test_summary_lines_reproduce_validate_for_conversations(processor):
    report = load_data(
        DataSection(train=str(FIXTURES / "sharegpt.json"), eval=str(FIXTURES / "alpaca.json")), processor
    )
    summary = report.summary()
    # what `toolkit validate` printed before summary_lines existed
    want = ["  format " + ", ".join(f"{k} {v}" for k, v in summary["format"].items()) + " (data.format)"]
    for split in ("train", "eval"):
        s = summary[split]
        longest = f", longest {s['longest_row']['tokens']} tokens ({s['longest_row']['where']})" if s["rows"] else ""
        want.append(
            f"  {split:5} {s['rows']} rows, {s['tokens']} tokens ({s['answer_tokens']} answer tokens), "
            f"{s['images']} images{longest}"
        )
    want.append(f"  skipped {summary['skipped']}, truncated {summary['truncated']}, dropped {summary['dropped']}")
    assert summary_lines(summary, detected=False) == want and summary["kind"] == "conversations"


def test_dump_and_show_write_and_mark_both_sides(folder, processor, tmp_path):
    path = write(folder, "dump.jsonl", [trl_explicit(i, *p) for i, p in enumerate(PAIRS)])
    report = load_data(cfg(path), processor, "dpo")
    assert dump_rows(report, tmp_path / "d.jsonl") == 3
    lines = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    first = report.train[0]
    assert lines[0] == {
        "split": "train",
        "where": f"{path}:1",
        "chosen": {"input_ids": first.chosen.encoded.input_ids, "labels": first.chosen.encoded.labels},
        "rejected": {"input_ids": first.rejected.encoded.input_ids, "labels": first.rejected.encoded.labels},
    }
    shown = show_rows(report, processor.tokenizer, 1)[0].split("\n")
    n = prompt_length(first.chosen.encoded)
    assert shown[0] == (
        f"--- train {path}:1: pair, prompt {n} tokens; chosen {len(first.chosen.encoded.input_ids)} tokens, "
        f"{first.chosen.encoded.num_label_tokens} trained; rejected {len(first.rejected.encoded.input_ids)} tokens, "
        f"{first.rejected.encoded.num_label_tokens} trained (between [[ ]])"
    )
    text = "\n".join(shown)
    assert "\nchosen:\n<bos><start_of_turn>user\nCapital of this country?" in text
    assert "[[Paris<end_of_turn>]]" in text and "\nrejected:\n" in text and "[[Lyon<end_of_turn>]]" in text
    kto = load_data(
        cfg(write(folder, "dump_kto.jsonl", [{"prompt": "x", "completion": "y", "label": False}])), processor, "kto"
    )
    dump_rows(kto, tmp_path / "k.jsonl")
    assert json.loads((tmp_path / "k.jsonl").read_text())["chosen"] is None
    assert "undesirable answer" in show_rows(kto, processor.tokenizer, 1)[0]

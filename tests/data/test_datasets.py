"""Datasets: every source form, bad rows named by file:row and field, skip mode, splits, over-long rows."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoProcessor

from toolkit.data.datasets import load_data, read_raw_rows, split_rows
from toolkit.errors import ToolkitError
from toolkit.recipe import DataSection


@pytest.fixture(scope="module")
def processor(tiny_ct):
    return AutoProcessor.from_pretrained(tiny_ct)


def row(q="Capital of France?", a="Paris"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def image_row(url):
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Colour?"}, {"type": "image_url", "image_url": {"url": url}}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ]
    }


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg(train, **kw):
    return DataSection(train=str(train), eval_fraction=0.0, **kw)


def test_jsonl_json_parquet_and_save_to_disk_read_the_same_rows(tmp_path, images, processor):
    import shutil

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copy(images["red"], tmp_path / "red.png")
    rows = [image_row("red.png"), image_row("red.png")]  # list content throughout: one arrow type per column
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    summaries = []
    for source in ("d.jsonl", "d.json", "d.parquet", "saved"):
        report = load_data(cfg(tmp_path / source), processor)
        assert [r.row.where for r in report.train] == [f"{tmp_path / source}:1", f"{tmp_path / source}:2"]
        summaries.append({k: v for k, v in report.summary()["train"].items() if k != "longest_row"})
    assert all(s == summaries[0] for s in summaries) and summaries[0]["images"] == 2


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ToolkitError, match="could not be loaded from the hub"):
        read_raw_rows("someone/some-chat-dataset")
    with pytest.raises(ToolkitError, match="not found"):
        read_raw_rows("missing/rows.jsonl")


BAD_ROWS = {
    "role order": (
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        "messages[0].role: expected 'user' here",
    ),
    "empty content": (row(q=""), "messages[0].content: is empty"),
    "unknown part type": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "audio", "audio": "x"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "messages[0].content[0]: content part type must be 'text' or 'image_url'",
    ),
    "missing answer": (
        {"messages": [{"role": "user", "content": "x"}]},
        "the last message must be the assistant answer",
    ),
    "unreadable image": (image_row("nope.png"), r"messages\[0\]\.content\[1\]: image file .* not found"),
    "over max_seq_len": (row(a="the cat " * 100), "tokens, over max_seq_len 64"),
    "invalid json": ('{"messages": [', "not valid JSON"),
    "not an object": ("[1, 2]", 'row must be an object with a "messages" list'),
    "bad regex": ({**row(), "regex": "("}, "regex: regex is not a valid pattern"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_each_bad_row_kind_names_file_row_and_field(kind, tmp_path, processor):
    bad, match = BAD_ROWS[kind]
    match = match if ".*" in match else re.escape(match)
    path = write_jsonl(tmp_path / "rows.jsonl", [row(), row(), bad, row()])
    with pytest.raises(ToolkitError, match=match) as err:
        load_data(cfg(path, max_seq_len=64), processor)
    assert err.value.where.startswith(f"{path}:3"), err.value.where


def test_skip_mode_counts_and_lists_every_bad_row(tmp_path, processor):
    bads = [bad for bad, _ in BAD_ROWS.values()]
    path = write_jsonl(tmp_path / "rows.jsonl", [row(), *bads, row("Capital of Italy?", "Rome")])
    report = load_data(cfg(path, max_seq_len=64, on_bad_row="skip"), processor)
    assert len(report.train) == 2
    assert sorted(int(s.where.split(":")[1]) for s in report.skipped) == list(range(2, 2 + len(bads)))
    summary = report.summary()
    assert summary["skipped"] == len(bads) and len(summary["skipped_rows"]) == len(bads)


def test_over_long_rows_truncate_or_drop_and_are_counted(tmp_path, processor):
    path = write_jsonl(tmp_path / "rows.jsonl", [row(), row(a="the cat " * 100)])
    dropped = load_data(cfg(path, max_seq_len=64, overlong="drop"), processor)
    assert len(dropped.train) == 1 and dropped.dropped == [f"{path}:2"]
    truncated = load_data(cfg(path, max_seq_len=64, overlong="truncate"), processor)
    assert len(truncated.train) == 2 and truncated.truncated == [f"{path}:2"]
    assert max(len(r.encoded.input_ids) for r in truncated.train) == 64


def test_seeded_split_and_separate_eval_file(tmp_path, processor):
    rows = [row(f"Question {i}?", "Paris") for i in range(20)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    parsed = load_data(cfg(path), processor).train
    a_train, a_eval = split_rows([r.row for r in parsed], 0.25, seed=1)
    b_train, b_eval = split_rows([r.row for r in parsed], 0.25, seed=1)
    _, c_eval = split_rows([r.row for r in parsed], 0.25, seed=2)
    assert [r.where for r in a_eval] == [r.where for r in b_eval] and len(a_eval) == 5
    assert {r.where for r in a_eval} != {r.where for r in c_eval}
    assert not {r.where for r in a_train} & {r.where for r in a_eval}
    report = load_data(DataSection(train=str(path), eval_fraction=0.25, split_seed=1), processor)
    assert len(report.train) == 15 and len(report.eval) == 5
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [row("Capital of Spain?", "Madrid")])
    report = load_data(DataSection(train=str(path), eval=str(eval_path)), processor)
    assert len(report.train) == 20 and [r.row.where for r in report.eval] == [f"{eval_path}:1"]
    assert len(report.sha256) == 16

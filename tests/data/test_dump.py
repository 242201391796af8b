"""`toolkit validate --dump FILE` / `--show N`: exactly the encoded rows training sees, made visible."""

from __future__ import annotations

import json

from helpers import ROOT, run_cli


def test_validate_dumps_ids_and_labels_and_shows_trained_tokens(tiny_ct, tmp_path):
    from transformers import AutoProcessor

    from toolkit.data.datasets import load_recipe_data
    from toolkit.recipe import load_recipe

    recipe = ROOT / "recipes" / "quickstart.yaml"
    dump = tmp_path / "rows.jsonl"
    r = run_cli("validate", recipe, "--set", f"base.path={tiny_ct}", "--dump", dump, "--show", "1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    report = load_recipe_data(load_recipe(recipe, [f"base.path={tiny_ct}"]))
    expected = report.train + report.eval
    assert len(lines) == len(expected) == 112
    for line, item in zip(lines, expected, strict=True):
        assert (line["where"], line["input_ids"], line["labels"]) == (
            item.row.where,
            item.encoded.input_ids,
            item.encoded.labels,
        )
    assert f"wrote 112 encoded rows to {dump}" in r.stdout
    # Row 1: a system turn folded into the user turn; only the answer and its <end_of_turn> are trained.
    tok = AutoProcessor.from_pretrained(tiny_ct).tokenizer
    first = lines[0]
    shown = (
        f"--- train {first['where']}: 25 tokens, 2 trained (between [[ ]])\n"
        "<bos><start_of_turn>user\nAnswer with one word.\n\nTell me the capital of Kenya.<end_of_turn>\n"
        "<start_of_turn>model\n[[Nairobi<end_of_turn>]]\n\n"
    )
    assert shown in r.stdout
    assert tok.decode([t for t, lab in zip(first["input_ids"], first["labels"], strict=True) if lab != -100]) == (
        "Nairobi<end_of_turn>"
    )

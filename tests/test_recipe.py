"""Recipes: strict keys with suggestions, typed fields with paths and lines, --set, docs in sync, `validate`."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, run_cli

from toolkit.errors import ToolkitError
from toolkit.recipe import load_recipe, reference_markdown

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_load():
    quick = load_recipe(QUICKSTART)
    assert quick.adapter_name == "quickstart" and quick.base.tiny_seed == 0
    assert quick.data.train == "recipes/data/quickstart/train.jsonl"
    real = load_recipe(ROOT / "recipes" / "gemma3-27b.yaml")
    assert real.base.path == "ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g" and real.data.max_seq_len == 32768
    assert real.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_every_example_recipe_opens_with_the_command_that_runs_it():
    for path in (ROOT / "recipes").glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# toolkit ") and f"recipes/{path.name}" in first, path


def test_unknown_key_names_file_line_and_suggests_the_closest(tmp_path):
    path = write(tmp_path, "base:\n  path: x\ndata:\n  train: t.jsonl\n  max_seq_lenght: 512\ntrainig:\n  seed: 1\n")
    with pytest.raises(ToolkitError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:5: data.max_seq_lenght: unknown key (did you mean 'data.max_seq_len'?)" in text
    assert f"{path}:6: trainig: unknown key (did you mean 'training'?)" in text


def test_wrong_types_and_ranges_name_the_field_path_and_line(tmp_path):
    path = write(tmp_path, "base:\n  path: x\ndata:\n  train: t.jsonl\n  max_seq_len: 99999\nlora:\n  r: eight\n")
    with pytest.raises(ToolkitError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:5: data.max_seq_len: Input should be less than or equal to 32768 (got 99999)" in text
    assert f"{path}:7: lora.r: Input should be a valid integer" in text
    with pytest.raises(ToolkitError, match="data: required key is missing"):
        load_recipe(write(tmp_path, "base:\n  path: x\n"))
    with pytest.raises(ToolkitError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, "base:\n  path: [x\n"))


def test_set_overrides_any_field_and_is_checked_like_the_file():
    r = load_recipe(
        QUICKSTART,
        [
            "training.seed=7",
            "lora.target_modules=[q_proj, v_proj]",
            "data.eval=null",
            "training.gradient_checkpointing=true",
            "output.name=other",
        ],
    )
    assert r.training.seed == 7 and r.lora.target_modules == ["q_proj", "v_proj"] and r.data.eval is None
    assert r.training.gradient_checkpointing is True and r.adapter_name == "other"
    with pytest.raises(ToolkitError, match=r"--set: training\.sed: unknown key \(did you mean 'training\.seed'\?\)"):
        load_recipe(QUICKSTART, ["training.sed=3"])
    with pytest.raises(ToolkitError, match="--set: training.seed: Input should be a valid integer"):
        load_recipe(QUICKSTART, ["training.seed=abc"])
    with pytest.raises(ToolkitError, match="not KEY=VALUE"):
        load_recipe(QUICKSTART, ["training.seed"])
    with pytest.raises(ToolkitError, match="output.name: Value error, must be a plain folder name"):
        load_recipe(QUICKSTART, ["output.name=../escape"])


def test_recipes_doc_is_generated_from_the_schema():
    assert (ROOT / "docs" / "RECIPES.md").read_text() == reference_markdown()
    for key in ("max_seq_len", "on_bad_row", "overlong", "target_modules", "grad_accum", "tiny_seed"):
        assert f"`{key}`" in reference_markdown()


toolkit = run_cli


def test_validate_quickstart_prints_the_summary(tiny_ct):
    r = toolkit("validate", QUICKSTART, "--set", f"base.path={tiny_ct}")
    assert r.returncode == 0, r.stderr
    assert "recipe " in r.stdout and ": ok (adapter 'quickstart'" in r.stdout
    assert "  train 84 rows" in r.stdout and "48 images, longest" in r.stdout
    assert "  eval  28 rows" in r.stdout and "skipped 0, truncated 0, dropped 0" in r.stdout
    js = json.loads(toolkit("validate", QUICKSTART, "--set", f"base.path={tiny_ct}", "--json").stdout)
    assert js["train"]["rows"] == 84 and js["eval"]["images"] == 12 and js["skipped"] == 0


def test_typo_recipe_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(QUICKSTART.read_text().replace("  max_seq_len: 256", "  max_seq_length: 256"))
    r = toolkit("validate", bad)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "data.max_seq_length: unknown key (did you mean 'data.max_seq_len'?)" in lines[0]
    assert "Traceback" not in r.stderr

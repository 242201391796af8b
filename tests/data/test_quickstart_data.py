"""The committed quickstart dataset is exactly what its generator writes."""

from __future__ import annotations

import runpy

from helpers import ROOT
from PIL import Image, ImageChops

DATA = ROOT / "recipes" / "data" / "quickstart"


def test_committed_files_match_the_generator(tmp_path):
    runpy.run_path(str(DATA / "generate.py"))["generate"](tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name
    generated = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert generated == sorted(p.name for p in (DATA / "images").iterdir()) and len(generated) == 60
    for name in generated:
        with Image.open(tmp_path / "images" / name) as a, Image.open(DATA / "images" / name) as b:
            assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None, name


def test_eval_split_is_held_out():
    train = set((DATA / "train.jsonl").read_text().splitlines())
    evals = (DATA / "eval.jsonl").read_text().splitlines()
    assert len(evals) == 28 and not any(line in train for line in evals)
    assert sum('"image_url"' in line for line in evals) == 12

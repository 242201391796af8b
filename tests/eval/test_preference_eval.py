"""Preference pairs in `toolkit eval`: chunked scoring against the full logits, the pair metrics on hand-checkable
cases, implicit rewards against a reference, the same scores over HTTP from a live `toolkit serve`, image pairs
refused over HTTP, and gates on the new metrics. Preference items are built here directly (the data door that
reads preference files is tested in tests/data)."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT

from toolkit.errors import ToolkitError
from toolkit.eval import metrics
from toolkit.recipe import load_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
CAPITALS = [  # (question, chosen, rejected): the quickstart's task in its training phrasing, the right answer chosen
    ("What is the capital of France?", "Paris", "Rome"),
    ("What is the capital of Italy?", "Rome", "Tokyo"),
    ("What is the capital of Spain?", "Madrid", "Berlin"),
    ("What is the capital of Germany?", "Berlin", "Nairobi"),
]


def encode_side(processor, where: str, prompt: list[dict], answer: str):
    from toolkit.data.datasets import EncodedRow, Row
    from toolkit.data.schema import check_messages
    from toolkit.data.template import encode_conversation, load_images

    messages, problems = check_messages([*prompt, {"role": "assistant", "content": answer}], purpose="train")
    assert not problems, problems
    images = load_images(messages, base_dir=None, policy=None)
    encoded = encode_conversation(processor, messages, images, train_from=len(prompt))
    return EncodedRow(Row(where, messages, train_from=len(prompt)), encoded)


def make_pair(processor, where: str, prompt: list[dict], chosen: str, rejected: str):
    from toolkit.data.preference import Preference

    return Preference(
        where, encode_side(processor, where, prompt, chosen), encode_side(processor, where, prompt, rejected)
    )


def text_pairs(processor) -> list:
    return [
        make_pair(processor, f"pairs.jsonl:{i}", [{"role": "user", "content": q}], c, r)
        for i, (q, c, r) in enumerate(CAPITALS, start=1)
    ]


def image_pair(processor, image, where: str = "pairs.jsonl:9"):
    prompt = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Name the color of the square."},
                {"type": "image_url", "image_url": {"url": str(image)}},
            ],
        }
    ]
    return make_pair(processor, where, prompt, "red", "blue")


def full_logits_logp(model, encoded) -> float:
    """The independent computation: one plain forward, every position's logits, log_softmax, labelled tokens."""
    import torch

    inputs = encoded.tensors()
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[i - 1, t]) for i, t in enumerate(encoded.labels) if t != -100)


# ------------------------------------------------------------------------------------------ chunked scoring


def test_chunked_scoring_equals_the_full_logits(base, images):
    from toolkit.eval.scoring import answer_logprobs, mean_loss, row_losses

    pairs = [*text_pairs(base.processor), image_pair(base.processor, images["red"])]
    sides = [s for p in pairs for s in (p.chosen, p.rejected)]
    expected = [full_logits_logp(base.model, s.encoded) for s in sides]
    pad = base.tokenizer.pad_token_id
    for chunk in (1, 3, 1024):  # a head call per labelled position, a few, all of a batch's at once
        got = answer_logprobs(base.model, sides, pad, "cpu", base.dtype, batch_size=3, chunk=chunk)
        assert [c for _, c in got] == [s.encoded.num_label_tokens for s in sides]
        assert [s for s, _ in got] == pytest.approx(expected, abs=1e-4), chunk
    # row_losses is the same sum, negated
    losses = row_losses(base.model, sides, pad, "cpu", base.dtype)
    assert [s for s, _ in losses] == pytest.approx([-e for e in expected], abs=1e-4)
    assert mean_loss(losses[:1])["loss"] == pytest.approx(-expected[0] / sides[0].encoded.num_label_tokens, abs=1e-4)


def _spy_head(monkeypatch, head) -> list:
    """Record the rows of every LM head call (the head module's forward, however the loader set it)."""
    calls = []
    inner = head.forward

    def spy(hidden):
        out = inner(hidden)
        calls.append((hidden.reshape(-1, hidden.shape[-1]).shape[0], tuple(out.shape)))
        return out

    monkeypatch.setattr(head, "forward", spy)
    return calls


def test_a_long_row_never_builds_its_whole_logits(base, monkeypatch):
    """A 2,000-token row with a 500-token answer: the head sees the labelled positions only, `chunk` at a time, so
    no [tokens x vocab] tensor exists (the model's own forward would call the head once over every position)."""
    from toolkit.eval.scoring import answer_logprobs

    prompt = [{"role": "user", "content": " ".join(["apple"] * 1500)}]
    row = encode_side(base.processor, "long.jsonl:1", prompt, " ".join(["pear"] * 500))
    tokens, labelled = len(row.encoded.input_ids), row.encoded.num_label_tokens
    assert tokens > 2000 and labelled > 500
    calls = _spy_head(monkeypatch, base.model.get_output_embeddings())
    ((total, count),) = answer_logprobs(base.model, [row], base.tokenizer.pad_token_id, "cpu", base.dtype, chunk=128)
    assert count == labelled and total < 0
    assert sum(rows for rows, _ in calls) == labelled  # every labelled position once, nothing else
    assert max(rows for rows, _ in calls) == 128
    vocab = base.model.get_output_embeddings().weight.shape[0]
    assert max(shape[0] * shape[-1] for _, shape in calls) == 128 * vocab  # the largest logits: one chunk's


def test_the_served_int8_head_is_the_one_scored(tiny_ct, monkeypatch):
    """A CPU load serving with the int8 head (lm_head.py) is scored through that head, as its server answers."""
    from toolkit.base.lm_head import Int8Head
    from toolkit.base.loader import load_base
    from toolkit.eval.scoring import answer_logprobs

    int8 = load_base(tiny_ct, device="cpu", lm_head="int8")
    head = int8.model.get_output_embeddings()
    assert isinstance(head, Int8Head)
    sides = [s for p in text_pairs(int8.processor) for s in (p.chosen, p.rejected)]
    expected = [full_logits_logp(int8.model, s.encoded) for s in sides]  # the model's forward: the int8 head too
    calls = _spy_head(monkeypatch, head)
    got = answer_logprobs(int8.model, sides, int8.tokenizer.pad_token_id, "cpu", int8.dtype, chunk=2)
    assert calls and [s for s, _ in got] == pytest.approx(expected, abs=1e-4)


# -------------------------------------------------------------------------------------------------- metrics


def test_pair_metrics_on_known_numbers():
    m = metrics.preference_metrics([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0])
    assert m["preference_accuracy"] == pytest.approx(1 / 3)  # strict: the tie (-2 vs -2) is a miss
    assert m["preference_margin"] == pytest.approx((1.0 + 0.0 - 2.0) / 3)
    r = metrics.reward_metrics([-1.0, -2.0], [-2.0, -2.0], [-1.5, -1.0], [-1.0, -3.0])
    # rewards: chosen 0.5 and -1.0, rejected -1.0 and 1.0 -> differences 1.5 and -2.0
    assert r == {"reward_accuracy": 0.5, "reward_margin": pytest.approx(-0.25)}
    assert metrics.preference_metrics([], []) == {"preference_accuracy": None, "preference_margin": None}
    for name in (*metrics.PREFERENCE_METRICS, *metrics.REWARD_METRICS):
        assert metrics.higher_is_better(name) and metrics.higher_is_better(f"{name}.image")
    assert metrics.is_margin("reward_margin.text") and not metrics.is_margin("reward_accuracy")


def test_preference_metrics_equal_a_direct_full_logits_computation(base, images):
    from toolkit.eval.preference import score_preferences_in_process

    pairs = [*text_pairs(base.processor)[:2], image_pair(base.processor, images["red"])]
    direct = [
        (full_logits_logp(base.model, p.chosen.encoded), full_logits_logp(base.model, p.rejected.encoded))
        for p in pairs
    ]
    out = score_preferences_in_process(base, base.model, pairs, {"base": None}, None, batch_size=2)
    values = out.metrics["base"]
    diffs = [c - r for c, r in direct]
    assert values["preference_accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / 3)
    assert values["preference_margin"] == pytest.approx(sum(diffs) / 3, abs=1e-4)
    # text and image pairs both present: the groups too, and no reward without a reference
    assert values["preference_margin.text"] == pytest.approx(sum(diffs[:2]) / 2, abs=1e-4)
    assert values["preference_margin.image"] == pytest.approx(diffs[2], abs=1e-4)
    assert not any(k.startswith("reward") for k in values)
    for row, (c, r), pair in zip(out.rows["base"], direct, pairs, strict=True):
        assert row["chosen_logp"] == pytest.approx(c, abs=1e-4) and row["rejected_logp"] == pytest.approx(r, abs=1e-4)
        assert row["chosen_tokens"] == pair.chosen.encoded.num_label_tokens


def test_a_model_against_itself_as_reference_has_zero_reward(base):
    """Every pair's implicit reward difference is exactly 0: the margin is 0 and, by the strict rule (TRL's
    `chosen_rewards > rejected_rewards`), the accuracy 0.0, not 0.5."""
    from toolkit.eval.preference import score_preferences_in_process

    pairs = text_pairs(base.processor)
    out = score_preferences_in_process(base, base.model, pairs, {"base": None, "again": None}, "base")
    for label in ("base", "again"):
        assert out.metrics[label]["reward_margin"] == 0.0
        assert out.metrics[label]["reward_accuracy"] == 0.0
        assert all(r["reward_margin"] == 0.0 for r in out.rows[label])
    assert out.metrics["again"]["preference_margin"] == out.metrics["base"]["preference_margin"]


def test_unpaired_items_are_listed_but_count_in_no_pair_metric(base):
    from toolkit.data.preference import Preference
    from toolkit.eval.preference import score_preferences_in_process

    pairs = text_pairs(base.processor)
    lone = Preference("kto.jsonl:1", pairs[0].chosen, None)
    both = score_preferences_in_process(base, base.model, pairs[:2], {"base": None})
    mixed = score_preferences_in_process(base, base.model, [lone, *pairs[:2]], {"base": None})
    assert mixed.metrics == both.metrics
    assert mixed.rows["base"][0]["rejected_logp"] is None and mixed.rows["base"][0]["margin"] is None
    assert mixed.rows["base"][0]["chosen_logp"] == both.rows["base"][0]["chosen_logp"]


# ------------------------------------------------------------------------------------------ toolkit eval


def _recipe(tiny_ct, trained, *extra):
    return load_recipe(
        QUICKSTART,
        [f"base.path={tiny_ct}", f"output.dir={trained.adapter_dir.parent}", "output.name=quickstart", *extra],
    )


@pytest.fixture
def pair_rows(monkeypatch, base, images) -> None:
    """`toolkit eval`'s rows are these preference items, as load_eval_rows gives them for preference data: the
    text pairs, and with `--data with-images` an image pair too."""
    from toolkit.data import datasets

    def fake_load_eval_rows(cfg, processor, source=None, prompts=False):
        rows = text_pairs(base.processor)
        if source == "with-images":
            rows.append(image_pair(base.processor, images["red"]))
        return rows, {"source": "pairs.jsonl", "format": "preference", "rows": len(rows), "sha256": "0" * 16}

    monkeypatch.setattr(datasets, "load_eval_rows", fake_load_eval_rows)


@pytest.fixture(scope="module")
def server(make_server):
    """`toolkit serve` of the base and the quickstart adapter in float32 (the torch kernel): the in-process run
    takes the same kernel, so the two differ by float32 rounding only. (In bfloat16 a logit of 8..16 moves in
    steps of 1/16: peft's per-row adapter path, which the server takes, and set_adapter's can round one logit
    a step apart.)"""
    return make_server(kernel="torch")


def test_eval_scores_pairs_for_base_and_adapter_and_writes_the_report(pair_rows, tiny_ct, trained, tmp_path):
    from toolkit.eval.report import markdown_table
    from toolkit.eval.run import run_eval

    result = run_eval(_recipe(tiny_ct, trained), out=tmp_path, mins=["preference_accuracy=0.75"])
    r = result.report
    assert list(r["models"]) == ["base", "quickstart"] and r["scoring"] == "preference pairs"
    assert r["reference"] == "base" and r["passed"], r["failures"]
    adapter, base_values = r["metrics"]["quickstart"], r["metrics"]["base"]
    # the quickstart adapter was trained on the right answers: it prefers every chosen one
    assert adapter["preference_accuracy"] == 1.0 and adapter["preference_margin"] > base_values["preference_margin"]
    assert adapter["reward_accuracy"] >= 0.75
    # reward margin = the adapter's preference margin minus the reference's (a mean of differences)
    assert adapter["reward_margin"] == pytest.approx(
        adapter["preference_margin"] - base_values["preference_margin"], abs=1e-6
    )
    assert base_values["reward_margin"] == 0.0 and base_values["reward_accuracy"] == 0.0
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(CAPITALS) and lines[0]["row"] == "pairs.jsonl:1"
    assert {"model", "row", "chosen_logp", "rejected_logp", "margin", "reward_margin"} <= set(lines[0])
    md = (tmp_path / "report.md").read_text()
    assert "| preference_accuracy |" in md and "| reward_margin |" in md and "implicit rewards against `base`" in md
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(r["metrics"], ["base", "quickstart"])
    assert any(row.startswith("| preference_margin | ") and "✓" in row for row in table)


def test_gates_on_the_pair_metrics(pair_rows, tiny_ct, trained, tmp_path):
    from toolkit.eval.run import run_eval

    recipe = _recipe(tiny_ct, trained)
    mins = ["reward_accuracy=1.01", "preference_margin.text=0"]  # .text: the image pair makes two groups
    bad = run_eval(recipe, data="with-images", out=tmp_path / "a", mins=mins)
    assert len(bad.failures) == 1 and bad.failures[0].startswith("FAILED quickstart: reward_accuracy = ")
    assert bad.report["thresholds"][0]["models"] == ["quickstart"]  # the reference is the yardstick, not gated
    for kwargs, message in [
        ({"mins": ["loss=1"]}, "lower-is-better"),
        ({"maxs": ["loss=1"]}, "metric 'loss' is not computed"),  # conversations' metric, not the pairs'
        ({"mins": ["exact_match=0.5"]}, "metric 'exact_match' is not computed"),
        ({"mins": ["preference_accuracy.video=0.5"]}, "is not computed"),
    ]:
        with pytest.raises(ToolkitError, match=message):
            run_eval(recipe, out=tmp_path / "b", **kwargs)
    # the base alone has no reference: reward_* are not computed, and asking for them is refused up front
    alone = load_recipe(QUICKSTART, [f"base.path={tiny_ct}", f"output.dir={tmp_path / 'none'}"])
    with pytest.raises(ToolkitError, match="metric 'reward_accuracy' is not computed"):
        run_eval(alone, out=tmp_path / "c", mins=["reward_accuracy=0.5"])
    only_base = run_eval(alone, out=tmp_path / "c", mins=["preference_accuracy=0"])
    assert list(only_base.report["metrics"]) == ["base"] and only_base.report["reference"] is None
    assert not any(k.startswith("reward") for k in only_base.report["metrics"]["base"])


def test_an_adapter_as_the_reference(pair_rows, tiny_ct, trained, tmp_path):
    """--reference NAME: rewards against that adapter (the base's reward margin is then the adapter's against the
    base, negated), and the reference is not gated."""
    from toolkit.eval.run import run_eval

    against_base = run_eval(_recipe(tiny_ct, trained), out=tmp_path / "a").report["metrics"]
    r = run_eval(_recipe(tiny_ct, trained), out=tmp_path / "b", reference="quickstart", mins=["reward_margin=0"])
    assert r.report["reference"] == "quickstart" and list(r.report["models"]) == ["base", "quickstart"]
    values = r.report["metrics"]
    assert values["quickstart"]["reward_margin"] == 0.0 and values["quickstart"]["reward_accuracy"] == 0.0
    assert values["base"]["reward_margin"] == pytest.approx(-against_base["quickstart"]["reward_margin"], abs=1e-9)
    assert r.report["thresholds"][0]["models"] == ["quickstart"]  # nothing but the reference: it is gated alone


def test_reference_is_refused_on_conversation_rows(tiny_ct, trained, tmp_path):
    from toolkit.eval.run import run_eval

    with pytest.raises(ToolkitError, match="--reference applies to preference pairs"):
        run_eval(_recipe(tiny_ct, trained), out=tmp_path, reference="base")


# ---------------------------------------------------------------------------------------------------- HTTP


def test_url_scores_the_same_pairs_as_in_process(pair_rows, server, tiny_ct, trained, tmp_path):
    from toolkit.eval.run import run_eval

    recipe = _recipe(tiny_ct, trained, "base.kernel=torch")
    local = run_eval(recipe, out=tmp_path / "local")
    remote = run_eval(recipe, url=server.url + "/v1", out=tmp_path / "http")
    assert remote.report["mode"] == "http" and remote.report["reference"] == "base"
    for label in ("base", "quickstart"):
        assert remote.report["metrics"][label].keys() == local.report["metrics"][label].keys()
        for name, value in local.report["metrics"][label].items():
            assert remote.report["metrics"][label][name] == pytest.approx(value, abs=1e-4), (label, name)
    here = [json.loads(x) for x in (tmp_path / "local" / "answers.jsonl").read_text().splitlines()]
    there = [json.loads(x) for x in (tmp_path / "http" / "answers.jsonl").read_text().splitlines()]
    for a, b in zip(here, there, strict=True):
        assert (a["model"], a["row"], a["chosen_tokens"]) == (b["model"], b["row"], b["chosen_tokens"])
        assert b["chosen_logp"] == pytest.approx(a["chosen_logp"], abs=1e-4)
        assert b["rejected_logp"] == pytest.approx(a["rejected_logp"], abs=1e-4)


def test_image_pairs_are_refused_over_http(pair_rows, server, tiny_ct, trained, tmp_path):
    from toolkit.eval.run import run_eval

    with pytest.raises(ToolkitError) as err:
        run_eval(_recipe(tiny_ct, trained), data="with-images", url=server.url + "/v1", out=tmp_path)
    assert err.value.where == "pairs.jsonl:9" and "with images cannot be scored over HTTP" in err.value.what
    assert not (tmp_path / "report.json").exists()

"""`toolkit eval`: metrics on known strings, loss against an independent computation, the gate's exit codes,
determinism, bad eval files, and --url against a live `toolkit serve`."""

from __future__ import annotations

import json
import math

import pytest
from helpers import ROOT, run_cli
from typer.testing import CliRunner

from toolkit.errors import ToolkitError
from toolkit.eval import metrics
from toolkit.recipe import load_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _recipe(tiny_ct, trained, *extra):
    return load_recipe(
        QUICKSTART,
        [f"base.path={tiny_ct}", f"output.dir={trained.adapter_dir.parent}", "output.name=quickstart", *extra],
    )


# ------------------------------------------------------------------------------------------------- metrics


def test_metrics_on_known_strings():
    assert metrics.exact_match(" Paris\n", "Paris") == 1.0
    assert metrics.exact_match("paris", "Paris") == 0.0  # exact means exact (case too)
    assert metrics.contains("The answer is PARIS.", "Paris") == 1.0
    assert metrics.contains("Lyon", "Paris") == 0.0
    assert metrics.regex("Rome, of course", r"^Rome\b") == 1.0
    assert metrics.regex("Not Rome", r"^Rome\b") == 0.0
    assert metrics.regex("anything", None) is None  # rows without a pattern are not counted
    # ROUGE-L F1: LCS "the cat on the mat" = 5 of 6 words on both sides
    assert metrics.rouge_l("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("Zürich liegt am See", "Zürich liegt am Zürichsee") == pytest.approx(3 / 4)
    assert metrics.rouge_l("", "Paris") == 0.0
    assert not metrics.higher_is_better("loss.text") and metrics.higher_is_better("rouge_l.image")


def test_group_means_skip_rows_a_metric_does_not_apply_to():
    from types import SimpleNamespace as NS

    from toolkit.eval.evaluate import generation_metrics

    def row(answer_ref, regex, images):
        msgs = [NS(content="q"), NS(content=answer_ref)]
        return NS(row=NS(messages=msgs, regex=regex), encoded=NS(num_images=images))

    rows = [row("Paris", "^Par", 0), row("Rome", None, 0), row("red", "red", 1)]
    summary, per_row = generation_metrics(rows, ["Paris", "Milan", "blue"], ["exact_match", "regex"])
    assert summary["exact_match"] == pytest.approx(1 / 3)
    assert summary["exact_match.text"] == 0.5 and summary["exact_match.image"] == 0.0
    assert summary["regex"] == 0.5 and summary["regex.text"] == 1.0  # the row without a pattern is left out
    assert per_row[1]["regex"] is None


# ---------------------------------------------------------------------------------------------------- loss


def test_loss_equals_an_independent_computation_on_a_hand_checked_row(base):
    """One eval row ("Which city is the capital of France?" -> "Paris"): the labelled tokens are exactly the
    answer and its <end_of_turn>, and the loss is the mean of -log p(token) over them, computed here with a
    plain forward pass and log_softmax (no padding, no collator, no cross_entropy)."""
    import torch

    from toolkit.data.datasets import load_eval_rows
    from toolkit.eval.scoring import mean_loss, row_losses

    recipe = load_recipe(QUICKSTART, [f"base.path={base.path}"])
    rows, _ = load_eval_rows(recipe.data, base.processor)
    row = rows[0]
    assert row.row.where.endswith("eval.jsonl:1")
    enc = row.encoded
    labelled = [i for i, t in enumerate(enc.labels) if t != -100]
    assert base.tokenizer.decode([enc.input_ids[i] for i in labelled]) == "Paris<end_of_turn>"

    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits = base.model(input_ids=ids, token_type_ids=torch.tensor([enc.token_type_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    nll = [-float(logp[i - 1, enc.input_ids[i]]) for i in labelled]  # position i-1 predicts token i
    expected = sum(nll) / len(nll)

    (pair,) = row_losses(base.model, [row], base.tokenizer.pad_token_id, "cpu", base.dtype)
    assert pair[1] == len(labelled) == 2
    assert mean_loss([pair])["loss"] == pytest.approx(expected, rel=1e-5)
    assert mean_loss([pair])["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # batched with other (longer, image) rows, padding does not change it
    batch = row_losses(base.model, rows[:8], base.tokenizer.pad_token_id, "cpu", base.dtype)
    assert batch[0][0] / batch[0][1] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------------ commands


@pytest.fixture(scope="module")
def first_run(tiny_ct, trained, tmp_path_factory):
    from toolkit.eval.run import run_eval

    out = tmp_path_factory.mktemp("eval") / "a"
    return run_eval(_recipe(tiny_ct, trained), out=out)


def test_eval_compares_base_and_adapter_and_writes_every_report_file(first_run):
    r = first_run.report
    assert list(r["models"]) == ["base", "quickstart"] and r["mode"] == "in-process"
    base, adapter = r["metrics"]["base"], r["metrics"]["quickstart"]
    assert adapter["loss"] < 0.25 * base["loss"]
    for task in ("text", "image"):  # the quickstart's promise: the adapter beats the base on both tasks
        assert adapter[f"exact_match.{task}"] > base[f"exact_match.{task}"]
    assert r["models"]["quickstart"]["base_fingerprint"] == r["models"]["base"]["fingerprint"]
    assert len(r["models"]["quickstart"]["fingerprint"]) == 16 and r["versions"]["peft"]
    out = first_run.out_dir
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "answers.jsonl", "chart.png"}
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 * r["data"]["rows"]
    assert {"model", "row", "reference", "answer", "exact_match", "loss"} <= set(answers[0])
    assert "| exact_match.image |" in (out / "report.md").read_text()
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_is_deterministic(first_run, tiny_ct, trained, tmp_path):
    from toolkit.eval.run import run_eval

    second = run_eval(_recipe(tiny_ct, trained), out=tmp_path / "b")
    a, b = dict(first_run.report), dict(second.report)
    a.pop("created"), b.pop("created")
    assert a == b
    for name in ("answers.jsonl", "report.md", "chart.png"):
        assert (first_run.out_dir / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_threshold_exit_codes(tiny_ct, trained, tmp_path):
    from cli import app

    common = [
        "eval",
        str(QUICKSTART),
        "--set",
        f"base.path={tiny_ct}",
        "--adapter",
        f"quickstart={trained.adapter_dir}",
        "--out",
        str(tmp_path),
        "--set",
        "eval.metrics=[loss, exact_match]",
    ]
    ok = CliRunner().invoke(app, [*common, "--min", "exact_match.image=0.5", "--max", "loss=5"])
    assert ok.exit_code == 0, ok.output
    assert "exact_match.image" in ok.output and "FAILED" not in ok.output
    bad = CliRunner().invoke(app, [*common, "--min", "exact_match.text=0.99", "--min", "exact_match.image=0.5"])
    assert bad.exit_code == 1
    assert "FAILED quickstart: exact_match.text = " in bad.output and "< 0.99 (--min)" in bad.output
    assert "exact_match.image =" not in bad.output.split("FAILED", 1)[1]  # only the missed threshold is named
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and len(report["failures"]) == 1
    for args, message in [
        (["--min", "loss=1"], "lower-is-better"),
        (["--min", "bleu=0.5"], "metric 'bleu' is not computed"),
        (["--min", "rouge_l=0.5"], "metric 'rouge_l' is not computed"),  # not selected in eval.metrics
        (["--min", "exact_match"], "is not METRIC=VALUE"),
    ]:
        r = run_cli(*common, *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_eval_file_names_file_and_row(tiny_ct, trained, tmp_path):
    from toolkit.eval.run import run_eval

    bad = tmp_path / "eval.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ToolkitError) as err:
        run_eval(_recipe(tiny_ct, trained), data=str(bad), out=tmp_path / "out")
    assert err.value.where.startswith(f"{bad}:2")
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ToolkitError) as err:
        run_eval(_recipe(tiny_ct, trained), data=str(bad), out=tmp_path / "out")
    assert err.value.where == f"{bad}:2" and "not valid JSON" in err.value.what


def test_url_against_a_live_server_gives_the_in_process_generation_metrics(first_run, make_server, tiny_ct, trained):
    from toolkit.eval.run import run_eval

    server = make_server()
    over_http = run_eval(_recipe(tiny_ct, trained), url=server.url + "/v1", out=first_run.out_dir.parent / "http")
    r = over_http.report
    assert r["mode"] == "http" and list(r["metrics"]) == ["base", "quickstart"]
    for label in ("base", "quickstart"):
        in_process = {k: v for k, v in first_run.report["metrics"][label].items() if not k.startswith(("loss", "perp"))}
        assert r["metrics"][label] == in_process, label

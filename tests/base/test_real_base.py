"""On the real Gemma 3 270M base (the `real` extra): things a random-weight base cannot show.

The base is GPTQ-built once per machine (minutes; CI's first run builds it) and cached by real_weights.py under
~/.cache/gemma3-lora-toolkit (or $TOOLKIT_CACHE); these tests read the cached folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import ROOT, LiveServer, all_at_once, run_cli

pytestmark = pytest.mark.real_base
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def real_base() -> Path:
    from toolkit.base import real_weights

    return real_weights.cached_base()


@pytest.fixture(scope="module")
def processor(real_base):
    from toolkit.base.loader import load_processor

    return load_processor(real_base)


@pytest.fixture(scope="module")
def capitals(real_base, tmp_path_factory):
    """A LoRA trained on 24 countries' capitals (one-word answers), evaluated on 8 held-out countries."""
    from toolkit.recipe import load_recipe
    from toolkit.train.trainer import train

    out = tmp_path_factory.mktemp("real-adapters")
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart-270m.yaml",
        [
            f"base.path={real_base}",
            f"output.dir={out}",
            "output.name=capitals",
            f"data.train={DATA / 'capitals-train.jsonl'}",
            f"data.eval={DATA / 'capitals-heldout.jsonl'}",
            "eval.metrics=[exact_match]",
        ],
    )
    return train(recipe)


def test_the_base_is_the_real_270m_in_the_27b_format(real_base, processor):
    config = json.loads((real_base / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, True)
    text = config["text_config"]
    assert (text["num_hidden_layers"], text["hidden_size"], text["vocab_size"], text["sliding_window"]) == (
        18,
        640,
        262208,
        512,
    )
    assert config["image_token_index"] == 262144
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>", "<start_of_image>"]) == [105, 106, 255999]
    assert len(tok) == 262145
    r = run_cli("info", real_base, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "vision tower   RANDOM" in r.stdout and "Gemma terms of use" in r.stdout
    # the int8 head's kernel on this CPU: kept from a first load's timing, or to be timed at the first load
    assert re.search(r"lm head kernel +(int8-(weight-only|dynamic), auto \(|the faster kernel, timed)", r.stdout)
    assert "RANDOM" in (real_base / "README.md").read_text()


def test_training_ids_equal_the_processors_ids_for_the_whole_conversation(real_base, processor):
    """Every quickstart row (text, images, system turns), encoded turn by turn for training, is token for token
    what Gemma3Processor gives for the whole rendered conversation with the real 262k vocabulary."""
    from toolkit.data.datasets import load_data
    from toolkit.data.template import load_images, to_template_messages
    from toolkit.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart-270m.yaml", [f"base.path={real_base}"])
    report = load_data(recipe.data, processor)
    rows = report.train + report.eval
    assert len(rows) == 112
    for item in rows:
        row = item.row
        images = load_images(row.messages, base_dir=row.base_dir, policy=None)
        text = processor.apply_chat_template(to_template_messages(row.messages), tokenize=False)
        want = processor(text=text, images=images or None, add_special_tokens=False)["input_ids"][0]
        assert item.encoded.input_ids == list(want), row.where
        answer = [t for t, label in zip(item.encoded.input_ids, item.encoded.labels, strict=True) if label != -100]
        answers = "".join(f"{m.content}<end_of_turn>" for m in row.messages if m.role == "assistant")
        assert processor.tokenizer.decode(answer) == answers, row.where  # every answer trained, nothing else


def test_a_lora_on_some_capitals_answers_held_out_countries(capitals):
    """Held-out countries' capitals are knowledge only the real weights hold; the adapter teaches the answer format.

    Measured on this base: 4 of 8 held-out capitals exactly on an AMD EPYC (AVX2, 2026-11-25: Budapest, Amsterdam,
    Jakarta, Hanoi; Oslo for Finland), at 3 and at 10 epochs alike; 2 of 8 on an Intel Xeon with AVX512 (2026-12-01:
    Amsterdam, Jakarta; "Teheran", "Czechoslovak"), the same with float32 or bfloat16 inference: training's float
    rounding differs per CPU and 18 steps on 24 rows leave the held-out answers near ties. The 270M's own knowledge
    is the limit; a random base gets none, so two exact held-out capitals already need the real weights.
    """
    adapter = capitals.metrics["adapter"]
    score = adapter.get("exact_match", adapter.get("exact_match.text"))
    assert score >= 0.25 and score > capitals.metrics["base"]["exact_match"], capitals.metrics


def _ask(url: str, messages: list, max_tokens: int = 12, model: str = "capitals") -> str:
    import httpx

    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def server(real_base, capitals):
    from toolkit.serve.app import build_state

    # Fixed prefill chunks: paced chunks follow measured step times, so a prompt's pass boundaries (and its float
    # rounding) would differ between a run alone and a run beside others.
    adapters = [f"capitals={capitals.adapter_dir}", f"capitals-copy={capitals.adapter_dir}"]
    state = build_state(base=str(real_base), device="cpu", adapters=adapters, prefill_pacing=None)
    live = LiveServer(state)
    yield live
    live.stop()


def test_served_greedy_answer_equals_toolkit_chat(server, real_base, capitals):
    question = "What is the capital of Hungary?"
    served = _ask(server.url, [{"role": "user", "content": question}])
    r = run_cli("chat", real_base, question, "--adapter", f"capitals={capitals.adapter_dir}", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"model + capitals: {json.dumps(served)}"
    assert served and " " not in served.strip()  # the one-word answer format the adapter learned


def test_long_prompts_past_the_sliding_window_answer_the_same_alone_and_batched(server, processor):
    from toolkit.base import real_weights

    words = real_weights.heldout_text().split()
    prompts = [" ".join(words[i * 900 : (i + 1) * 900]) + "\n\nWhat is the capital of Hungary?" for i in range(3)]
    lengths = [len(processor.tokenizer(p)["input_ids"]) for p in prompts]
    assert min(lengths) > 2 * 512, lengths  # the 512-token sliding window is crossed at least twice
    messages = [[{"role": "user", "content": p}] for p in prompts]
    alone = [_ask(server.url, m, max_tokens=8) for m in messages]
    batched = all_at_once(lambda m: _ask(server.url, m, max_tokens=8), messages)
    assert batched == alone
    assert all(a for a in alone)


def test_rows_on_two_adapters_and_the_base_in_one_batch_answer_as_each_alone(server):
    """Mixed passes on the real shapes (262k-token head, 640 hidden): rows on two adapters and on the base, sent
    together, are grouped by adapter with the adapters' LoRA stacked into batched GEMMs (engine/lean_decode.py);
    each answer equals the one its request gets alone, the two names of one adapter answer alike, and the base's
    rows get no LoRA (the adapter's one-word format is not theirs)."""
    import httpx

    base = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    questions = [f"What is the capital of {c}?" for c in ("Hungary", "Japan", "Kenya")]
    jobs = [(model, q) for q in questions for model in ("capitals", base, "capitals-copy")]

    def ask(job: tuple[str, str]) -> str:
        return _ask(server.url, [{"role": "user", "content": job[1]}], model=job[0])

    alone = {job: ask(job) for job in jobs}
    assert dict(zip(jobs, all_at_once(ask, jobs), strict=True)) == alone
    assert all(alone[("capitals", q)] == alone[("capitals-copy", q)] for q in questions)
    assert all(" " not in alone[("capitals", q)].strip() for q in questions)
    assert any(alone[(base, q)] != alone[("capitals", q)] for q in questions)

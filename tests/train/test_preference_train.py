"""Preference methods end to end on the tiny base: DPO, KTO, ORPO and SimPO train on text and image pairs, resume
after a kill, write adapters that serve; DPO moves held-out preference accuracy up; SFT then DPO uses the SFT
adapter as its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ROOT, accelerate_train, kill_at_checkpoint, same_weights, start_cli_logged

from toolkit.errors import ToolkitError
from toolkit.recipe import load_recipe

QUICKSTART_DPO = ROOT / "recipes" / "quickstart-dpo.yaml"
# a short run per method: the quickstart's pairs (text and image), batch 4 (KTO needs 2+)
SHORT = ["training.max_steps=12", "training.logging_every=1"]
METHODS = ["dpo", "kto", "orpo", "simpo"]


def _recipe(tiny_ct, out_dir, *extra):
    return load_recipe(QUICKSTART_DPO, [f"base.path={tiny_ct}", f"output.dir={out_dir}", *extra])


def _metrics(adapter_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_run(tiny_ct, tmp_path_factory):
    """The quickstart DPO recipe as shipped (about 10 s of training on 2 cores)."""
    from toolkit.train.trainer import train

    return train(_recipe(tiny_ct, tmp_path_factory.mktemp("dpo")))


def test_dpo_moves_held_out_preference_accuracy_up(dpo_run):
    base, adapter = dpo_run.metrics["base"], dpo_run.metrics["adapter"]
    assert base["preference_accuracy"] <= 0.7, base
    assert adapter["preference_accuracy"] >= base["preference_accuracy"] + 0.2, (base, adapter)
    assert adapter["preference_margin"] > base["preference_margin"]
    # both kinds of held-out pairs are scored, and both improve
    assert adapter["preference_accuracy.image"] > base["preference_accuracy.image"]
    assert adapter["preference_accuracy.text"] > base["preference_accuracy.text"]


def test_dpo_logs_trl_reward_metrics_and_records_the_method(dpo_run):
    rows = _metrics(dpo_run.adapter_dir)
    first = rows[0]
    # step 1: the adapter starts as the base, so every reward is 0 and TRL's strict ">" gives accuracy 0.0
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/accuracies"] == 0
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    last = [r for r in rows if "rewards/accuracies" in r][-1]
    assert last["rewards/margins"] > 0
    manifest = json.loads((dpo_run.adapter_dir / "toolkit.json").read_text())
    assert manifest["recipe"]["training"]["method"] == "dpo"
    assert manifest["metrics"]["train"]["method"] == "dpo" and manifest["init_adapter"] is None
    card = (dpo_run.adapter_dir / "README.md").read_text()
    assert "Method: dpo, beta 0.1" in card and "preference_accuracy" in card
    saved = json.loads((dpo_run.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 16
    assert not (dpo_run.adapter_dir / "ref").exists()  # TRL's frozen reference copy is not written


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
def test_each_method_trains_on_text_and_image_pairs(tiny_ct, tmp_path, method):
    from toolkit.train.trainer import train

    extra = ["training.learning_rate=2e-3"] + (["training.beta=2.0"] if method == "simpo" else [])
    result = train(_recipe(tiny_ct, tmp_path, f"training.method={method}", *SHORT, *extra))
    rows = _metrics(result.adapter_dir)
    assert result.step == 12 and rows[-1]["step"] == 12
    # a dozen steps move the held-out margin towards the chosen answers (the per-batch loss is too noisy to say)
    base, adapter = result.metrics["base"], result.metrics["adapter"]
    assert adapter["preference_margin"] > base["preference_margin"] + 0.3, (base, adapter)
    assert result.metrics["train"]["method"] == method


def test_sft_then_dpo_takes_the_sft_adapter_as_its_reference(trained, tiny_ct, tmp_path):
    """Against the SFT adapter (not the bare base) the rewards are exactly 0 at the first step."""
    from toolkit.train.trainer import train

    init = f"quickstart={trained.adapter_dir}"
    result = train(
        _recipe(tiny_ct, tmp_path, f"training.init_adapter={init}", "training.max_steps=3", "training.logging_every=1")
    )
    first = _metrics(result.adapter_dir)[0]
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/margins"] == 0
    manifest = json.loads((result.adapter_dir / "toolkit.json").read_text())
    assert manifest["init_adapter"]["name"] == "quickstart" and manifest["init_adapter"]["method"] == "sft"
    assert (
        manifest["base"]["fingerprint"]
        == json.loads((trained.adapter_dir / "toolkit.json").read_text())["base"]["fingerprint"]
    )
    # the held-out table has the starting adapter as its reference column
    assert {"base", "reference", "adapter"} <= set(result.metrics)
    # the bare base would not give zero rewards: the SFT adapter moved the answers' log-probabilities
    assert result.metrics["reference"]["preference_margin"] != pytest.approx(
        result.metrics["base"]["preference_margin"]
    )


def test_init_adapter_refuses_another_shape_and_a_missing_adapter(trained, tiny_ct, tmp_path):
    from toolkit.train.trainer import train

    init = f"training.init_adapter=quickstart={trained.adapter_dir}"
    with pytest.raises(ToolkitError, match="lora.r is 8 but init_adapter 'quickstart' has 16"):
        train(_recipe(tiny_ct, tmp_path, init, "lora.r=8", "training.max_steps=1"))
    with pytest.raises(ToolkitError, match="training.init_adapter"):
        train(_recipe(tiny_ct, tmp_path, "training.init_adapter=nowhere", "training.max_steps=1"))


def test_method_settings_of_another_method_are_refused(tiny_ct, tmp_path):
    with pytest.raises(ToolkitError, match="gamma is a setting of simpo, and training.method is dpo"):
        _recipe(tiny_ct, tmp_path, "training.gamma=0.5")
    with pytest.raises(
        ToolkitError, match=r"training: kto estimates its KL term .* training.batch_size >= 2 \(TRL's rule\)"
    ):
        _recipe(tiny_ct, tmp_path, "training.method=kto", "training.batch_size=1")


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_mid_run_resumes_and_matches_an_uninterrupted_run(tiny_ct, tmp_path, method):
    common = [
        QUICKSTART_DPO,
        "--set",
        f"base.path={tiny_ct}",
        "--set",
        f"training.method={method}",
        "--set",
        "training.max_steps=60",
        "--set",
        "training.save_every=10",
        "--set",
        "training.logging_every=1",
    ]
    straight = start_cli_logged(tmp_path / "straight", "train", *common, "--set", f"output.dir={tmp_path / 'a'}")
    killed = start_cli_logged(tmp_path / "killed", "train", *common, "--set", f"output.dir={tmp_path / 'b'}")
    checkpoint = tmp_path / "b" / ".quickstart-dpo.run" / "checkpoint-10" / "trainer_state.json"
    kill_at_checkpoint(killed, checkpoint, tmp_path / "killed")
    assert not (tmp_path / "b" / "quickstart-dpo").exists()
    resumed = start_cli_logged(
        tmp_path / "resumed", "train", *common, "--set", f"output.dir={tmp_path / 'b'}", "--resume"
    )
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.err").read_text()[-2000:]
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.err").read_text()[-2000:]
    a = json.loads((tmp_path / "a" / "quickstart-dpo" / "toolkit.json").read_text())["metrics"]
    b = json.loads((tmp_path / "b" / "quickstart-dpo" / "toolkit.json").read_text())["metrics"]
    assert a["train"]["steps"] == b["train"]["steps"] == 60
    assert same_weights(tmp_path / "a" / "quickstart-dpo", tmp_path / "b" / "quickstart-dpo") < 0.02


def test_a_dpo_adapter_serves_like_any_other(dpo_run, tiny_ct):
    import torch

    from toolkit.base.loader import load_base
    from toolkit.lora.registry import attach, resolve_adapter

    base = load_base(tiny_ct, device="cpu")
    model = attach(base, [resolve_adapter(f"dpo={dpo_run.adapter_dir}")])
    assert list(model.peft_config) == ["dpo"]  # one adapter: no reference copy came with it
    ids = base.tokenizer("Which city is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)  # the adapter's weights are loaded and change the answer


def test_a_pass_without_gradients_reuses_the_weights_a_training_forward_dequantised(tiny_ct):
    """DPO's reference pass runs right after the policy's forward, whose dequantised weights autograd keeps for the
    backward: the same bits are taken again instead of dequantised a second time, and nothing more is kept."""
    import gc

    import torch

    from toolkit.base.loader import load_base

    base = load_base(tiny_ct, device="cpu", training=True)
    layer = next(m for m in base.model.modules() if getattr(m, "_toolkit_dequantized", 0) is None)
    kept = layer.dequantize_weight()  # a training forward's dequantisation (gradients enabled)
    reference = kept.clone()
    with torch.no_grad():
        assert layer.dequantize_weight() is kept
    del kept
    gc.collect()  # the backward has run: autograd let the weight go, and this module holds no copy
    assert layer._toolkit_dequantized() is None
    with torch.no_grad():
        again = layer.dequantize_weight()
    assert torch.equal(again, reference)


def test_dpo_under_accelerate_with_two_processes_on_cpu(tiny_ct, tmp_path):
    """The documented multi-GPU command with a preference method: DDP on CPU (gloo), one adapter written."""
    r = accelerate_train(QUICKSTART_DPO, f"base.path={tiny_ct}", f"output.dir={tmp_path}", "training.epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("adapter written to") == 1  # only the main process writes
    manifest = json.loads((tmp_path / "quickstart-dpo" / "toolkit.json").read_text())
    assert manifest["metrics"]["train"]["steps"] == 10  # 80 pairs over 2 ranks, batch 4, one epoch
    assert manifest["metrics"]["adapter"]["reward_margin"] > 0

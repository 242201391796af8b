"""GRPO end to end on the tiny base: a built-in and a user reward on text and image prompts, TRL's metric names, the
rollouts' log-probabilities against the training forward's (before and after an update), the image token never
sampled, resume after a kill, the recipe's refusals, and `toolkit eval` on a grpo recipe.

The tiny base is nearly deterministic at temperature 1 (every completion the same, so every group's rewards tie and
no gradient flows): the runs here sample at temperature 2 and reward the parity of the first completion token, which
splits most groups."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT, kill_at_checkpoint, run_cli, same_weights, start_cli_logged

from toolkit.errors import ToolkitError
from toolkit.recipe import load_recipe

QUICKSTART = ROOT / "recipes" / "data" / "quickstart"
QUICKSTART_GRPO = ROOT / "recipes" / "quickstart-grpo.yaml"
NAME = "grpo-test"
STEPS = 8
# Engine log-probabilities against the training forward's, same tokens and weights, float32 on CPU (the engine's lean
# decoding against the full forward): measured 1.5e-6 at step 0 and 1.2e-6 after an update (the test below), 1.9e-6
# in the training loop (sampling/sampling_logp_difference/max); never more than 3e-6 seen.
LOGP_TOL = 1e-4

RECIPE = f"""
# float32, the reference kernel: the tolerances below are float32's (auto may train with torch_fused, the fastest on
# some CPUs, whose layers multiply in bfloat16: a one-row step and a whole sequence then round differently)
base: {{path: set-by-the-test, device: cpu, kernel: torch}}
data:
  train: train.jsonl
  eval: eval.jsonl
  max_seq_len: 256
  max_images_per_conversation: 1
lora: {{r: 8, alpha: 16, dropout: 0.0}}
training:
  method: grpo
  rewards:
    - {{type: contains}}
    - {{type: function, path: rewards.py:first_token_odd, weight: 0.5}}
  num_generations: 4
  max_completion_length: 6
  temperature: 2.0
  batch_size: 4
  grad_accum: 1
  steps_per_generation: 2   # old log-probs computed: the engine's are compared with them every rollout batch
  max_steps: {STEPS}
  learning_rate: 1.0e-2
  lr_scheduler: constant
  warmup_ratio: 0.0
  gradient_checkpointing: false
  logging_every: 1
eval: {{max_new_tokens: 6, batch_size: 8}}
output: {{name: {NAME}}}
"""

REWARDS = '''
"""A user reward with TRL's signature that records what it was called with (calls.jsonl beside it)."""
import json
from pathlib import Path

CALLS = Path(__file__).with_name("calls.jsonl")


def _image_prompt(prompt):
    return isinstance(prompt, list) and any(
        isinstance(m["content"], list) and any(p.get("type") == "image_url" for p in m["content"]) for m in prompt
    )


def first_token_odd(prompts, completions, completion_ids, **kwargs):
    state = kwargs.get("trainer_state")
    with CALLS.open("a") as f:
        record = {
            "n": len(completions),
            "answer": kwargs.get("answer"),
            "step": None if state is None else state.global_step,
            "image_prompts": sum(map(_image_prompt, prompts)),
            "text_prompts": sum(not _image_prompt(p) for p in prompts),
            "completions": [c[-1]["content"] if isinstance(c, list) else c for c in completions],
        }
        f.write(json.dumps(record) + "\\n")
    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]
'''


def _rows(source: Path, text: int, image: int) -> list[dict]:
    """The first quickstart grpo rows of each kind, image paths made absolute (the rows move to a tmp folder)."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    texts = [r for r in rows if "images" not in r][:text]
    images = [r for r in rows if "images" in r][:image]
    for r in images:
        r["images"] = [str(source.parent / p) for p in r["images"]]
    return texts + images


def _write_folder(folder: Path) -> Path:
    """A grpo recipe, its reward file and 2 text + 2 image prompts (train and eval each); returns the recipe."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("train.jsonl", "grpo_train.jsonl"), ("eval.jsonl", "grpo_eval.jsonl")):
        rows = _rows(QUICKSTART / source, 2, 2)
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rewards.py").write_text(REWARDS)
    recipe = folder / "grpo.yaml"
    text = RECIPE.replace("train.jsonl", str(folder / "train.jsonl")).replace("eval.jsonl", str(folder / "eval.jsonl"))
    recipe.write_text(text)
    return recipe


def _load(recipe: Path, tiny_ct, out_dir, *extra):
    return load_recipe(recipe, [f"base.path={tiny_ct}", f"output.dir={out_dir}", *extra])


def _calls(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_run(tiny_ct, tmp_path_factory):
    """The recipe above trained in-process (8 steps, about 10 s on 2 cores): (result, recipe file)."""
    from toolkit.train.trainer import train

    folder = tmp_path_factory.mktemp("grpo")
    recipe_file = _write_folder(folder)
    return train(_load(recipe_file, tiny_ct, folder / "adapters")), recipe_file


# ------------------------------------------------------------------------------------------------- training


def test_trains_on_text_and_image_prompts_with_a_builtin_and_a_user_reward(grpo_run):
    result, recipe_file = grpo_run
    d = result.adapter_dir
    assert result.step == STEPS
    for name in ("adapter_config.json", "adapter_model.safetensors", "toolkit.json", "metrics.jsonl"):
        assert (d / name).is_file(), name
    manifest = json.loads((d / "toolkit.json").read_text())
    assert manifest["recipe"]["training"]["method"] == "grpo"
    train_summary = manifest["metrics"]["train"]
    assert train_summary["method"] == "grpo" and train_summary["steps"] == STEPS
    assert train_summary["rewards"] == ["contains", "first_token_odd"] and train_summary["num_generations"] == 4

    # TRL's metric names, logged with the first step each rollout batch serves (logging_every 1)
    lines = _jsonl(d / "metrics.jsonl")
    logged = [r for r in lines if "reward" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1, 2))
    names = {
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        *(f"rewards/{n}/{s}" for n in ("contains", "first_token_odd") for s in ("mean", "std")),
    }
    for r in logged:
        assert names <= set(r), names - set(r)
        assert 0 < r["completions/mean_length"] <= 6 and 0 <= r["completions/clipped_ratio"] <= 1
        # reward = contains + 0.5 x first_token_odd, averaged over the same completions
        weighted = r["rewards/contains/mean"] + 0.5 * r["rewards/first_token_odd/mean"]
        assert r["reward"] == pytest.approx(weighted, abs=1e-6)
    assert any(r["reward_std"] > 0 and r["frac_reward_zero_std"] < 1 for r in logged)  # groups that did not tie
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, STEPS + 1))
    assert any(r["grad_norm"] > 0 for r in lines if "loss" in r)
    # steps_per_generation 2 > grad_accum 1: TRL's old log-probs were computed and the engine's compared with them
    gaps = [r["sampling/sampling_logp_difference/max"] for r in logged if "sampling/sampling_logp_difference/max" in r]
    assert len(gaps) == STEPS // 2 and max(gaps) <= LOGP_TOL, gaps

    # sampled completions with their rewards beside the metrics
    samples = _jsonl(d / "completions.jsonl")
    assert samples and {s["step"] for s in samples} <= set(range(1, STEPS + 1))
    for s in samples:
        assert set(s["rewards"]) == {"contains", "first_token_odd"} and s["rewards"]["first_token_odd"] in (0.0, 1.0)
        assert isinstance(s["completion"], str) and s["row"].startswith(str(recipe_file.parent / "train.jsonl"))
        assert s["finish"] in ("stop", "length") and isinstance(s["advantage"], float)

    # the user function: TRL's keywords (the `answer` column aligned with the completions, trainer_state)
    calls = _calls(recipe_file.parent)
    training = [c for c in calls if c["step"] is not None]
    assert [c["step"] for c in training] == list(range(0, STEPS, 2))  # one rollout batch per 2 optimizer steps
    train_answers = {r["answer"] for r in _jsonl(recipe_file.parent / "train.jsonl")}
    for c in training:
        assert c["n"] == 8 and len(c["answer"]) == 8 and set(c["answer"]) <= train_answers
        assert len(set(c["answer"][:4])) == 1 and len(set(c["answer"][4:])) == 1  # whole groups of one prompt
    assert {a for c in training for a in c["answer"]} == train_answers  # every prompt was trained on
    assert sum(c["image_prompts"] for c in training) > 0 and sum(c["text_prompts"] for c in training) > 0
    # the completions it scored are the ones logged (the decoded text, as TRL's conversational completions)
    assert {s["completion"] for s in samples} <= {t for c in training for t in c["completions"]}

    # the gradient reached every adapted module: LoRA B starts at zero, and none is zero now
    from safetensors.torch import load_file

    weights = load_file(d / "adapter_model.safetensors")
    b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(b) == 4 * 7  # the tiny base's 4 layers x 7 target modules
    zero = [k for k, v in b.items() if not v.abs().max() > 0]
    assert not zero, zero

    # held-out prompts scored at the end: the rewards of the greedy answers, base and adapter, text and image
    for label in ("base", "adapter"):
        m = result.metrics[label]
        for key in ("reward", "reward_contains", "reward_first_token_odd"):
            for suffix in ("", ".text", ".image"):
                assert isinstance(m[f"{key}{suffix}"], float), (label, key, suffix)


def test_a_reward_function_that_takes_trainer_state_is_scored_on_held_out_prompts(tiny_ct, tmp_path):
    """TRL passes `trainer_state` to every reward call, and functions written for TRL name it as a parameter.
    The held-out scoring at the end of a run (and `toolkit eval`) calls the same functions: they must not fail
    there for want of it (it ran after every training step, so the run would stop only at the end, with no
    adapter written)."""
    from transformers import AutoProcessor

    from toolkit.data.datasets import load_data
    from toolkit.eval.evaluate import reward_metrics
    from toolkit.eval.rewards import build_rewards
    from toolkit.recipe import DataSection, RewardSpec

    (tmp_path / "rewards.py").write_text(
        textwrap.dedent(
            """
            def staged(prompts, completions, completion_ids, trainer_state, **kwargs):
                return [1.0 for _ in completions]
            """
        )
    )
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Capital of France?", "answer": "Paris"}) + "\n")
    processor = AutoProcessor.from_pretrained(tiny_ct)
    rows = load_data(DataSection(train=str(tmp_path / "p.jsonl"), eval_fraction=0.0), processor, "grpo").train
    rewards = build_rewards([RewardSpec(type="function", path="rewards.py:staged")], tmp_path)
    summary, _ = reward_metrics(rows, ["Paris"], rewards, processor.tokenizer)
    assert summary["reward"] == 1.0 and summary["reward_staged"] == 1.0


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_continues_from_an_init_adapter_with_and_without_a_kl_reference(grpo_run, tiny_ct, tmp_path, beta):
    """init_adapter starts GRPO from a trained adapter; with beta 0 no frozen copy exists (nothing to score as the
    reference), with beta > 0 the copy is the KL reference and scored in the held-out table; neither is written."""
    from toolkit.train.trainer import train

    result, recipe_file = grpo_run
    sets = [f"training.init_adapter={result.adapter_dir}", f"training.beta={beta}", "training.max_steps=2"]
    out = train(_load(recipe_file, tiny_ct, tmp_path, *sets), output_name="continued")
    manifest = json.loads((out.adapter_dir / "toolkit.json").read_text())
    assert manifest["init_adapter"]["path"] == str(result.adapter_dir)
    assert ("reference" in manifest["metrics"]) == (beta > 0)
    assert "reward" in manifest["metrics"]["adapter"] and "reward" in manifest["metrics"]["base"]
    assert set(json.loads((out.adapter_dir / "adapter_config.json").read_text())) and not list(
        out.adapter_dir.glob("ref")
    )


# ------------------------------------------------------------------------------------------------- rollouts


def _pad_batch(trainer, items: list, rollouts: list) -> tuple:
    """The training forward's inputs for these prompts and completions, as the trainer builds them."""
    from trl.trainer.utils import pad

    pad_id = trainer._tokenizer.pad_token_id
    prompt_ids = pad([torch.tensor(x.encoded.input_ids) for x in items], padding_value=pad_id, padding_side="left")
    prompt_mask = pad(
        [torch.ones(len(x.encoded.input_ids), dtype=torch.long) for x in items], padding_value=0, padding_side="left"
    )
    completion_ids = pad([torch.tensor(o.completion_ids) for o in rollouts], padding_value=pad_id)
    completion_mask = pad([torch.ones(len(o.completion_ids), dtype=torch.long) for o in rollouts], padding_value=0)
    keep = completion_ids.size(1)
    image_inputs = trainer._image_inputs(items, prompt_ids.size(1), keep, "cpu")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return input_ids, attention_mask, keep, image_inputs, completion_mask.bool()


def _forward_logps(trainer, items: list, rollouts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion token, the log-probability the training forward computes (train mode, LoRA dropout 0, TRL's
    fused head at the trainer's temperature), and the mask of real completion tokens."""
    input_ids, attention_mask, keep, image_inputs, mask = _pad_batch(trainer, items, rollouts)
    trainer.model.train()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, keep, **image_inputs
        )
    return logps, mask


def _engine_logps(rollouts: list) -> torch.Tensor:
    from trl.trainer.utils import pad

    return pad([torch.tensor(o.logprobs) for o in rollouts], padding_value=0.0)


def _gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask].max())


@pytest.fixture(scope="module")
def live(tiny_ct, tmp_path_factory):
    """A GRPO trainer built in-process as `toolkit train` builds it (one step to run), its prompts (2 text, 2 image)."""
    from transformers.trainer_callback import PrinterCallback

    from toolkit.base.loader import load_base, load_processor
    from toolkit.data.datasets import load_data
    from toolkit.train import grpo, image_masks
    from toolkit.train.trainer import _start_adapter, training_args

    folder = tmp_path_factory.mktemp("live")
    recipe = _load(_write_folder(folder), tiny_ct, folder / "adapters", "training.max_steps=1")
    processor = load_processor(tiny_ct)
    data = load_data(recipe.data, processor, "grpo")
    base = load_base(tiny_ct, device="cpu", training=True, kernel=recipe.base.kernel)
    model, _ = _start_adapter(recipe, base)
    image_masks.install(model)
    (folder / "run").mkdir()
    args = training_args(recipe, folder / "run", base.device, has_eval=False)
    trainer = grpo.build_trainer(recipe, model, data, args, processor.tokenizer, [])
    trainer.remove_callback(PrinterCallback)
    items = [x for x in data.train if not x.encoded.num_images] + [x for x in data.train if x.encoded.num_images]
    assert [x.encoded.num_images for x in items] == [0, 0, 1, 1]
    yield trainer, items
    trainer.rollouts.close()


def test_rollout_logprobs_equal_the_training_forward_before_and_after_an_update(live):
    """The issue's check: the log-probabilities the engine returns for a rollout equal what the training forward
    computes for the same tokens on the same adapter (within LOGP_TOL), at step 0 and after an optimizer update; the
    rollouts after it come from the new weights, not the old ones nor the bare base."""
    trainer, items = live
    model = trainer.model
    seeds = [11, 12, 13, 14]

    before = trainer.rollouts.generate([x.encoded for x in items], seeds)
    assert trainer.rollouts.engine.running == 0  # every row's KV storage freed before the caller goes on
    assert all(len(o.logprobs) == len(o.completion_ids) > 0 for o in before)  # the stop token has its log-prob too
    forward0, mask0 = _forward_logps(trainer, items, before)
    assert _gap(_engine_logps(before), forward0, mask0) <= LOGP_TOL
    with model.disable_adapter():  # LoRA B starts at zero: the new adapter is the base, exactly
        bare0, _ = _forward_logps(trainer, items, before)
    assert _gap(bare0, forward0, mask0) == 0

    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    start = {n: p.detach().clone() for n, p in lora.items()}
    trainer.train()  # one optimizer step: its own rollouts, rewards, loss and update
    assert trainer.state.global_step == 1
    moved = [n for n, p in lora.items() if "lora_B" in n and p.abs().max() > 0]
    assert len(moved) == len([n for n in lora if "lora_B" in n])  # the update reached every LoRA B

    after = trainer.rollouts.generate([x.encoded for x in items], seeds)
    assert all(len(o.logprobs) == len(o.completion_ids) > 0 for o in after)
    engine1 = _engine_logps(after)
    forward1, mask1 = _forward_logps(trainer, items, after)
    assert _gap(engine1, forward1, mask1) <= LOGP_TOL
    # ... which the old weights would not give: the engine reads the live adapter, no stale copy
    with torch.no_grad():
        now = {n: p.detach().clone() for n, p in lora.items()}
        for n, p in lora.items():
            p.copy_(start[n])
        stale, _ = _forward_logps(trainer, items, after)
        for n, p in lora.items():
            p.copy_(now[n])
    assert _gap(engine1, stale, mask1) > 100 * LOGP_TOL
    # the same tokens as before the update now have other log-probabilities
    forward_before_tokens, _ = _forward_logps(trainer, items, before)
    assert _gap(_engine_logps(before), forward_before_tokens, mask0) > 100 * LOGP_TOL
    # and the adapter matters: without it the forward gives other log-probabilities
    with model.disable_adapter():
        bare1, _ = _forward_logps(trainer, items, after)
    assert _gap(bare1, forward1, mask1) > 100 * LOGP_TOL


def test_the_image_soft_token_is_never_sampled(live, tiny_ct):
    """At temperature 1000 every token is about equally likely (the image token included, as the forward shows),
    so without the ban about 4.5 of the 8192 sampled tokens would be image tokens; with it, none is."""
    from toolkit import constants as C
    from toolkit.train.rollouts import RolloutEngine, RolloutSettings

    trainer, items = live
    tokenizer = trainer._tokenizer
    image_token = tokenizer.convert_tokens_to_ids(C.IMAGE_SOFT_TOKEN)
    config = json.loads((Path(tiny_ct) / "config.json").read_text())
    assert image_token == config["image_token_index"] != tokenizer.unk_token_id
    assert trainer.rollouts.banned == {image_token: float("-inf")}

    rows, tokens = 128, 64
    engine = RolloutEngine(trainer.model, tokenizer, RolloutSettings(tokens, temperature=1000.0), max_batch=rows)
    try:
        assert engine.banned == {image_token: float("-inf")}
        prompts = [items[k % len(items)].encoded for k in range(rows)]
        outs = engine.generate(prompts, list(range(rows)))
    finally:
        engine.close()
    sampled = [t for o in outs for t in o.completion_ids]
    assert len(sampled) > 0.9 * rows * tokens  # almost none stops early at this temperature
    assert image_token not in sampled
    # the control: the image token's probability at that temperature, from the model itself
    text = items[0].encoded
    ids = torch.tensor([text.input_ids])
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits[0, -1]
    p_image = torch.softmax(logits.float() / 1000.0, dim=-1)[image_token].item()
    assert p_image * len(sampled) > 4, p_image  # expected image tokens without the ban (none seen: P < 2%)


# ------------------------------------------------------------------------------------------------- resume


def test_sigkill_mid_run_resumes_and_reproduces_the_uninterrupted_run(grpo_run, tiny_ct, tmp_path):
    """No handler runs on SIGKILL: the last checkpoint survives, --resume finishes, and since each rollout's seed
    comes from the run's restored RNG, the resumed run samples and learns what the uninterrupted one did."""
    straight, recipe_file = grpo_run
    for name in ("grpo.yaml", "rewards.py"):
        shutil.copy(recipe_file.parent / name, tmp_path / name)
    common = [
        "train",
        tmp_path / "grpo.yaml",
        "--set",
        f"base.path={tiny_ct}",
        "--set",
        f"output.dir={tmp_path / 'out'}",
        "--set",
        "training.save_every=2",
    ]
    killed = start_cli_logged(tmp_path / "killed", *common)
    checkpoint = tmp_path / "out" / f".{NAME}.run" / "checkpoint-2" / "trainer_state.json"
    kill_at_checkpoint(killed, checkpoint, tmp_path / "killed")
    assert not (tmp_path / "out" / NAME).exists()
    resumed = start_cli_logged(tmp_path / "resumed", *common, "--resume")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.err").read_text()[-2000:]
    final = tmp_path / "out" / NAME
    manifest = json.loads((final / "toolkit.json").read_text())
    assert manifest["metrics"]["train"]["steps"] == STEPS and manifest["recipe"]["training"]["method"] == "grpo"
    assert same_weights(straight.adapter_dir, final) < 0.02
    # the same rollouts: the same rewards at every step (the killed run's steps past its checkpoint logged again)
    want = {r["step"]: r["reward"] for r in _jsonl(straight.adapter_dir / "metrics.jsonl") if "reward" in r}
    got = {r["step"]: r["reward"] for r in _jsonl(final / "metrics.jsonl") if "reward" in r}
    assert got == want


# ------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "sets, message",
    [
        (["training.rewards=[]"], "grpo needs at least one reward"),
        (
            ["training.batch_size=6", "training.grad_accum=1", "training.num_generations=4"],
            r"batch_size x steps_per_generation = 6 completions, which must be a multiple of num_generations \(4\)",
        ),
        (
            ["training.batch_size=4", "training.steps_per_generation=3", "training.num_generations=8"],
            r"= 12 completions, which must be a multiple of num_generations \(8\)",
        ),
        (["training.eval_every=2"], "grpo scores its held-out prompts once, at the end .* remove eval_every"),
        (["training.loss_type=sigmoid"], "grpo takes one loss_type, one of dapo, grpo, dr_grpo, bnpo, cispo, sapo"),
        (["training.loss_type=[dapo, grpo]"], "grpo takes one loss_type"),
        (["training.method=sft"], "rewards is a setting of grpo, and training.method is sft"),
    ],
)
def test_grpo_recipe_errors(sets, message):
    with pytest.raises(ToolkitError, match=message):
        load_recipe(QUICKSTART_GRPO, sets)


def test_grpo_settings_on_another_method_are_refused():
    sft = ROOT / "recipes" / "quickstart.yaml"
    with pytest.raises(ToolkitError, match="num_generations is a setting of grpo, and training.method is sft"):
        load_recipe(sft, ["training.num_generations=4"])
    with pytest.raises(ToolkitError, match="temperature is a setting of grpo, and training.method is dpo"):
        load_recipe(ROOT / "recipes" / "quickstart-dpo.yaml", ["training.temperature=0.7"])
    # and the quickstart's own grpo recipe loads
    assert load_recipe(QUICKSTART_GRPO).training.method == "grpo"


def test_validate_names_a_missing_reward_file_in_one_line(tiny_ct, tmp_path):
    recipe = tmp_path / "grpo.yaml"
    only_the_function = RECIPE.replace("    - {type: contains}\n", "")
    recipe.write_text(only_the_function.replace("rewards.py:first_token_odd", "missing.py:first_token_odd"))
    r = run_cli("validate", recipe, "--set", f"base.path={tiny_ct}")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: training.rewards[0]") and "missing.py not found" in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------- eval


def test_toolkit_eval_on_a_grpo_recipe_scores_the_rewards_and_gates_them(grpo_run, tiny_ct, tmp_path):
    from toolkit.eval.run import run_eval

    result, recipe_file = grpo_run
    recipe = _load(recipe_file, tiny_ct, result.adapter_dir.parent)
    with pytest.raises(ToolkitError, match="reward_nope"):  # a metric the recipe's rewards do not give
        run_eval(recipe, out=tmp_path / "x", mins=["reward_nope=0.5"])
    # reward >= 0 always holds; contains > 1 never does
    outcome = run_eval(recipe, out=tmp_path / "eval", mins=["reward=0", "reward_contains=1.01"])
    report = outcome.report
    assert report["scoring"] == "rewards"
    assert report["metrics_selected"] == ["reward", "reward_contains", "reward_first_token_odd"]
    assert set(report["metrics"]) == {"base", NAME}  # the recipe's own adapter, under its name
    for label in ("base", NAME):
        for key in ("reward", "reward_contains", "reward_first_token_odd"):
            assert isinstance(report["metrics"][label][key], float), (label, key)
    # the same greedy answers as the held-out table written at the end of training
    for label, trained_label in (("base", "base"), (NAME, "adapter")):
        for key in ("reward", "reward_contains", "reward_first_token_odd"):
            assert report["metrics"][label][key] == pytest.approx(result.metrics[trained_label][key]), (label, key)
    assert len(outcome.failures) == 1 and outcome.failures[0].startswith(f"FAILED {NAME}: reward_contains = ")
    assert report["passed"] is False and (outcome.out_dir / "report.json").is_file()


@pytest.mark.parametrize("kernel", ["torch", "torch_fused"])
def test_a_rollouts_dense_layer_gives_the_training_forwards_numbers(tiny_ct, kernel):
    """The stand-in a rollout gives each 4-bit layer (rollouts._dense_weights) multiplies as the layer's own training
    forward does: torch_fused casts a float32 model's activations to bfloat16 for its matmul, so the stand-in too."""
    from toolkit.base.loader import load_base
    from toolkit.train.rollouts import _dense_weights

    model = load_base(tiny_ct, device="cpu", training=True, kernel=kernel).model
    model.train()
    layer = model.model.language_model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x)
        with _dense_weights(model) as dense:
            assert dense
            got = layer.lean_op(x)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)

"""The chunked loss (TRL's fused LM head) equals the full-logits loss; long rows' needs hold; a 30k row trains."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT

from toolkit.recipe import load_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _lora_model(path, attn: str = "sdpa"):
    from trl.trainer.utils import add_fused_lm_head

    from toolkit.base.loader import load_base
    from toolkit.lora.config import apply_lora
    from toolkit.recipe import LoraSection

    # the float32 reference kernel, whatever auto times fastest here: the tolerances below are float32's
    model = load_base(path, device="cpu", kernel="torch", training=True).model
    model.set_attn_implementation(attn)
    torch.manual_seed(0)  # the same LoRA initialisation for every model compared
    model = apply_lora(model, LoraSection(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():  # non-zero B, so the gradients of A are exercised too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    model.train()
    return model


def _batch(lengths: list[int], seed: int = 0) -> dict:
    """Right-padded random text rows, the second half of each row labelled (as the collator pads them)."""
    from toolkit.data.collate import pad_batch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(10, 1700, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :], "token_type_ids": [0] * n})
    return pad_batch(rows, pad_id=0)


def _loss_and_grads(model, batch: dict, **kw) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False, **kw).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys() and a
    scale = max(float(g.abs().max()) for g in b.values())
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= rtol * scale, (worst, scale)


def test_chunked_loss_and_lora_gradients_equal_the_full_logits_path(tiny_ct):
    model = _lora_model(tiny_ct)
    batch = _batch([300, 211])  # padding and prompt positions are ignored the same way by both
    chunked, g_chunked = _loss_and_grads(model, batch, fused_lm_head=True)
    plain, g_plain = _loss_and_grads(model, batch)  # the model's own loss over [rows, tokens, vocab] logits
    assert chunked == pytest.approx(plain, rel=1e-5)
    _assert_close(g_chunked, g_plain, rtol=1e-4)


def test_chunked_kernel_applies_the_final_logit_softcap_across_tiles(monkeypatch):
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "TOKEN_CHUNK_SIZE", 16)  # several token tiles and vocabulary tiles
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=g)
    softcap = 5.0  # small, so the cap changes the loss a lot
    logprobs = chunked_logprob.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 64, softcap, 1.0, ("log_probs",)
    )[0]
    chunked = -logprobs.mean()
    chunked.backward()
    g_chunked = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logits = softcap * torch.tanh((hidden @ weight.T) / softcap)
    plain = torch.nn.functional.cross_entropy(logits, targets)
    plain.backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert plain.item() != pytest.approx(torch.nn.functional.cross_entropy(hidden @ weight.T, targets).item())
    for a, b in zip(g_chunked, (hidden.grad, weight.grad), strict=True):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_sdpa_trains_like_eager_past_the_sliding_window(tiny_ct):
    # Eager attention needs [tokens x tokens] scores per layer (30k rows: GBs); SDPA does not. Rows past the
    # 1,024-token sliding window, where the two mask paths differ most, give the same loss and gradients.
    batch = _batch([1300])
    model = _lora_model(tiny_ct, "eager")
    eager, g_eager = _loss_and_grads(model, batch, fused_lm_head=True)
    model.get_base_model().set_attn_implementation("sdpa")
    assert model.get_base_model().config.get_text_config()._attn_implementation == "sdpa"
    sdpa, g_sdpa = _loss_and_grads(model, batch, fused_lm_head=True)
    assert sdpa == pytest.approx(eager, rel=1e-5)
    _assert_close(g_sdpa, g_eager, rtol=1e-4)


def test_text_only_batches_drop_all_zero_token_type_ids_and_train_the_same(tiny_ct):
    from toolkit.train.sft import RowCollator as _RowCollator

    def row(types):
        n = len(types)
        encoded = SimpleNamespace(
            input_ids=list(range(10, 10 + n)),
            labels=[-100] + list(range(11, 10 + n)),
            token_type_ids=types,
            pixel_values=None,
        )
        return SimpleNamespace(encoded=encoded)

    collate = _RowCollator([row([0] * 6), row([0] * 4), row([0, 1, 1, 0])], pad_id=0)
    assert "token_type_ids" not in collate([{"row": 0}, {"row": 1}])
    assert collate([{"row": 0}, {"row": 2}])["token_type_ids"][1].tolist() == [0, 1, 1, 0, 0, 0]  # images keep them

    model = _lora_model(tiny_ct)
    batch = _batch([700, 90])
    with_types, g_with = _loss_and_grads(model, batch, fused_lm_head=True)
    without = {k: v for k, v in batch.items() if k != "token_type_ids"}
    without_types, g_without = _loss_and_grads(model, without, fused_lm_head=True)
    assert without_types == pytest.approx(with_types, rel=1e-6)
    _assert_close(g_without, g_with, rtol=1e-5)


@pytest.mark.parametrize(
    ("setting", "max_seq_len", "on"),
    [("auto", 2048, True), ("auto", 32768, True), ("on", 256, True), ("off", 32768, False)],
)
def test_chunked_loss_setting(setting, max_seq_len, on):
    from toolkit.train.loss import use_chunked_loss

    assert use_chunked_loss(setting, max_seq_len) is on


def test_a_30k_token_row_trains_on_cpu_with_the_chunked_loss(tmp_path):
    from toolkit.base import builder
    from toolkit.train.trainer import train

    # One full-attention layer with the 27B's 32,768 positions: the long row's cost is attention, which SDPA
    # computes causally without a [tokens x tokens] mask for a text-only row, and the loss, computed in chunks.
    base = builder.build(tmp_path / "base", seed=0, layers=1, context=32768)
    # A long multi-turn conversation (150 exchanges of about 200 tokens): one message of 30k tokens would make the
    # tokenizer's BPE run over a single 150k-character word, which is quadratic and takes minutes.
    question = " ".join(("the cat and the dog " * 40).split()[:190])  # one token per word on the tiny tokenizer
    messages = []
    for _ in range(150):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": "paris"}]
    row = {"messages": messages}
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(row) + "\n")
    recipe = load_recipe(
        QUICKSTART,
        [
            f"base.path={base}",
            f"data.train={data}",
            "data.eval=null",
            "data.eval_fraction=0",
            "data.max_seq_len=32768",
            "training.max_steps=1",
            "training.warmup_ratio=0",  # with warmup, step 1 runs at learning rate 0
            "training.lr_scheduler=constant",
            "training.batch_size=1",
            "training.gradient_checkpointing=true",
            "training.logging_every=1",
            f"output.dir={tmp_path / 'adapters'}",
        ],
    )
    result = train(recipe)
    m = result.metrics["train"]
    assert result.step == 1 and m["chunked_loss"] is True
    assert 29_000 < m["tokens_seen"] < 32_768, m
    assert m["train_loss"] == pytest.approx(m["train_loss"]) and m["train_loss"] > 0  # finite
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    moved = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert moved and any(float(p.detach().abs().max()) > 0 for p in moved)  # one optimizer step changed the adapter

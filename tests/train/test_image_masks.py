"""Training batches with images: the broadcast masks equal transformers' vmap-built ones, and training with them gives
the same loss and gradients."""

from __future__ import annotations

import torch

from toolkit.train import image_masks


def _types_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded rows: two images in the first (text between them), one at the very start of the second,
    none in the third (padding only)."""
    types = torch.zeros((3, 24), dtype=torch.long)
    types[0, 3:7] = 1
    types[0, 10:14] = 1
    types[1, 0:5] = 1
    mask = torch.ones((3, 24), dtype=torch.long)
    mask[1, 20:] = 0
    mask[2, 15:] = 0
    return types, mask


def test_vision_masks_equal_transformers_masks():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3 import modeling_gemma3

    types, mask = _types_and_mask()
    for window in (6, 64):  # a window that cuts through the images' blocks, and one wider than the rows
        config = Gemma3TextConfig(sliding_window=window, hidden_size=8, num_attention_heads=1, head_dim=8)
        config._attn_implementation = "sdpa"
        theirs = modeling_gemma3.create_masks_for_vision_model(
            config=config,
            inputs_embeds=torch.zeros((3, 24, 8)),
            attention_mask=mask,
            past_key_values=None,
            position_ids=torch.arange(24).expand(3, 24),
            block_sequence_ids=modeling_gemma3.get_block_sequence_ids_for_mask(types, device="cpu"),
        )
        ours = image_masks.vision_masks(mask, types, window)
        assert ours.keys() == theirs.keys()
        for kind in ours:
            assert torch.equal(ours[kind], theirs[kind].expand_as(ours[kind])), (window, kind)
        assert ours["sliding_attention"][0, 0, 12, 3] if window == 64 else not ours["sliding_attention"][0, 0, 12, 3]
        assert ours["full_attention"][0, 0, 3, 6]  # an image token sees the rest of its image (bidirectional)
        assert not ours["full_attention"][0, 0, 3, 10]  # ... but not the next image


def test_training_with_the_broadcast_masks_matches_the_models_own(tiny_ct, monkeypatch):
    from toolkit.base.loader import load_base
    from toolkit.lora.config import apply_lora
    from toolkit.recipe import LoraSection

    types, mask = _types_and_mask()
    ids = torch.randint(10, 1700, (3, 24), generator=torch.Generator().manual_seed(0)) * mask
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "labels": ids.masked_fill(mask == 0, -100),
    }
    model = load_base(tiny_ct, device="cpu", training=True).model
    torch.manual_seed(0)
    model = apply_lora(model, LoraSection(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():  # non-zero B, so A's gradients count too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.train()

    def loss_and_grads() -> tuple[torch.Tensor, dict]:
        model.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    original = image_masks.vision_masks
    monkeypatch.setattr(image_masks, "vision_masks", lambda *a: calls.append(1) or original(*a))
    before, grads_before = loss_and_grads()
    assert image_masks.install(model)
    after, grads_after = loss_and_grads()
    assert calls, "the hook did not build the masks"
    assert torch.equal(before, after)
    assert grads_before.keys() == grads_after.keys() and grads_before
    for name, g in grads_before.items():
        assert torch.equal(g, grads_after[name]), name
